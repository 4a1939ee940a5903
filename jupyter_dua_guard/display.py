"""IPython extension: findings travel with the output, and flagged outputs are recorded.

``%load_ext jupyter_dua_guard.display`` (the kernel guard loads it in guarded kernels) wraps
IPython's display formatter, so every ``display()`` and every cell result is checked by the
detector with the object itself at hand (exact row counts and class sizes for pandas / polars).
Findings go into the output metadata under ``"jupyter_dua_guard"`` -- the lab extension reads
them there without a second round trip -- and an ``output_flagged`` event goes to the ledger.
Neither contains data values.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any

from .detect import DetectorSettings, Finding, detect_bundle

METADATA_KEY = "jupyter_dua_guard"
_SKIP_MIME = ("image/", "video/", "audio/", "application/pdf")


class OutputGuard:
    """Wraps ``shell.display_formatter.format``; one per shell."""

    def __init__(self, shell: Any, settings: DetectorSettings | None = None) -> None:
        self.shell = shell
        self.settings = settings or _settings_from_policy()
        self.original: Callable[..., Any] = shell.display_formatter.format
        self.cell_id: str | None = None
        self._ledger: Any = None
        self._ledger_failed = False

    # -- IPython hooks
    def install(self) -> None:
        self.shell.display_formatter.format = self.format
        self.shell.events.register("pre_run_cell", self._pre_run_cell)

    def uninstall(self) -> None:
        self.shell.display_formatter.format = self.original
        with contextlib.suppress(ValueError):
            self.shell.events.unregister("pre_run_cell", self._pre_run_cell)
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    def _pre_run_cell(self, info: Any = None) -> None:
        self.cell_id = getattr(info, "cell_id", None)

    def format(self, obj: Any, include: Any = None, exclude: Any = None) -> tuple[dict, dict]:
        data, metadata = self.original(obj, include=include, exclude=exclude)
        try:
            findings = self.check(obj, data)
        except Exception as exc:  # the detector must never break a researcher's display
            print(
                f"jupyter-dua-guard: output not checked ({exc.__class__.__name__})", file=sys.stderr
            )
            return data, metadata
        if findings or _is_table(obj, data):
            # A clean table carries its (empty) verdict too, so the page trusts the kernel's
            # exact check of the object instead of asking the server to re-read the HTML.
            metadata = dict(metadata or {})
            metadata[METADATA_KEY] = {
                "findings": [f.to_dict() for f in findings],
                "kinds": sorted({f.kind for f in findings}),
            }
        if findings:
            self.record(findings)
        return data, metadata

    # -- detection and recording
    def check(self, obj: Any, data: dict[str, Any]) -> list[Finding]:
        bundle = {k: v for k, v in (data or {}).items() if not k.startswith(_SKIP_MIME)}
        if not bundle:
            return []
        location: dict[str, Any] = {"execution_count": getattr(self.shell, "execution_count", None)}
        if self.cell_id:
            location["cell_id"] = self.cell_id
        return detect_bundle(bundle, obj=obj, settings=self.settings, location=location)

    def record(self, findings: list[Finding]) -> None:
        if self._ledger_failed:
            return
        from .events import OUTPUT_FLAGGED
        from .ledger import LedgerError, open_ledger

        try:
            if self._ledger is None:
                self._ledger = open_ledger()
            self._ledger.append(
                OUTPUT_FLAGGED,
                {
                    "rule": ",".join(sorted({f.kind for f in findings})),
                    "cell": self.cell_id or getattr(self.shell, "execution_count", None),
                    "detail": " | ".join(r for f in findings for r in f.reasons),
                    "findings": [f.to_dict() for f in findings],
                },
            )
        except (LedgerError, OSError) as exc:
            self._ledger_failed = True
            print(f"jupyter-dua-guard: flagged output not recorded: {exc}", file=sys.stderr)


def _settings_from_policy() -> DetectorSettings:
    """Detector settings from the policy file the server writes for guarded kernels.

    Keys (top level or under ``"detector"``): ``min_cell_count``, ``k_anonymity``,
    ``allow_zero_cells``, ``vocabulary_files``, ``extra_case_variables``. Missing file or keys:
    the defaults.
    """
    import json
    import os

    from .events import ENV_POLICY

    path = os.environ.get(ENV_POLICY)
    if not path:
        return DetectorSettings()
    try:
        with open(path, encoding="utf-8") as fh:
            policy = json.load(fh)
    except (OSError, ValueError) as exc:
        print(
            f"jupyter-dua-guard: policy file {path} unreadable ({exc.__class__.__name__}); "
            "using detector defaults",
            file=sys.stderr,
        )
        return DetectorSettings()
    detector = policy.get("detector", policy) if isinstance(policy, dict) else {}
    settings = DetectorSettings()
    for key in ("min_cell_count", "k_anonymity"):
        if isinstance(detector.get(key), int) and detector[key] >= 0:
            setattr(settings, key, detector[key])
    if isinstance(detector.get("allow_zero_cells"), bool):
        settings.allow_zero_cells = detector["allow_zero_cells"]
    files = detector.get("vocabulary_files") or []
    extra = detector.get("extra_case_variables") or []
    if files or extra:
        from .detect import Vocabulary, VocabularyError

        try:
            settings.vocabulary = Vocabulary.from_files(
                [str(f) for f in files], [str(x) for x in extra]
            )
        except VocabularyError as exc:
            print(f"jupyter-dua-guard: {exc}; using the built-in vocabulary", file=sys.stderr)
    return settings


_GUARDS: dict[int, OutputGuard] = {}


def load_ipython_extension(ip: Any) -> None:
    """Entry point of ``%load_ext jupyter_dua_guard.display``; loading twice is harmless."""
    if id(ip) in _GUARDS:
        return
    guard = OutputGuard(ip)
    guard.install()
    _GUARDS[id(ip)] = guard


def unload_ipython_extension(ip: Any) -> None:
    guard = _GUARDS.pop(id(ip), None)
    if guard is not None:
        guard.uninstall()


def _is_table(obj: Any, data: dict[str, Any] | None) -> bool:
    """Whether a display shows a table (a data frame, or HTML with a <table>)."""
    if type(obj).__name__ in ("DataFrame", "Series", "LazyFrame", "Styler"):
        return True
    html = (data or {}).get("text/html")
    return isinstance(html, str) and "<table" in html[:4096].lower()
