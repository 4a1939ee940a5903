"""jupyter-dua-guard: keep JupyterLab work on SEER / NCCR data inside the Data Use Agreement.

This top-level module stays light on purpose: the kernel-side guard imports it in every
guarded Python process, so the Jupyter server is only imported when the server asks for
its extension points.
"""

from __future__ import annotations

from ._version import __version__

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing would cost every guarded process start-up time
    from typing import Any

__all__ = ["__version__"]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "labextension", "dest": "jupyter-dua-guard"}]


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .app import DUAGuardExtension

    return [{"module": "jupyter_dua_guard", "app": DUAGuardExtension}]
