import {
  ILabShell,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { INotebookTracker, NotebookActions } from '@jupyterlab/notebook';
import { IStatusBar } from '@jupyterlab/statusbar';

import { guardCommands, guardCopy } from './guards';
import { OutputWarnings } from './outputs';
import { GuardPanel } from './panel';
import { GuardStatusItem } from './status';

const STATUS_ID = 'jupyter-dua-guard:status';

/**
 * Shows whether the DUA guard is active, in JupyterLab and in Notebook 7, and
 * opens the "DUA Guard" side panel with the ledger's recent events.
 */
const statusPlugin: JupyterFrontEndPlugin<void> = {
  id: STATUS_ID,
  description: 'Shows the state of the NCCR / SEER Data Use Agreement guard.',
  autoStart: true,
  optional: [IStatusBar, INotebookTracker, ILabShell],
  activate: (
    app: JupyterFrontEnd,
    statusBar: IStatusBar | null,
    tracker: INotebookTracker | null,
    labShell: ILabShell | null
  ) => {
    const panel = new GuardPanel(tracker);
    app.shell.add(panel, 'right', { rank: 900 });
    const item = new GuardStatusItem(tracker, () => {
      labShell?.expandRight();
      app.shell.activateById(panel.id);
      void panel.refresh();
    });
    item.id = 'jp-DUAGuard-status';
    NotebookActions.executed.connect(() => {
      item.refreshSoon();
      if (panel.isVisible) {
        void panel.refresh();
      }
    });
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
    guardCommands(app, tracker, warnings);
  }
};

export default [statusPlugin, outputsPlugin];
