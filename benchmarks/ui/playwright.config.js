/**
 * The banner-latency benchmark reuses the browser tests' settings (Debian Chromium,
 * a `jupyter lab` started for the run) with its own spec folder.
 */
const path = require('path');
const base = require('../../tests/ui/playwright.config.js');

module.exports = {
  ...base,
  testDir: '.',
  outputDir: path.resolve(__dirname, 'results'),
  retries: 0,
  reporter: [['list']],
  webServer: {
    ...base.webServer,
    cwd: path.resolve(__dirname, '../../tests/ui')
  }
};
