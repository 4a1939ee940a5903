import { IFinding, IReview, KINDS, sectionsOf, titleOf } from './findings';

/** What the banner's buttons do; the banner itself only draws. */
export interface IBannerActions {
  clear: () => void;
  review: () => void;
}

let bannerCount = 0;

function button(
  label: string,
  className: string,
  onClick: () => void
): HTMLButtonElement {
  const node = document.createElement('button');
  node.type = 'button';
  node.className = `jp-Button jp-mod-styled jp-DUAGuard-action ${className}`;
  node.textContent = label;
  node.addEventListener('click', event => {
    event.stopPropagation();
    onClick();
  });
  return node;
}

/**
 * The warning drawn above a flagged output: what was found and why, the DUA
 * section, and the actions a researcher can take. Keyboard reachable (plain
 * buttons) and announced to screen readers.
 */
export function createBanner(
  findings: IFinding[],
  actions: IBannerActions,
  review?: IReview
): HTMLElement {
  const id = `jp-DUAGuard-banner-${++bannerCount}`;
  const banner = document.createElement('section');
  banner.className = 'jp-DUAGuard-banner';
  banner.dataset.kinds = Array.from(new Set(findings.map(f => f.kind))).join(
    ' '
  );
  banner.setAttribute('aria-labelledby', `${id}-title`);

  const title = document.createElement('div');
  title.id = `${id}-title`;
  title.className = 'jp-DUAGuard-banner-title';
  title.textContent = review
    ? `Reviewed: ${titleOf(findings)} (${sectionsOf(findings)})`
    : `DUA guard: ${titleOf(findings)} — ${sectionsOf(findings)}`;
  banner.appendChild(title);

  if (review) {
    banner.classList.add('jp-DUAGuard-reviewed');
    banner.setAttribute('role', 'status');
    const note = document.createElement('div');
    note.className = 'jp-DUAGuard-banner-review';
    note.textContent = `Marked as reviewed by ${review.reviewer}: ${review.reason}`;
    banner.appendChild(note);
    return banner;
  }

  banner.setAttribute('role', 'alert');
  const reasons = document.createElement('ul');
  reasons.className = 'jp-DUAGuard-banner-reasons';
  for (const finding of findings) {
    for (const reason of finding.reasons) {
      const item = document.createElement('li');
      item.textContent = reason;
      reasons.appendChild(item);
    }
  }
  banner.appendChild(reasons);

  const why = document.createElement('div');
  why.id = `${id}-why`;
  why.className = 'jp-DUAGuard-banner-why';
  why.hidden = true;
  const kinds = new Set(findings.map(f => f.kind));
  for (const kind of kinds) {
    const paragraph = document.createElement('p');
    paragraph.textContent =
      KINDS[kind]?.why ?? `The guard flagged this output (${kind}).`;
    why.appendChild(paragraph);
  }
  const advice = document.createElement('p');
  advice.textContent =
    'Keep such outputs inside the secure environment: clear the output before ' +
    'sharing the notebook, or have a qualified reviewer mark it as reviewed.';
  why.appendChild(advice);

  const bar = document.createElement('div');
  bar.className = 'jp-DUAGuard-banner-actions';
  bar.appendChild(
    button('Clear this output', 'jp-DUAGuard-clear', actions.clear)
  );
  bar.appendChild(
    button('Mark as reviewed…', 'jp-DUAGuard-review', actions.review)
  );
  const whyButton = button('Why?', 'jp-DUAGuard-why', () => {
    why.hidden = !why.hidden;
    whyButton.setAttribute('aria-expanded', String(!why.hidden));
  });
  whyButton.setAttribute('aria-expanded', 'false');
  whyButton.setAttribute('aria-controls', why.id);
  bar.appendChild(whyButton);
  banner.appendChild(bar);
  banner.appendChild(why);
  return banner;
}
