import { INotebookTracker } from '@jupyterlab/notebook';
import { Poll } from '@lumino/polling';
import { Widget } from '@lumino/widgets';

import { fetchEvents, fetchStatus, IGuardStatus } from './api';

/** How often the status item asks the server again. */
const REFRESH_MS = 15 * 1000;

/**
 * The "DUA guard: on" item, shown in JupyterLab's status bar or, where there is
 * no status bar (Notebook 7), in the top area. With a notebook open it also
 * counts the blocked attempts and AI/ML imports of that notebook's kernel.
 */
export class GuardStatusItem extends Widget {
  constructor(tracker: INotebookTracker | null, onClick: () => void) {
    super({ node: document.createElement('button') });
    this._tracker = tracker;
    this.addClass('jp-DUAGuard-status');
    this.node.setAttribute('type', 'button');
    this.node.setAttribute('aria-live', 'polite');
    this._state = document.createElement('span');
    this._state.className = 'jp-DUAGuard-state';
    this._counts = document.createElement('span');
    this._counts.className = 'jp-DUAGuard-counts';
    this.node.append(this._state, this._counts);
    this.node.addEventListener('click', onClick);
    this._render('DUA guard: …', 'pending');
    this._poll = new Poll({
      factory: () => this.refresh(),
      frequency: { interval: REFRESH_MS, backoff: true, max: 5 * REFRESH_MS },
      name: 'jupyter-dua-guard:status',
      standby: 'when-hidden'
    });
    tracker?.currentChanged.connect(() => void this._poll.refresh());
  }

  /** The last status the server gave, if any. */
  get status(): IGuardStatus | null {
    return this._status;
  }

  /** Ask again now, for instance after a cell ran. */
  refreshSoon(): void {
    void this._poll.refresh();
  }

  /** Ask the server for the guard's state and this kernel's counts, and show them. */
  async refresh(): Promise<void> {
    try {
      this._status = await fetchStatus();
    } catch (error) {
      this._render('DUA guard: unknown', 'unknown');
      this.node.title = `The DUA guard status could not be read: ${error}`;
      throw error;
    }
    const active = this._status.active;
    this._render(
      active ? 'DUA guard: on' : 'DUA guard: off',
      active ? 'on' : 'off'
    );
    this.node.title = `jupyter-dua-guard ${this._status.version}: ${
      active
        ? 'external AI services are refused and AI/ML use is recorded. Click for the ledger.'
        : 'the guard is switched off on this server'
    }`;
    await this._refreshCounts();
  }

  dispose(): void {
    this._poll.dispose();
    super.dispose();
  }

  private async _refreshCounts(): Promise<void> {
    const kernel =
      this._tracker?.currentWidget?.sessionContext.session?.kernel?.id;
    if (!kernel) {
      this._counts.textContent = '';
      return;
    }
    const page = await fetchEvents({
      kernel,
      kind: ['egress_blocked', 'ai_ml_import'],
      limit: 1000
    });
    const blocked = page.events.filter(e => e.kind === 'egress_blocked').length;
    const imports = page.events.filter(e => e.kind === 'ai_ml_import').length;
    this._counts.textContent = `· ${blocked} blocked · ${imports} AI/ML`;
    this._counts.title = `${blocked} blocked connection attempt(s) and ${imports} AI/ML import(s) recorded for this kernel`;
  }

  private _render(text: string, state: string): void {
    this._state.textContent = text;
    this.node.dataset.state = state;
  }

  private _tracker: INotebookTracker | null;
  private _status: IGuardStatus | null = null;
  private _state: HTMLSpanElement;
  private _counts: HTMLSpanElement;
  private _poll: Poll;
}
