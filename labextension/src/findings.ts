import {
  PartialJSONObject,
  ReadonlyPartialJSONObject
} from '@lumino/coreutils';

/** Key under which the guard stores its verdict in an output's metadata. */
export const METADATA_KEY = 'jupyter_dua_guard';

/**
 * One reason an output must not leave the secure environment, as the detector
 * reports it. Findings never carry data values, only plain reasons.
 */
export interface IFinding {
  kind: string;
  confidence: number;
  reasons: string[];
  location?: { [key: string]: unknown };
}

/** Who reviewed a flagged output, and why it may stay. */
export interface IReview {
  reviewer: string;
  reason: string;
  time: string;
}

/** The guard's verdict on one output, as stored in its metadata. */
export interface IVerdict {
  findings: IFinding[];
  review?: IReview;
}

/** Plain-language titles and the agreement section behind each kind. */
export const KINDS: {
  [kind: string]: { title: string; section: string; why: string };
} = {
  individual_level: {
    title: 'Individual-level data',
    section: 'NCCR DUA sec. 17 and 8',
    why:
      'This output looks like one row per person (a case listing). Rows about ' +
      'individuals must never be published or copied out of the secure ' +
      'environment, and must not be pasted into AI tools (sec. 22).'
  },
  small_cells: {
    title: 'Small cells',
    section: 'NCCR DUA sec. 17; NIH small-cell-size policy',
    why:
      'This aggregate table has counts below the suppression threshold. Small ' +
      'counts can identify people; suppress or combine them before the table ' +
      'leaves the secure environment.'
  },
  direct_identifier: {
    title: 'Direct identifiers',
    section: 'NCCR DUA sec. 17 and 8',
    why:
      'This output contains values that look like names, dates of birth, ' +
      'record numbers or e-mail addresses. They identify people directly.'
  }
};

/** The findings of a known kind, or an empty list. */
function asFindings(value: unknown): IFinding[] {
  if (!Array.isArray(value)) {
    return [];
  }
  return value.filter(
    (item): item is IFinding =>
      typeof item === 'object' &&
      item !== null &&
      typeof (item as IFinding).kind === 'string' &&
      Array.isArray((item as IFinding).reasons)
  );
}

/**
 * The verdict stored in an output's metadata, or `null` when the output was
 * never checked (for instance it came from a kernel without the guard).
 */
export function verdictOf(
  metadata: ReadonlyPartialJSONObject
): IVerdict | null {
  const stored = metadata[METADATA_KEY] as PartialJSONObject | undefined;
  if (!stored || typeof stored !== 'object') {
    return null;
  }
  const verdict: IVerdict = { findings: asFindings(stored.findings) };
  const review = stored.review as unknown as IReview | undefined;
  if (review && typeof review.reviewer === 'string') {
    verdict.review = review;
  }
  return verdict;
}

/** Summary line for a list of findings, e.g. "Individual-level data, Small cells". */
export function titleOf(findings: IFinding[]): string {
  const titles = new Set(findings.map(f => KINDS[f.kind]?.title ?? f.kind));
  return Array.from(titles).join(', ');
}

/** The agreement sections that the findings fall under, without repeats. */
export function sectionsOf(findings: IFinding[]): string {
  const sections = new Set(
    findings.map(f => KINDS[f.kind]?.section ?? 'NCCR DUA sec. 17')
  );
  return Array.from(sections).join('; ');
}
