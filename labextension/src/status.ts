import { Poll } from '@lumino/polling';
import { Widget } from '@lumino/widgets';

import { requestAPI } from './request';

/**
 * What `GET /dua-guard/api/status` answers.
 */
export interface IGuardStatus {
  version: string;
  active: boolean;
}

/** How often the status item asks the server again. */
const REFRESH_MS = 30 * 1000;

/**
 * The "DUA guard: on" item, shown in JupyterLab's status bar or, where there is
 * no status bar (Notebook 7), in the top area.
 */
export class GuardStatusItem extends Widget {
  constructor() {
    super();
    this.addClass('jp-DUAGuard-status');
    this.node.setAttribute('role', 'status');
    this.node.title = 'NCCR / SEER Data Use Agreement guard';
    this._render('DUA guard: …', 'pending');
    this._poll = new Poll({
      factory: () => this.refresh(),
      frequency: { interval: REFRESH_MS, backoff: true, max: 5 * REFRESH_MS },
      name: 'jupyter-dua-guard:status',
      standby: 'when-hidden'
    });
  }

  /** Ask the server for the guard's state and show it. */
  async refresh(): Promise<void> {
    try {
      const status = await requestAPI<IGuardStatus>('status');
      this._render(
        status.active ? 'DUA guard: on' : 'DUA guard: off',
        status.active ? 'on' : 'off'
      );
      this.node.title = `jupyter-dua-guard ${status.version}: ${
        status.active
          ? 'external AI services are refused and AI/ML use is recorded'
          : 'the guard is switched off on this server'
      }`;
    } catch (error) {
      this._render('DUA guard: unknown', 'unknown');
      this.node.title = `The DUA guard status could not be read: ${error}`;
      throw error;
    }
  }

  dispose(): void {
    this._poll.dispose();
    super.dispose();
  }

  private _render(text: string, state: string): void {
    this.node.textContent = text;
    this.node.dataset.state = state;
  }

  private _poll: Poll;
}
