import { expect, test } from '@jupyterlab/galata';

/**
 * The page's Content-Security-Policy keeps page scripts from sending data to AI
 * services (NCCR DUA sec. 22) while JupyterLab, notebooks and HTML outputs keep working.
 * No request can leave the machine: if CSP failed, Playwright's route answers instead.
 */
const EVENTS = '/dua-guard/api/events?kind=csp_violation&limit=1000';

test('fetch to an AI host is blocked by CSP and recorded; notebooks still work', async ({
  page
}) => {
  let reachedNetwork = false;
  await page.route('https://api.openai.com/**', route => {
    reachedNetwork = true;
    return route.fulfill({ status: 200, body: 'intercepted' });
  });
  const before = (await (await page.request.get(EVENTS)).json()).total;

  const outcome = await page.evaluate(async () => {
    const violations: string[] = [];
    document.addEventListener('securitypolicyviolation', e =>
      violations.push(`${e.violatedDirective} ${e.blockedURI}`)
    );
    let result: string;
    try {
      await fetch('https://api.openai.com/v1/chat/completions', {
        method: 'POST',
        body: JSON.stringify({ model: 'x', messages: [] })
      });
      result = 'fetched';
    } catch (e) {
      result = `blocked: ${e}`;
    }
    await new Promise(r => setTimeout(r, 200));
    return { result, violations };
  });
  expect(outcome.result).toContain('blocked');
  expect(outcome.violations.join(' ')).toContain('connect-src');
  expect(outcome.violations.join(' ')).toContain('api.openai.com');
  expect(reachedNetwork).toBe(false);

  await expect
    .poll(async () => (await (await page.request.get(EVENTS)).json()).total, {
      timeout: 30000
    })
    .toBeGreaterThan(before);
  const events = (await (await page.request.get(EVENTS)).json()).events;
  const last = events[events.length - 1];
  expect(last.data.host).toBe('api.openai.com');
  expect(last.data.directive).toContain('connect-src');

  // JupyterLab itself (same-origin HTTP and WebSocket) keeps working: run cells.
  await page.notebook.createNew('csp-check.ipynb');
  await page.notebook.setCell(0, 'code', 'print(6 * 7)');
  await page.notebook.runCell(0);
  await expect(page.locator('.jp-OutputArea-output').first()).toContainText(
    '42'
  );

  // A widget-free Plotly-like HTML output (inline SVG + script) renders.
  await page.notebook.addCell(
    'code',
    [
      'from IPython.display import HTML',
      "HTML(\"\"\"<div id='plotly-like' class='plotly-graph-div'>",
      "<svg width='120' height='60'><rect width='90' height='40' fill='steelblue'/></svg>",
      "</div><script>document.getElementById('plotly-like').dataset.rendered = 'yes';</script>\"\"\")"
    ].join('\n')
  );
  await page.notebook.runCell((await page.notebook.getCellCount()) - 1);
  await expect(page.locator('#plotly-like svg rect')).toBeVisible();
  await expect(page.locator('#plotly-like')).toHaveAttribute(
    'data-rendered',
    'yes'
  );
  await page.screenshot({ path: 'test-results/csp-notebook.png' });
});
