import { requestAPI } from './request';

/** An AI assistant extension found in this JupyterLab, and what the guard did. */
export interface IAIExtension {
  name: string;
  kind: string;
  disabled: boolean;
}

/** What `GET /dua-guard/api/status` answers. */
export interface IGuardStatus {
  version: string;
  active: boolean;
  ai_extensions?: IAIExtension[];
}

/** One ledger record as `GET /dua-guard/api/events` returns it. */
export interface ILedgerEvent {
  seq: number;
  time: string;
  kind: string;
  context: { [key: string]: unknown };
  data: { [key: string]: unknown };
}

/** A page of ledger records. */
export interface IEventPage {
  events: ILedgerEvent[];
  total: number;
  next_offset: number | null;
}

/** Filters of the events API; `kind` may repeat. */
export interface IEventQuery {
  kind?: string[];
  notebook?: string;
  kernel?: string;
  since?: string;
  limit?: number;
  order?: 'asc' | 'desc';
}

export function fetchStatus(): Promise<IGuardStatus> {
  return requestAPI<IGuardStatus>('status');
}

export function fetchEvents(query: IEventQuery): Promise<IEventPage> {
  const params = new URLSearchParams();
  for (const kind of query.kind ?? []) {
    params.append('kind', kind);
  }
  for (const key of [
    'notebook',
    'kernel',
    'since',
    'limit',
    'order'
  ] as const) {
    const value = query[key];
    if (value !== undefined && value !== '') {
      params.set(key, String(value));
    }
  }
  return requestAPI<IEventPage>(`events?${params.toString()}`);
}
