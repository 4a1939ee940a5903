import {
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { INotebookTracker } from '@jupyterlab/notebook';
import { IStatusBar } from '@jupyterlab/statusbar';

import { guardCopy, guardExport } from './guards';
import { OutputWarnings } from './outputs';
import { GuardStatusItem } from './status';

const STATUS_ID = 'jupyter-dua-guard:status';

/**
 * Shows whether the DUA guard is active, in JupyterLab and in Notebook 7.
 */
const statusPlugin: JupyterFrontEndPlugin<void> = {
  id: STATUS_ID,
  description: 'Shows the state of the NCCR / SEER Data Use Agreement guard.',
  autoStart: true,
  optional: [IStatusBar],
  activate: (app: JupyterFrontEnd, statusBar: IStatusBar | null) => {
    const item = new GuardStatusItem();
    item.id = 'jp-DUAGuard-status';
    if (statusBar) {
      statusBar.registerStatusItem(STATUS_ID, {
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

/**
 * Warns on flagged outputs, and guards copying from them and exporting them.
 */
const outputsPlugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-dua-guard:outputs',
  description:
    'Warns on outputs that look individual-level or have small cells, and asks before they are copied or exported.',
  autoStart: true,
  requires: [INotebookTracker],
  activate: (app: JupyterFrontEnd, tracker: INotebookTracker) => {
    const warnings = new OutputWarnings(tracker);
    guardCopy(tracker);
    guardExport(app.commands, app.shell, tracker, warnings);
  }
};

export default [statusPlugin, outputsPlugin];
