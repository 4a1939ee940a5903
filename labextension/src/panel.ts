import { URLExt } from '@jupyterlab/coreutils';
import { INotebookTracker } from '@jupyterlab/notebook';
import { ServerConnection } from '@jupyterlab/services';
import { Widget } from '@lumino/widgets';

import { fetchEvents, fetchStatus, ILedgerEvent } from './api';

/** Plain titles for the ledger's event kinds. */
const EVENT_TITLES: { [kind: string]: string } = {
  kernel_started: 'Kernel started',
  ai_ml_import: 'AI/ML library imported',
  egress_blocked: 'Blocked connection',
  egress_allowed_ai: 'Approved AI service used',
  model_artifact_written: 'Model file written',
  data_read: 'Registry data read',
  output_flagged: 'Output flagged',
  review_signed: 'Review signed',
  guard_defaults_used: 'Guard ran on defaults'
};

/** One line of detail for an event, from its data fields (never data values). */
function describe(event: ILedgerEvent): string {
  const d = event.data;
  switch (event.kind) {
    case 'ai_ml_import':
      return `${d.distribution ?? d.name} ${d.version ?? ''}`.trim();
    case 'egress_blocked':
    case 'egress_allowed_ai':
      return `${d.host}${d.port ? `:${d.port}` : ''}`;
    case 'model_artifact_written':
    case 'data_read':
      return String(d.path ?? '');
    case 'review_signed':
      return `${d.reviewer ?? ''} ${d.decision ?? ''}`.trim();
    default:
      return '';
  }
}

/**
 * The "DUA Guard" side panel: the ledger's recent events for the current
 * notebook, the records report, and the AI assistants found in this JupyterLab.
 */
export class GuardPanel extends Widget {
  constructor(tracker: INotebookTracker | null) {
    super();
    this._tracker = tracker;
    this.id = 'jp-DUAGuard-panel';
    this.addClass('jp-DUAGuard-panel');
    this.title.label = 'DUA Guard';
    this.title.caption = 'NCCR / SEER Data Use Agreement guard';
    this.node.setAttribute('role', 'region');
    this.node.setAttribute('aria-label', 'DUA Guard');
    tracker?.currentChanged.connect(
      () => this.isVisible && void this.refresh()
    );
  }

  /** Read the ledger and the status again and redraw. */
  async refresh(): Promise<void> {
    const current = this._tracker?.currentWidget;
    const path = current?.context.path;
    const kernel = current?.sessionContext.session?.kernel?.id;
    // The notebook's own events, and its kernel's: a kernel keeps the notebook name it was
    // started with, so after a rename its events are found through the kernel id.
    const [status, byPath, byKernel] = await Promise.all([
      fetchStatus(),
      path ? fetchEvents({ notebook: path, order: 'desc', limit: 50 }) : null,
      kernel ? fetchEvents({ kernel, order: 'desc', limit: 50 }) : null
    ]);
    const merged = new Map<number, ILedgerEvent>();
    for (const event of [
      ...(byPath?.events ?? []),
      ...(byKernel?.events ?? [])
    ]) {
      merged.set(event.seq, event);
    }
    const page = {
      events: Array.from(merged.values())
        .sort((a, b) => b.seq - a.seq)
        .slice(0, 50)
    };
    this.node.replaceChildren();

    const heading = document.createElement('h2');
    heading.textContent = `DUA guard ${status.active ? 'on' : 'off'} (v${status.version})`;
    this.node.appendChild(heading);

    const report = document.createElement('a');
    report.className = 'jp-DUAGuard-report-link';
    report.textContent = 'Download the records report (HTML)';
    report.href = URLExt.join(
      ServerConnection.makeSettings().baseUrl,
      'dua-guard/api/report?format=html'
    );
    report.setAttribute('download', 'dua-guard-report.html');
    this.node.appendChild(report);

    const events = document.createElement('section');
    const eventsTitle = document.createElement('h3');
    eventsTitle.textContent = path
      ? `Recent events for ${path}`
      : 'Recent events';
    events.appendChild(eventsTitle);
    const list = document.createElement('ol');
    list.className = 'jp-DUAGuard-events';
    for (const event of page.events) {
      const item = document.createElement('li');
      item.dataset.kind = event.kind;
      const time = new Date(event.time).toLocaleString();
      item.textContent = `${time} — ${EVENT_TITLES[event.kind] ?? event.kind} ${describe(event)}`;
      list.appendChild(item);
    }
    if (page.events.length === 0) {
      const empty = document.createElement('li');
      empty.textContent = 'No events recorded yet.';
      list.appendChild(empty);
    }
    events.appendChild(list);
    this.node.appendChild(events);

    const assistants = document.createElement('section');
    const assistantsTitle = document.createElement('h3');
    assistantsTitle.textContent = 'AI assistants in this JupyterLab';
    assistants.appendChild(assistantsTitle);
    const found = status.ai_extensions ?? [];
    const aiList = document.createElement('ul');
    aiList.className = 'jp-DUAGuard-ai-extensions';
    for (const ext of found) {
      const item = document.createElement('li');
      item.textContent = `${ext.name} (${ext.kind}): ${
        ext.disabled ? 'disabled by the guard' : 'ACTIVE — approved by the site'
      }`;
      aiList.appendChild(item);
    }
    if (found.length === 0) {
      const none = document.createElement('li');
      none.textContent = 'None found.';
      aiList.appendChild(none);
    }
    assistants.appendChild(aiList);
    this.node.appendChild(assistants);
  }

  protected onAfterShow(): void {
    void this.refresh();
  }

  private _tracker: INotebookTracker | null;
}
