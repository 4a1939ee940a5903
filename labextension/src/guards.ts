import { Dialog, showDialog } from '@jupyterlab/apputils';
import { INotebookTracker } from '@jupyterlab/notebook';
import { CommandRegistry } from '@lumino/commands';
import { ReadonlyPartialJSONObject } from '@lumino/coreutils';
import { Widget } from '@lumino/widgets';

import { KINDS } from './findings';
import { FLAGGED_CLASS, OutputWarnings } from './outputs';
import { requestAPI } from './request';

/** Commands that take a notebook out of JupyterLab. */
export const EXPORT_COMMANDS = new Set([
  'docmanager:download',
  'notebook:export-to-format',
  'docmanager:save-as'
]);

/** Record a researcher's choice in the ledger; the data itself is never sent. */
function recordDecision(body: { [key: string]: unknown }): void {
  requestAPI('decisions', { method: 'POST', body: JSON.stringify(body) }).catch(
    error =>
      console.warn(
        'jupyter-dua-guard: the decision could not be recorded',
        error
      )
  );
}

/**
 * Copy guard: copying from a flagged output asks first, since such text must not
 * be pasted into AI tools or documents (DUA sec. 22).
 */
export function guardCopy(tracker: INotebookTracker): void {
  let allowNext = false;
  document.addEventListener(
    'copy',
    event => {
      if (allowNext) {
        allowNext = false;
        return;
      }
      const selection = window.getSelection();
      const anchor = selection?.anchorNode;
      const element =
        anchor instanceof Element ? anchor : anchor?.parentElement;
      const flagged = element?.closest(`.${FLAGGED_CLASS}`);
      const text = selection?.toString() ?? '';
      if (!flagged || !text) {
        return;
      }
      event.preventDefault();
      event.stopPropagation();
      const path = tracker.currentWidget?.context.path ?? '';
      void showDialog({
        title: 'This output looks individual-level',
        body:
          'The text you are copying comes from an output the DUA guard flagged. ' +
          'It must not be pasted into AI tools, e-mails or documents that leave ' +
          'the secure environment (NCCR DUA sec. 22, 17 and 8).',
        buttons: [
          Dialog.cancelButton({ label: 'Cancel' }),
          Dialog.warnButton({ label: 'Copy anyway' })
        ]
      }).then(result => {
        const copied = result.button.accept;
        recordDecision({
          action: 'copy',
          decision: copied ? 'copied' : 'cancelled',
          path
        });
        if (copied) {
          allowNext = true;
          void navigator.clipboard?.writeText(text).catch(() => {
            allowNext = true;
            document.execCommand('copy');
          });
        }
      });
    },
    true
  );
}

/**
 * Export guard: downloading or exporting a notebook with unreviewed findings
 * lists them first and asks.
 */
export function guardExport(
  commands: CommandRegistry,
  shell: { currentWidget: Widget | null },
  tracker: INotebookTracker,
  warnings: OutputWarnings
): void {
  const execute = commands.execute.bind(commands);
  commands.execute = async (id: string, args?: ReadonlyPartialJSONObject) => {
    const panel = tracker.currentWidget;
    if (!EXPORT_COMMANDS.has(id) || !panel || shell.currentWidget !== panel) {
      return execute(id, args);
    }
    const flagged = await warnings.flaggedOutputs(panel);
    if (flagged.length === 0) {
      return execute(id, args);
    }
    const body = document.createElement('div');
    body.className = 'jp-DUAGuard-export';
    const intro = document.createElement('p');
    intro.textContent =
      `${panel.context.path} has ${flagged.length} output(s) with unreviewed ` +
      'DUA guard findings. Clear them or have them reviewed before the notebook ' +
      'leaves the secure environment.';
    body.appendChild(intro);
    const list = document.createElement('ul');
    for (const item of flagged) {
      const entry = document.createElement('li');
      const kinds = Array.from(
        new Set(item.findings.map(f => KINDS[f.kind]?.title ?? f.kind))
      );
      entry.textContent = `Cell ${item.cellIndex + 1}, output ${item.outputIndex + 1}: ${kinds.join(', ')}`;
      list.appendChild(entry);
    }
    body.appendChild(list);
    const result = await showDialog({
      title: 'Unreviewed individual-level outputs',
      body: new Widget({ node: body }),
      buttons: [
        Dialog.cancelButton(),
        Dialog.warnButton({ label: 'Export anyway' })
      ]
    });
    recordDecision({
      action: 'export',
      command: id,
      decision: result.button.accept ? 'exported' : 'cancelled',
      path: panel.context.path,
      flagged_outputs: flagged.length
    });
    return result.button.accept ? execute(id, args) : undefined;
  };
}
