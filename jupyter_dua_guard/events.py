"""Event kinds of the usage ledger and the context every event carries.

DUA sec. 22 asks for "software versions, usage logs, and locations of processing" of every
AI/ML tool used with the data, so each event records where and in which process it
happened (``current_context()``), while ``data`` says what happened. Stdlib only: guarded
kernels import this module.
"""

from __future__ import annotations

import functools
import getpass
import os
import platform
import socket
import time as _time
from pathlib import Path
from typing import Any

from ._version import __version__

ENV_LEDGER = "JUPYTER_DUA_GUARD_LEDGER"
ENV_POLICY = "JUPYTER_DUA_GUARD_POLICY"
ENV_KERNEL_ID = "JUPYTER_DUA_GUARD_KERNEL_ID"
ENV_NOTEBOOK = "JUPYTER_DUA_GUARD_NOTEBOOK"

KERNEL_STARTED = "kernel_started"
AI_ML_IMPORT = "ai_ml_import"
EGRESS_BLOCKED = "egress_blocked"
EGRESS_ALLOWED_AI = "egress_allowed_ai"
MODEL_ARTIFACT_WRITTEN = "model_artifact_written"
DATA_READ = "data_read"
OUTPUT_FLAGGED = "output_flagged"
REVIEW_SIGNED = "review_signed"
GUARD_DEFAULTS_USED = "guard_defaults_used"
DISCLOSURE_DECISION = "disclosure_decision"
CSP_VIOLATION = "csp_violation"

EVENT_KINDS: tuple[str, ...] = (
    KERNEL_STARTED,
    AI_ML_IMPORT,
    EGRESS_BLOCKED,
    EGRESS_ALLOWED_AI,
    MODEL_ARTIFACT_WRITTEN,
    DATA_READ,
    OUTPUT_FLAGGED,
    REVIEW_SIGNED,
    GUARD_DEFAULTS_USED,
    DISCLOSURE_DECISION,
    CSP_VIOLATION,
)

#: The ``data`` fields each kind is expected to carry (documentation and schema source).
EVENT_FIELDS: dict[str, dict[str, str]] = {
    KERNEL_STARTED: {
        "kernel_id": "id of the kernel the server started",
        "kernel_name": "kernel spec name, e.g. python3",
        "notebook": "notebook path relative to the server root, when known",
    },
    AI_ML_IMPORT: {
        "name": "top-level import name, e.g. sklearn",
        "distribution": "installed distribution, e.g. scikit-learn",
        "version": "installed version of the distribution",
        "category": "catalogue category, e.g. ml, deep-learning, llm-client",
    },
    EGRESS_BLOCKED: {
        "host": "host name or address the kernel tried to reach",
        "port": "destination port",
        "rule": "the guard rule that refused the connection",
    },
    EGRESS_ALLOWED_AI: {
        "host": "AI service host that was allowed by configuration",
        "port": "destination port",
        "rule": "the allow rule that let the connection through",
    },
    MODEL_ARTIFACT_WRITTEN: {
        "path": "absolute path of the model file written",
        "size": "size in bytes when known",
        "sha256": "SHA-256 of the file when cheap to compute",
        "library": "library that wrote it, e.g. torch, joblib",
    },
    DATA_READ: {
        "path": "path of the registry data file read",
        "format": "file format, e.g. csv, sas7bdat, parquet",
    },
    OUTPUT_FLAGGED: {
        "rule": "the disclosure rule that fired, e.g. small-cell",
        "cell": "cell index or id in the notebook",
        "detail": "why the output was flagged (never the data values)",
    },
    REVIEW_SIGNED: {
        "reviewer": "who reviewed the AI/ML output",
        "notebook": "the notebook reviewed",
        "scope": "what was reviewed",
        "statement": "the reviewer's statement",
    },
    GUARD_DEFAULTS_USED: {
        "settings": "names of settings left at their defaults",
        "detail": "why this matters",
    },
    DISCLOSURE_DECISION: {
        "action": "what the researcher tried with a flagged output: copy or export",
        "decision": "what they chose: copied, exported or cancelled",
        "notebook": "the notebook the output belongs to",
        "command": "the JupyterLab command, for exports",
        "flagged_outputs": "how many unreviewed flagged outputs the notebook had",
        "user": "the Jupyter user who decided",
    },
    CSP_VIOLATION: {
        "blocked_uri": "what the page tried to reach (query string removed)",
        "host": "host of the blocked URI",
        "directive": "the CSP directive that blocked it, e.g. connect-src",
        "document_uri": "the Jupyter page that tried it (query string removed)",
    },
}

#: Fields of ``current_context()``: the "location of processing" of each event.
CONTEXT_FIELDS: dict[str, str] = {
    "time": "UTC time of the event, ISO 8601 with microseconds and Z",
    "user": "operating-system user running the process",
    "host": "host name of the machine",
    "platform": "operating system and architecture (platform.platform())",
    "kernel_id": "Jupyter kernel id ($JUPYTER_DUA_GUARD_KERNEL_ID), null outside kernels",
    "notebook": "notebook path ($JUPYTER_DUA_GUARD_NOTEBOOK), null when unknown",
    "python": "Python version of the process",
    "guard_version": "version of jupyter-dua-guard",
    "pid": "process id",
}

SCHEMA_PATH = Path(__file__).parent / "data" / "ledger-event.schema.json"
SCHEMA_ID = "https://jupyter-dua-guard.readthedocs.io/schemas/ledger-event/v1"


_second: tuple[int, str] = (-1, "")  # the last whole second, formatted; reused within it


def utc_now() -> str:
    """The current UTC time as the ledger writes it (sortable as text).

    Formats the whole second once per second: every append calls this.
    """
    global _second
    now = _time.time()
    whole = int(now)
    second = _second
    if second[0] != whole:
        second = _second = (whole, _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(whole)))
    return f"{second[1]}.{min(int((now - whole) * 1e6), 999_999):06d}Z"


@functools.lru_cache(maxsize=1)
def _static_context() -> tuple[tuple[str, Any], ...]:
    """Process facts that cannot change while it runs; computed once because kernels log often."""
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry (containers): fall back to the numeric uid
        user = f"uid:{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return (
        ("user", user),
        ("host", socket.gethostname()),
        ("platform", platform.platform()),
        ("python", platform.python_version()),
        ("guard_version", __version__),
    )


def current_context() -> dict[str, Any]:
    """Where and when an event happens: time, user, host, platform, kernel, notebook, versions."""
    context: dict[str, Any] = {"time": utc_now()}
    context.update(_static_context())
    context["kernel_id"] = os.environ.get(ENV_KERNEL_ID) or None
    context["notebook"] = os.environ.get(ENV_NOTEBOOK) or None
    context["pid"] = os.getpid()
    return context
