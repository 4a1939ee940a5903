import { expect, test } from '@jupyterlab/galata';

const STATUS = '#jp-DUAGuard-status';

test.describe('DUA guard status item', () => {
  test('shows "DUA guard: on" in the JupyterLab status bar', async ({
    page
  }) => {
    const item = page.locator(
      `#jp-main-statusbar ${STATUS} .jp-DUAGuard-state`
    );
    await expect(item).toBeVisible();
    await expect(item).toHaveText('DUA guard: on');
    await expect(page.locator(`#jp-main-statusbar ${STATUS}`)).toHaveAttribute(
      'data-state',
      'on'
    );
    await page.screenshot({ path: 'test-results/status-lab.png' });
  });
});
