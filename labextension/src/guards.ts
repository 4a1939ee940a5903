import { JupyterFrontEnd } from '@jupyterlab/application';
import { Dialog, showDialog } from '@jupyterlab/apputils';
import { INotebookTracker } from '@jupyterlab/notebook';
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

/** The output context menu's "Copy Output to Clipboard". */
export const COPY_OUTPUT_COMMAND = 'notebook:copy-to-clipboard';

/**
 * Record a researcher's choice in the ledger; the data itself is never sent.
 * Exports wait for it: the server's nbconvert guard looks for this record.
 */
function recordDecision(body: { [key: string]: unknown }): Promise<void> {
  return requestAPI<void>('decisions', {
    method: 'POST',
    body: JSON.stringify(body)
  }).catch(error =>
    console.warn('jupyter-dua-guard: the decision could not be recorded', error)
  );
}

/**
 * Ask before text from a flagged output reaches the clipboard, since it must not
 * be pasted into AI tools or documents (DUA sec. 22), and record the answer.
 */
async function confirmCopy(path: string): Promise<boolean> {
  const result = await showDialog({
    title: 'This output looks individual-level',
    body:
      'The text you are copying comes from an output the DUA guard flagged. ' +
      'It must not be pasted into AI tools, e-mails or documents that leave ' +
      'the secure environment (NCCR DUA sec. 22, 17 and 8).',
    buttons: [
      Dialog.cancelButton({ label: 'Cancel' }),
      Dialog.warnButton({ label: 'Copy anyway' })
    ]
  });
  const copied = result.button.accept;
  void recordDecision({
    action: 'copy',
    decision: copied ? 'copied' : 'cancelled',
    path
  });
  return copied;
}

/** Copy guard for the keyboard and the browser's own menu: the `copy` event. */
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
      const text = selection?.toString() ?? '';
      if (!text || !element?.closest(`.${FLAGGED_CLASS}`)) {
        return;
      }
      event.preventDefault();
      event.stopPropagation();
      void confirmCopy(tracker.currentWidget?.context.path ?? '').then(
        copied => {
          if (copied) {
            allowNext = true;
            void navigator.clipboard
              ?.writeText(text)
              .catch(() => document.execCommand('copy'));
          }
        }
      );
    },
    true
  );
}

/** The list of unreviewed outputs shown before an export. */
function exportWarning(
  path: string,
  flagged: Awaited<ReturnType<OutputWarnings['flaggedOutputs']>>
): Widget {
  const body = document.createElement('div');
  body.className = 'jp-DUAGuard-export';
  const intro = document.createElement('p');
  intro.textContent =
    `${path} has ${flagged.length} output(s) with unreviewed DUA guard findings. ` +
    'Clear them or have them reviewed before the notebook leaves the secure environment.';
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
  return new Widget({ node: body });
}

/**
 * Commands that copy or export flagged outputs ask first: the output context
 * menu's copy, and download / export / save-as of a notebook with unreviewed
 * findings (which lists them).
 */
export function guardCommands(
  app: JupyterFrontEnd,
  tracker: INotebookTracker,
  warnings: OutputWarnings
): void {
  const commands = app.commands;
  const execute = commands.execute.bind(commands);
  commands.execute = async (id: string, args?: ReadonlyPartialJSONObject) => {
    const panel = tracker.currentWidget;
    if (id === COPY_OUTPUT_COMMAND) {
      const flagged = app.contextMenuHitTest(node =>
        node.classList.contains(FLAGGED_CLASS)
      );
      if (flagged && !(await confirmCopy(panel?.context.path ?? ''))) {
        return undefined;
      }
      return execute(id, args);
    }
    if (
      !EXPORT_COMMANDS.has(id) ||
      !panel ||
      app.shell.currentWidget !== panel
    ) {
      return execute(id, args);
    }
    const flagged = await warnings.flaggedOutputs(panel);
    if (flagged.length === 0) {
      return execute(id, args);
    }
    const result = await showDialog({
      title: 'Unreviewed individual-level outputs',
      body: exportWarning(panel.context.path, flagged),
      buttons: [
        Dialog.cancelButton(),
        Dialog.warnButton({ label: 'Export anyway' })
      ]
    });
    await recordDecision({
      action: 'export',
      command: id,
      decision: result.button.accept ? 'exported' : 'cancelled',
      path: panel.context.path,
      flagged_outputs: flagged.length
    });
    return result.button.accept ? execute(id, args) : undefined;
  };
}
