import { Dialog, showDialog } from '@jupyterlab/apputils';
import { CodeCell } from '@jupyterlab/cells';
import * as nbformat from '@jupyterlab/nbformat';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { IOutputModel } from '@jupyterlab/rendermime';
import { Widget } from '@lumino/widgets';

import { createBanner } from './banner';
import {
  IFinding,
  IReview,
  IVerdict,
  METADATA_KEY,
  verdictOf
} from './findings';
import { requestAPI } from './request';

/** Outputs the server's detector can read when the kernel did not check them. */
const TABULAR = [
  'text/html',
  'text/plain',
  'application/vnd.dataresource+json'
];

/** Class of an output (the area's child) that carries unreviewed findings. */
export const FLAGGED_CLASS = 'jp-DUAGuard-flagged';

/** Where an unreviewed finding sits, for the export warning. */
export interface IFlaggedOutput {
  cellIndex: number;
  outputIndex: number;
  findings: IFinding[];
}

/**
 * Watches every notebook's outputs and draws a warning banner above each one
 * that the guard flagged: from the output's metadata when the kernel is
 * guarded, otherwise from the server's detector.
 */
export class OutputWarnings {
  constructor(tracker: INotebookTracker) {
    tracker.widgetAdded.connect((_, panel) => this._watchNotebook(panel));
    tracker.forEach(panel => this._watchNotebook(panel));
  }

  /** Unreviewed flagged outputs of a notebook, as far as they are known now. */
  async flaggedOutputs(panel: NotebookPanel): Promise<IFlaggedOutput[]> {
    const flagged: IFlaggedOutput[] = [];
    const cells = panel.content.widgets;
    for (let cellIndex = 0; cellIndex < cells.length; cellIndex++) {
      const cell = cells[cellIndex];
      if (!(cell instanceof CodeCell)) {
        continue;
      }
      const outputs = cell.outputArea.model;
      for (let outputIndex = 0; outputIndex < outputs.length; outputIndex++) {
        const verdict = await this._verdict(outputs.get(outputIndex));
        if (verdict && verdict.findings.length > 0 && !verdict.review) {
          flagged.push({ cellIndex, outputIndex, findings: verdict.findings });
        }
      }
    }
    return flagged;
  }

  private _watchNotebook(panel: NotebookPanel): void {
    const notebook = panel.content;
    const watchAll = () => {
      for (const cell of notebook.widgets) {
        if (cell instanceof CodeCell) {
          this._watchCell(panel, cell);
        }
      }
    };
    notebook.modelChanged.connect(watchAll);
    notebook.model?.cells.changed.connect(() =>
      requestAnimationFrame(watchAll)
    );
    notebook.modelChanged.connect(() =>
      notebook.model?.cells.changed.connect(() =>
        requestAnimationFrame(watchAll)
      )
    );
    void panel.context.ready.then(watchAll);
    watchAll();
  }

  private _watchCell(panel: NotebookPanel, cell: CodeCell): void {
    if (this._watched.has(cell)) {
      return;
    }
    this._watched.add(cell);
    const schedule = () => this._schedule(panel, cell);
    cell.outputArea.model.changed.connect(schedule);
    cell.outputArea.model.stateChanged.connect(schedule);
    schedule();
  }

  /**
   * Coalesce bursts of output messages into one check, run before the browser
   * renders (a microtask), so a kernel's verdict is drawn with the output itself.
   */
  private _schedule(panel: NotebookPanel, cell: CodeCell): void {
    if (this._pending.has(cell)) {
      return;
    }
    this._pending.add(cell);
    void Promise.resolve().then(() => {
      this._pending.delete(cell);
      if (!cell.isDisposed) {
        void this._check(panel, cell);
      }
    });
  }

  private async _check(panel: NotebookPanel, cell: CodeCell): Promise<void> {
    const area = cell.outputArea;
    const count = area.model.length;
    for (let index = 0; index < count; index++) {
      const model = area.model.get(index);
      const child = area.widgets[index];
      if (!model || !child) {
        continue;
      }
      const verdict = await this._verdict(model);
      // The output may have changed while the server was asked.
      if (cell.isDisposed || area.model.get(index) !== model) {
        return;
      }
      this._draw(panel, cell, index, child, verdict);
    }
  }

  private _draw(
    panel: NotebookPanel,
    cell: CodeCell,
    index: number,
    child: Widget,
    verdict: IVerdict | null
  ): void {
    const previous = child.node.querySelector(':scope > .jp-DUAGuard-banner');
    const findings = verdict?.findings ?? [];
    const key = JSON.stringify([findings, verdict?.review ?? null]);
    if (previous && previous.getAttribute('data-key') === key) {
      return;
    }
    previous?.remove();
    child.removeClass(FLAGGED_CLASS);
    child.removeClass('jp-DUAGuard-hasBanner');
    if (findings.length === 0) {
      return;
    }
    const banner = createBanner(
      findings,
      {
        clear: () => clearOutput(cell, index),
        review: () => void this._review(panel, cell, index, findings)
      },
      verdict?.review
    );
    banner.setAttribute('data-key', key);
    child.addClass('jp-DUAGuard-hasBanner');
    if (!verdict?.review) {
      child.addClass(FLAGGED_CLASS);
    }
    child.node.insertBefore(banner, child.node.firstChild);
  }

  /** The guard's verdict on an output: its metadata, else the server's detector. */
  private _verdict(model: IOutputModel): Promise<IVerdict | null> {
    const stored = verdictOf(model.metadata);
    if (stored) {
      return Promise.resolve(stored);
    }
    if (!TABULAR.some(mime => mime in model.data) && model.type !== 'stream') {
      return Promise.resolve(null);
    }
    let pending = this._remote.get(model);
    if (!pending) {
      pending = requestAPI<{ findings: IFinding[] }>('detect', {
        method: 'POST',
        body: JSON.stringify({ output: trimmed(model.toJSON()) })
      })
        .then(answer => ({ findings: answer.findings ?? [] }))
        .catch(error => {
          console.warn(
            'jupyter-dua-guard: the server could not check an output',
            error
          );
          return null;
        });
      this._remote.set(model, pending);
    }
    return pending;
  }

  private async _review(
    panel: NotebookPanel,
    cell: CodeCell,
    index: number,
    findings: IFinding[]
  ): Promise<void> {
    const body = new ReviewForm();
    const result = await showDialog({
      title: 'Mark this output as reviewed',
      body,
      buttons: [
        Dialog.cancelButton(),
        Dialog.okButton({ label: 'Mark as reviewed' })
      ],
      focusNodeSelector: 'textarea'
    });
    const reason = body.reason;
    if (!result.button.accept) {
      return;
    }
    if (!reason) {
      await showDialog({
        title: 'A reason is needed',
        body: 'The ledger records who reviewed the output and why it may stay.',
        buttons: [Dialog.okButton()]
      });
      return;
    }
    const review = await requestAPI<IReview>('reviews', {
      method: 'POST',
      body: JSON.stringify({
        path: panel.context.path,
        cell_id: cell.model.id,
        output_index: index,
        findings: findings.map(f => ({
          kind: f.kind,
          confidence: f.confidence
        })),
        reason
      })
    });
    const output = cell.outputArea.model
      .get(index)
      .toJSON() as nbformat.IOutput;
    const metadata = { ...((output.metadata as object) ?? {}) } as any;
    metadata[METADATA_KEY] = { findings, review };
    cell.outputArea.model.set(index, {
      ...output,
      metadata
    } as nbformat.IOutput);
  }

  private _watched = new WeakSet<CodeCell>();
  private _pending = new WeakSet<CodeCell>();
  private _remote = new WeakMap<IOutputModel, Promise<IVerdict | null>>();
}

/** The detector reads at most this much of each mime type; send no more. */
const MAX_SENT_CHARS = 256 * 1024;

/** An output with long text cut to what the server's detector reads. */
function trimmed(output: nbformat.IOutput): nbformat.IOutput {
  const cut = (value: unknown): unknown =>
    typeof value === 'string' && value.length > MAX_SENT_CHARS
      ? value.slice(0, MAX_SENT_CHARS)
      : Array.isArray(value)
        ? cut(value.join(''))
        : value;
  const copy: any = { ...output };
  if (copy.text !== undefined) {
    copy.text = cut(copy.text);
  }
  if (copy.data) {
    copy.data = Object.fromEntries(
      Object.entries(copy.data).map(([mime, value]) => [mime, cut(value)])
    );
  }
  return copy as nbformat.IOutput;
}

/** Remove one output of a cell and keep the others. */
export function clearOutput(cell: CodeCell, index: number): void {
  const model = cell.outputArea.model;
  const kept = model.toJSON().filter((_, i) => i !== index);
  model.clear();
  model.fromJSON(kept);
}

/** The body of the review dialog: why this output may stay. */
class ReviewForm extends Widget {
  constructor() {
    super({ node: document.createElement('div') });
    const label = document.createElement('label');
    label.textContent =
      'Why may this output stay? Your name, the time and your reason are recorded ' +
      'in the DUA ledger (no data values).';
    this._text = document.createElement('textarea');
    this._text.rows = 3;
    this._text.className = 'jp-DUAGuard-review-reason';
    this._text.setAttribute('aria-label', 'Review reason');
    label.appendChild(this._text);
    this.node.appendChild(label);
  }

  get reason(): string {
    return this._text.value.trim();
  }

  private _text: HTMLTextAreaElement;
}
