import {
  expect,
  galata,
  IJupyterLabPageFixture,
  test
} from '@jupyterlab/galata';
import * as path from 'path';

/** Screenshots of each state, linked from the README's feature section. */
const SHOTS = path.resolve(__dirname, '..', '..', '..', 'docs', 'screenshots');

/** A synthetic case listing: one row per (invented) person. */
const LISTING = `import pandas as pd
cases = pd.DataFrame({
    'Patient ID': [f'SYN{i:05d}' for i in range(60)],
    'Age at diagnosis': [(i * 7) % 20 for i in range(60)],
    'Sex': ['Female' if i % 2 else 'Male' for i in range(60)],
    'Year of diagnosis': [2000 + i % 20 for i in range(60)],
})
cases`;

/** A clean aggregate: every cell far above the small-cell threshold. */
const AGGREGATE = `pd.DataFrame(
    {'Female': [1204, 3410], 'Male': [1530, 3102]},
    index=pd.Index(['Breast', 'Lung and Bronchus'], name='Primary Site'),
)`;

const BANNER = '.jp-DUAGuard-banner';

async function runInNewCell(
  page: IJupyterLabPageFixture,
  source: string
): Promise<number> {
  const index = (await page.notebook.getCellCount()) - 1;
  await page.notebook.setCell(index, 'code', source);
  await page.notebook.runCell(index, true);
  await page.notebook.addCell('code', '');
  return index;
}

test.describe('Warnings on flagged outputs', () => {
  test.beforeEach(async ({ page }) => {
    await page.notebook.createNew('outputs.ipynb');
  });

  test('a case listing gets a banner with reasons; a clean aggregate none', async ({
    page
  }) => {
    const listing = await runInNewCell(page, LISTING);
    const listingCell = await page.notebook.getCellLocator(listing);
    const banner = listingCell!.locator(BANNER);
    await expect(banner).toBeVisible();
    await expect(banner).toContainText('Individual-level data');
    await expect(banner).toContainText('Patient ID');
    await expect(banner).toContainText('sec. 17');
    await expect(banner).toHaveAttribute('role', 'alert');
    await expect(
      banner.getByRole('button', { name: 'Clear this output' })
    ).toBeVisible();
    await expect(
      banner.getByRole('button', { name: 'Mark as reviewed…' })
    ).toBeVisible();
    await banner.getByRole('button', { name: 'Why?' }).click();
    await expect(banner.locator('.jp-DUAGuard-banner-why')).toBeVisible();
    await page.screenshot({ path: path.join(SHOTS, 'banner.png') });

    const aggregate = await runInNewCell(page, AGGREGATE);
    const aggregateCell = await page.notebook.getCellLocator(aggregate);
    await expect(
      aggregateCell!.locator('.jp-OutputArea-output table')
    ).toBeVisible();
    // Give the page the time a server round trip would take, then check nothing came.
    await page.waitForTimeout(1000);
    await expect(aggregateCell!.locator(BANNER)).toHaveCount(0);
  });

  test('"Clear this output" removes the flagged output', async ({ page }) => {
    const index = await runInNewCell(page, LISTING);
    const cell = await page.notebook.getCellLocator(index);
    await cell!
      .locator(BANNER)
      .getByRole('button', { name: 'Clear this output' })
      .click();
    await expect(cell!.locator(BANNER)).toHaveCount(0);
    await expect(cell!.locator('.jp-OutputArea-output')).toHaveCount(0);
  });

  test('copying from a flagged output asks first', async ({ page }) => {
    const index = await runInNewCell(page, LISTING);
    const cell = await page.notebook.getCellLocator(index);
    await expect(cell!.locator(BANNER)).toBeVisible();
    await cell!.locator('.jp-DUAGuard-flagged tbody td').first().dblclick();
    await page.keyboard.press('Control+c');
    const dialog = page.locator('.jp-Dialog');
    await expect(dialog).toContainText('This output looks individual-level');
    await expect(
      dialog.getByRole('button', { name: 'Copy anyway' })
    ).toBeVisible();
    await page.screenshot({ path: path.join(SHOTS, 'copy-guard.png') });
    await dialog.getByRole('button', { name: 'Cancel' }).click();
    await expect(dialog).toHaveCount(0);
  });

  test('"Copy Output to Clipboard" from the context menu asks first', async ({
    page
  }) => {
    const index = await runInNewCell(page, LISTING);
    const cell = await page.notebook.getCellLocator(index);
    await cell!
      .locator('.jp-DUAGuard-flagged .jp-OutputArea-output')
      .click({ button: 'right' });
    await page
      .getByRole('menuitem', { name: 'Copy Output to Clipboard' })
      .click();
    const dialog = page.locator('.jp-Dialog');
    await expect(dialog).toContainText('This output looks individual-level');
    await dialog.getByRole('button', { name: 'Cancel' }).click();
    await expect(dialog).toHaveCount(0);
  });

  test('downloading a notebook with unreviewed findings warns first', async ({
    page
  }) => {
    const index = await runInNewCell(page, LISTING);
    const cell = await page.notebook.getCellLocator(index);
    await expect(cell!.locator(BANNER)).toBeVisible();
    await page.evaluate(() => {
      void window.jupyterapp.commands.execute('docmanager:download');
    });
    const dialog = page.locator('.jp-Dialog');
    await expect(dialog).toContainText('Unreviewed individual-level outputs');
    await expect(dialog).toContainText(
      `Cell ${index + 1}, output 1: Individual-level data`
    );
    await page.screenshot({ path: path.join(SHOTS, 'export-guard.png') });
    await dialog.getByRole('button', { name: 'Cancel' }).click();
    await expect(dialog).toHaveCount(0);
  });

  test('a reviewed output shows who reviewed it and no longer warns', async ({
    page
  }) => {
    const index = await runInNewCell(page, LISTING);
    const cell = await page.notebook.getCellLocator(index);
    await cell!
      .locator(BANNER)
      .getByRole('button', { name: 'Mark as reviewed…' })
      .click();
    const dialog = page.locator('.jp-Dialog');
    await dialog
      .locator('textarea')
      .fill('Synthetic listing for the methods section; stays here.');
    await dialog.getByRole('button', { name: 'Mark as reviewed' }).click();
    const reviewed = cell!.locator(`${BANNER}.jp-DUAGuard-reviewed`);
    await expect(reviewed).toContainText('Marked as reviewed by');
    await expect(reviewed).toContainText('methods section');
    await expect(cell!.locator('.jp-DUAGuard-flagged')).toHaveCount(0);
  });
});

test.describe('Status item and panel', () => {
  test('show a blocked attempt made in another cell', async ({ page }) => {
    await page.notebook.createNew('blocked.ipynb');
    await runInNewCell(
      page,
      `import urllib.request
try:
    urllib.request.urlopen('https://api.openai.com/v1/models', timeout=5)
except PermissionError as error:
    print('refused:', type(error).__name__)`
    );
    await expect(page.locator('.jp-OutputArea-output').first()).toContainText(
      'refused'
    );
    const counts = page.locator('#jp-DUAGuard-status .jp-DUAGuard-counts');
    await expect(counts).toContainText('1 blocked', { timeout: 30 * 1000 });
    await page.locator('#jp-DUAGuard-status').click();
    const panel = page.locator('#jp-DUAGuard-panel');
    await expect(panel).toBeVisible();
    await expect(panel.locator('li[data-kind="egress_blocked"]')).toContainText(
      'api.openai.com'
    );
    await expect(
      panel.getByText('Download the records report (HTML)')
    ).toBeVisible();
    await page.screenshot({ path: path.join(SHOTS, 'status-panel.png') });
  });
});

void galata;
