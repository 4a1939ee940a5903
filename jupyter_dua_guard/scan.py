"""``jupyter dua-guard scan``: run the output detector over notebooks before they leave.

Used directly, by the pre-commit hook (``.pre-commit-hooks.yaml``) and by ``review``. Exit
status: 0 clean, 1 something flagged, 2 some input could not be read (each unreadable file is
named on one line and the other files are still scanned).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import nbformat
from jupyter_core.application import JupyterApp
from traitlets import Bool
from traitlets.log import get_logger

from ._version import __version__
from .config import DUAGuard, SettingsError
from .detect import DetectorSettings, Finding, VocabularyError, detect_output, summarize

EXIT_CLEAN, EXIT_FLAGGED, EXIT_UNREADABLE = 0, 1, 2
_SKIP_DIRS = {".ipynb_checkpoints", "node_modules", "__pycache__", ".git", ".venv", "venv"}


class NotebookError(Exception):
    """A notebook cannot be scanned; the message is one line naming the problem and the fix."""


@dataclass
class NotebookResult:
    """Findings of one notebook, or the reason it could not be read."""

    path: str
    findings: list[Finding] = field(default_factory=list)
    error: str | None = None

    @property
    def status(self) -> str:
        if self.error:
            return "unreadable"
        return "flagged" if self.findings else "clean"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.path,
            "status": self.status,
            "findings": [f.to_dict() for f in self.findings],
            "summary": summarize(self.findings),
        }
        if self.error:
            out["error"] = self.error
        return out


def iter_notebooks(paths: Iterable[str | os.PathLike[str]]) -> Iterator[tuple[Path, str | None]]:
    """Notebook files under ``paths`` (files as given, folders searched for ``*.ipynb``)."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = []
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
                found.extend(Path(root, f) for f in sorted(files) if f.endswith(".ipynb"))
            yield from ((p, None) for p in found)
        elif path.exists():
            yield path, None
        else:
            yield path, "no such file or folder; check the path"


def read_notebook(path: Path) -> tuple[dict[str, Any], bytes]:
    """Read and check a notebook; raise NotebookError with a one-line reason.

    nbformat 4 notebooks are parsed as plain JSON and checked for what the scan needs (cells,
    outputs, output types); older formats go through nbformat's reader and converter. Full
    JSON-schema validation is skipped on purpose: it costs more than the scan itself, and a
    notebook with, say, a stray metadata key still has outputs that must be checked.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise NotebookError(
            f"cannot read file ({exc.strerror or exc}); check permissions"
        ) from None
    if not raw:
        raise NotebookError("empty file (0 bytes), not a notebook; restore it or delete it")
    if b"\x00" in raw[:8192]:
        raise NotebookError("binary file, not a notebook (.ipynb is JSON text); remove it")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise NotebookError("not UTF-8 text, not a notebook (.ipynb is JSON text)") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise NotebookError(
            f"invalid JSON ({exc}); repair or re-save the notebook in JupyterLab"
        ) from None
    if not isinstance(data, dict):
        raise NotebookError("not a notebook (the JSON is not an object with 'cells')")
    major = data.get("nbformat")
    if major == 4:
        nb = data
    elif major in (1, 2, 3):
        nb = _convert_old(text)
    else:
        shown = "missing" if major is None else repr(major)
        raise NotebookError(
            f"unsupported notebook format (nbformat version {shown}); open and re-save it in "
            "JupyterLab (nbformat 4) before scanning"
        )
    _check_structure(nb)
    return nb, raw


def _convert_old(text: str) -> Any:
    """nbformat 1-3 notebooks, converted to version 4 by nbformat itself."""
    log = get_logger()
    level = log.level
    log.setLevel(logging.CRITICAL)  # nbformat logs schema problems; we report our own line
    try:
        return nbformat.reads(text, as_version=4)
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0][:120]
        raise NotebookError(
            f"old notebook format could not be converted ({first}); re-save it in JupyterLab"
        ) from None
    finally:
        log.setLevel(level)


def _check_structure(nb: Any) -> None:
    """The parts the detector needs; nbformat only logs these schema problems."""
    cells = nb.get("cells") if isinstance(nb, dict) else None
    if not isinstance(cells, list):
        raise NotebookError("no 'cells' list; this is not an nbformat 4 notebook")
    fix = "re-save the notebook in JupyterLab or repair the JSON"
    for i, cell in enumerate(cells, 1):
        if not isinstance(cell, dict) or "cell_type" not in cell:
            raise NotebookError(f"cell {i} has no 'cell_type'; {fix}")
        if cell["cell_type"] != "code":
            continue
        outputs = cell.get("outputs")
        if not isinstance(outputs, list):
            raise NotebookError(f"code cell {i} has no 'outputs' list (missing outputs key); {fix}")
        for j, out in enumerate(outputs, 1):
            if not isinstance(out, dict) or "output_type" not in out:
                raise NotebookError(f"cell {i} output {j} has no 'output_type'; {fix}")


def scan_notebook_node(
    nb: Any,
    *,
    settings: DetectorSettings | None = None,
    notebook: str | None = None,
    skip_reviewed: bool = False,
) -> list[Finding]:
    """Findings of every output of an already-read notebook.

    ``skip_reviewed`` leaves out outputs that a reviewer marked as reviewed in JupyterLab
    (their metadata carries the review), as the export guard does.
    """
    settings = settings or DetectorSettings()
    findings: list[Finding] = []
    for ci, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        for oi, out in enumerate(cell.get("outputs") or []):
            if skip_reviewed and _reviewed(out):
                continue
            loc: dict[str, Any] = {"cell": ci, "output": oi}
            if notebook is not None:
                loc = {"notebook": notebook, **loc}
            if cell.get("id"):
                loc["cell_id"] = cell["id"]
            try:
                findings.extend(detect_output(out, settings=settings, location=loc))
            except Exception as exc:  # a detector bug must not hide the other outputs
                raise NotebookError(
                    f"cell {ci + 1} output {oi + 1} could not be checked "
                    f"({exc.__class__.__name__}); please report this output's format"
                ) from None
    return findings


def _reviewed(output: Any) -> bool:
    verdict = (output.get("metadata") or {}).get("jupyter_dua_guard")
    return isinstance(verdict, dict) and isinstance(verdict.get("review"), dict)


def content_hash(raw: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(raw).hexdigest()


def scan_path(path: Path, settings: DetectorSettings | None = None) -> NotebookResult:
    """Read and scan one notebook; errors become ``NotebookResult.error``."""
    try:
        nb, _raw = read_notebook(path)
    except NotebookError as exc:
        return NotebookResult(str(path), error=str(exc))
    try:
        findings = scan_notebook_node(nb, settings=settings, notebook=str(path))
    except NotebookError as exc:
        return NotebookResult(str(path), error=str(exc))
    return NotebookResult(str(path), findings)


def scan_paths(
    paths: Sequence[str | os.PathLike[str]], settings: DetectorSettings | None = None
) -> list[NotebookResult]:
    settings = settings or DetectorSettings()
    results = []
    for path, problem in iter_notebooks(paths):
        if problem:
            results.append(NotebookResult(str(path), error=problem))
        else:
            results.append(scan_path(path, settings))
    return results


def exit_status(results: Sequence[NotebookResult]) -> int:
    if any(r.error for r in results):
        return EXIT_UNREADABLE
    return EXIT_FLAGGED if any(r.findings for r in results) else EXIT_CLEAN


def format_table(results: Sequence[NotebookResult]) -> str:
    """Findings by notebook, cell and output (numbers count from 1, as JupyterLab shows)."""
    lines = []
    for r in results:
        if r.error:
            continue
        for f in r.findings:
            loc = f.location
            where = f"cell {loc.get('cell', 0) + 1}, output {loc.get('output', 0) + 1}"
            lines.append(
                f"{r.path}: {where}: {f.kind} ({f.confidence:.2f}): " + "; ".join(f.reasons)
            )
    n_flag = sum(r.status == "flagged" for r in results)
    n_bad = sum(r.status == "unreadable" for r in results)
    n_clean = sum(r.status == "clean" for r in results)
    lines.append(
        f"{len(results)} notebook(s) scanned: {n_flag} flagged, {n_clean} clean, {n_bad} unreadable"
    )
    return "\n".join(lines)


class ScanApp(JupyterApp):
    """``jupyter dua-guard scan PATH...``"""

    name = "jupyter-dua-guard-scan"
    version = __version__
    description = (
        "Scan notebooks (files or folders) for outputs that show individual-level data, small "
        "cells or direct identifiers (DUA sec. 17/8). Exit 0 clean, 1 flagged, 2 unreadable "
        "input. Cell and output numbers count from 1."
    )
    examples = "jupyter dua-guard scan analysis/ --json"
    classes: ClassVar[list] = [DUAGuard]
    config_file_name = "jupyter_server_config"

    json_output = Bool(False, help="Print findings as JSON instead of a table.").tag(config=True)

    flags: ClassVar[dict] = {
        **JupyterApp.flags,
        "json": ({"ScanApp": {"json_output": True}}, "Print findings as JSON."),
    }

    def start(self) -> None:
        if not self.extra_args:
            print("jupyter dua-guard scan: give one or more notebooks or folders", file=sys.stderr)
            self.exit(EXIT_UNREADABLE)
        try:
            settings = DetectorSettings.from_guard(DUAGuard.load(self))
        except (VocabularyError, SettingsError) as exc:
            print(f"jupyter dua-guard scan: {exc}", file=sys.stderr)
            self.exit(EXIT_UNREADABLE)
        results = scan_paths(self.extra_args, settings)
        for r in results:
            if r.error:
                print(f"{r.path}: unreadable: {r.error}", file=sys.stderr)
        if self.json_output:
            print(
                json.dumps(
                    {
                        "notebooks": [r.to_dict() for r in results],
                        "summary": {
                            "scanned": len(results),
                            "flagged": sum(r.status == "flagged" for r in results),
                            "clean": sum(r.status == "clean" for r in results),
                            "unreadable": sum(r.status == "unreadable" for r in results),
                        },
                    },
                    indent=1,
                )
            )
        else:
            print(format_table(results))
        self.exit(exit_status(results))
