"""Which AI assistant extensions this Jupyter has, and whether they are switched off.

AI assistants such as Jupyter AI or Notebook Intelligence run in the server process and the
page, where no kernel guard sees them (NCCR DUA sec. 22). The catalogue lives in
``data/ai_extensions.json`` so that a site can extend it without touching code.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_config_path, jupyter_path

CATALOGUE = Path(__file__).parent / "data" / "ai_extensions.json"


@cache
def catalogue() -> list[dict[str, Any]]:
    """The known AI assistant extensions."""
    return json.loads(CATALOGUE.read_text(encoding="utf-8"))["extensions"]


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-")


def installed_distributions() -> set[str]:
    return {_normalise(d.metadata["Name"] or "") for d in metadata.distributions()}


def installed_lab_extensions(paths: list[str] | None = None) -> set[str]:
    """Names of the prebuilt lab extensions found on the lab extension paths."""
    found: set[str] = set()
    for base in paths if paths is not None else jupyter_path("labextensions"):
        for package in Path(base).glob("**/package.json"):
            if "node_modules" in package.parts or package.parent.parent.name == "static":
                continue
            try:
                found.add(json.loads(package.read_text(encoding="utf-8"))["name"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return found


def disabled_lab_extensions() -> set[str]:
    """Lab extensions (or plugins) disabled through ``labconfig/page_config.json``."""
    disabled: set[str] = set()
    for base in jupyter_config_path():
        page_config = Path(base, "labconfig", "page_config.json")
        try:
            settings = json.loads(page_config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        entries = settings.get("disabledExtensions") or {}
        if isinstance(entries, list):
            entries = dict.fromkeys(entries, True)
        disabled |= {name for name, off in entries.items() if off}
    return disabled


def find_ai_extensions(enabled_server_extensions: dict[str, bool]) -> list[dict[str, Any]]:
    """The catalogued AI assistants present here, each with what is still active.

    ``enabled_server_extensions`` is the server's ``jpserver_extensions`` map.
    """
    distributions = installed_distributions()
    lab = installed_lab_extensions()
    lab_off = disabled_lab_extensions()
    enabled = {_normalise(k): bool(v) for k, v in enabled_server_extensions.items()}
    result = []
    for entry in catalogue():
        dists = sorted({_normalise(d) for d in entry["distributions"]} & distributions)
        labs = sorted(name for name in entry["lab_extensions"] if name in lab)
        servers = sorted(s for s in entry["server_extensions"] if _normalise(s) in enabled)
        if not (dists or labs or servers):
            continue
        active_servers = [s for s in servers if enabled.get(_normalise(s))]
        active_labs = [name for name in labs if name not in lab_off]
        result.append(
            {
                "name": entry["name"],
                "kind": "+".join(part for part, on in (("server", servers), ("lab", labs)) if on)
                or "package",
                "distributions": dists,
                "active_server_extensions": active_servers,
                "active_lab_extensions": active_labs,
                "disabled": not (active_servers or active_labs),
            }
        )
    return result
