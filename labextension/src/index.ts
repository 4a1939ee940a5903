import {
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { IStatusBar } from '@jupyterlab/statusbar';

import { GuardStatusItem } from './status';

const PLUGIN_ID = 'jupyter-dua-guard:status';

/**
 * Shows whether the DUA guard is active, in JupyterLab and in Notebook 7.
 */
const statusPlugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'Shows the state of the NCCR / SEER Data Use Agreement guard.',
  autoStart: true,
  optional: [IStatusBar],
  activate: (app: JupyterFrontEnd, statusBar: IStatusBar | null) => {
    const item = new GuardStatusItem();
    item.id = 'jp-DUAGuard-status';
    if (statusBar) {
      statusBar.registerStatusItem(PLUGIN_ID, {
        item,
        align: 'left',
        rank: 1000
      });
    } else {
      // Notebook 7 has no status bar: the top bar is where people look.
      app.shell.add(item, 'top', { rank: 1000 });
    }
  }
};

export default [statusPlugin];
