"""``jupyter dua-guard review``: sign the human review of a notebook's outputs (DUA sec. 22).

The ``review_signed`` event binds the decision to the notebook's exact content (SHA-256 of the
file) and to what the detector found at that moment, so a later edit is visibly unreviewed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, ClassVar

from jupyter_core.application import JupyterApp
from traitlets import Unicode

from ._version import __version__
from .config import DUAGuard, SettingsError
from .detect import DetectorSettings, Finding, VocabularyError, summarize
from .scan import NotebookError, content_hash, read_notebook, scan_notebook_node

DECISIONS = ("approve", "reject")


class ReviewError(Exception):
    """The review cannot be recorded; the message is one line with the fix."""


def review_data(
    path: Path,
    reviewer: str,
    decision: str,
    comment: str = "",
    settings: DetectorSettings | None = None,
) -> dict[str, Any]:
    """The ``review_signed`` event data for ``path`` (no data values, only findings' shape)."""
    if not reviewer.strip():
        raise ReviewError("--reviewer is required: give the reviewer's name")
    if decision not in DECISIONS:
        raise ReviewError(f"--decision must be approve or reject, not {decision!r}")
    try:
        nb, raw = read_notebook(path)
        findings: list[Finding] = scan_notebook_node(nb, settings=settings)
    except NotebookError as exc:
        raise ReviewError(f"{path}: {exc}") from None
    summary = summarize(findings)
    summary["total"] = len(findings)
    return {
        "notebook": str(path.resolve()),
        "content_hash": content_hash(raw),
        "reviewer": reviewer.strip(),
        "decision": decision,
        "comment": comment,
        "findings_summary": summary,
        "flagged_outputs": [
            {
                "kind": f.kind,
                "cell": f.location.get("cell"),
                "cell_id": f.location.get("cell_id"),
                "output": f.location.get("output"),
            }
            for f in findings
        ],
        "scope": "notebook outputs (individual-level data, small cells, direct identifiers)",
        "statement": f"{decision}" + (f": {comment}" if comment else ""),
    }


class ReviewApp(JupyterApp):
    """``jupyter dua-guard review NOTEBOOK --reviewer NAME --decision approve|reject``"""

    name = "jupyter-dua-guard-review"
    version = __version__
    description = (
        "Record that a qualified person reviewed a notebook's outputs before publication "
        "(DUA sec. 22): the notebook's content hash, what the detector finds now, reviewer and "
        "decision go into the ledger as a review_signed event. `jupyter dua-guard report` "
        "lists reviews."
    )
    examples = 'jupyter dua-guard review paper.ipynb --reviewer "Dr. A. Rivera" --decision approve'
    classes: ClassVar[list] = [DUAGuard]
    config_file_name = "jupyter_server_config"

    reviewer = Unicode("", help="Name of the reviewer.").tag(config=True)
    decision = Unicode("", help="approve or reject.").tag(config=True)
    comment = Unicode("", help="Free-text comment of the reviewer.").tag(config=True)

    aliases: ClassVar[dict] = {
        "reviewer": "ReviewApp.reviewer",
        "decision": "ReviewApp.decision",
        "comment": "ReviewApp.comment",
        "ledger": "DUAGuard.ledger_url",
    }

    def fail(self, message: str) -> None:
        print(f"jupyter dua-guard review: error: {message}", file=sys.stderr)
        self.exit(2)

    def start(self) -> None:
        from .events import REVIEW_SIGNED
        from .ledger import LedgerError, open_ledger

        if len(self.extra_args) != 1:
            self.fail("give exactly one notebook: jupyter dua-guard review NOTEBOOK ...")
        path = Path(self.extra_args[0])
        if not path.is_file():
            self.fail(f"{path}: no such notebook; check the path")
        try:
            guard = DUAGuard.load(self)
        except SettingsError as exc:
            self.fail(str(exc))
        try:
            data = review_data(
                path,
                self.reviewer,
                self.decision,
                self.comment,
                DetectorSettings.from_guard(guard),
            )
        except (ReviewError, VocabularyError) as exc:
            self.fail(str(exc))
        try:
            ledger = open_ledger(guard.ledger_url)
            try:
                record = ledger.append(REVIEW_SIGNED, data, context={"notebook": data["notebook"]})
            finally:
                ledger.close()
        except LedgerError as exc:
            self.fail(str(exc))
        s = data["findings_summary"]
        print(
            f"review_signed recorded (record {record.get('seq')}): {data['decision']} by "
            f"{data['reviewer']} for {path} ({data['content_hash'][:19]}…; findings at review: "
            f"{s['individual_level']} individual-level, {s['small_cells']} small-cell, "
            f"{s['direct_identifier']} direct-identifier)"
        )
