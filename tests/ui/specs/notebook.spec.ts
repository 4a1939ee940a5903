import { expect, test } from '@playwright/test';

/**
 * Notebook 7 has no status bar: the item sits in its top bar instead.
 * Plain Playwright here, since Galata's fixtures drive the JupyterLab shell.
 */
test('Notebook 7 shows "DUA guard: on" in the top bar', async ({ page }) => {
  await page.goto('/tree');
  const item = page.locator(
    '#top-panel #jp-DUAGuard-status .jp-DUAGuard-state'
  );
  await expect(item).toBeVisible({ timeout: 60 * 1000 });
  await expect(item).toHaveText('DUA guard: on');
  await page.screenshot({ path: 'test-results/status-notebook.png' });
});
