/**
 * Galata / Playwright settings for the browser tests.
 *
 * Browsers cannot be downloaded on our machines: Debian's Chromium is used instead,
 * and Playwright starts (and stops) its own `jupyter lab` for the run.
 */
const baseConfig = require('@jupyterlab/galata/lib/playwright-config');

const chromium = process.env.DUA_GUARD_CHROMIUM || '/usr/bin/chromium';
const port = process.env.DUA_GUARD_UI_PORT || '8888';

module.exports = {
  ...baseConfig,
  testDir: './specs',
  outputDir: './test-results',
  timeout: 120 * 1000,
  retries: process.env.CI ? 1 : 0,
  workers: 1,
  reporter: [
    ['list'],
    ['html', { open: 'never', outputFolder: 'playwright-report' }]
  ],
  use: {
    ...baseConfig.use,
    baseURL: `http://127.0.0.1:${port}`,
    video: 'off',
    trace: 'off',
    launchOptions: {
      executablePath: chromium,
      args: [
        '--no-sandbox',
        '--headless',
        '--disable-gpu',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync'
      ]
    }
  },
  webServer: {
    command: `jupyter lab --config jupyter_server_test_config.py --ServerApp.port=${port}`,
    url: `http://127.0.0.1:${port}/lab`,
    timeout: 180 * 1000,
    reuseExistingServer: false,
    stdout: 'pipe',
    stderr: 'pipe'
  }
};
