import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/**
 * Call the jupyter-dua-guard REST API of the server this page came from.
 *
 * Authentication (token, XSRF cookie) is added by ServerConnection, so every
 * request goes through the same checks as the rest of Jupyter.
 */
export async function requestAPI<T>(
  endPoint = '',
  init: RequestInit = {}
): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const requestUrl = URLExt.join(
    settings.baseUrl,
    'dua-guard',
    'api',
    endPoint
  );

  let response: Response;
  try {
    response = await ServerConnection.makeRequest(requestUrl, init, settings);
  } catch (error) {
    throw new ServerConnection.NetworkError(error as TypeError);
  }

  const text = await response.text();
  let data: any = text;
  if (text.length > 0) {
    try {
      data = JSON.parse(text);
    } catch {
      console.warn(
        'jupyter-dua-guard: the server answered with non-JSON',
        text
      );
    }
  }
  if (!response.ok) {
    throw new ServerConnection.ResponseError(response, data.message ?? data);
  }
  return data as T;
}
