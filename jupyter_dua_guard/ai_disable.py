"""Disable detected AI assistant extensions: server side (``jpserver_extensions``) and in
the page (``disabledExtensions`` of the page config), except approved ones.

Takes the list made by ``ai_extensions.find_ai_extensions``: dicts with ``name``, ``kind``,
``distributions``, ``active_server_extensions``, ``active_lab_extensions``, ``disabled``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def is_approved(extension: Mapping[str, Any], allow: Iterable[str]) -> bool:
    """Whether ``DUAGuard.allow_ai_extensions`` names the extension or a distribution of it."""
    names = {_norm(str(extension.get("name", "")))}
    names.update(_norm(str(d)) for d in extension.get("distributions") or ())
    return any(_norm(a) in names for a in allow)


def plan(found: Iterable[Mapping[str, Any]], allow: Iterable[str]) -> list[dict[str, Any]]:
    """What to do with each detected extension: one report entry per extension."""
    allow = list(allow)
    out = []
    for ext in found:
        approved = is_approved(ext, allow)
        server = [] if approved else list(ext.get("active_server_extensions") or ())
        lab = [] if approved else list(ext.get("active_lab_extensions") or ())
        out.append(
            {
                **dict(ext),
                "approved": approved,
                "action": (
                    "kept (DUAGuard.allow_ai_extensions)"
                    if approved
                    else "disabled"
                    if server or lab
                    else "nothing active"
                ),
                "disabled_server_extensions": server,
                "disabled_lab_extensions": lab,
            }
        )
    return out


def disable_server_extensions(serverapp: Any, modules: Iterable[str], log: Any) -> list[str]:
    """Turn server extensions off before they load (our link step runs before any load)."""
    done = []
    manager = getattr(serverapp, "extension_manager", None)
    for module in modules:
        # in the config too: extension apps re-apply the config to the ServerApp later
        configured = dict(serverapp.config.ServerApp.get("jpserver_extensions", None) or {})
        configured[module] = False
        serverapp.config.ServerApp.jpserver_extensions = configured
        serverapp.jpserver_extensions = {**serverapp.jpserver_extensions, module: False}
        package = manager.extensions.get(module) if manager is not None else None
        if package is not None:
            package.enabled = False
        for name, point in list(getattr(manager, "extension_points", {}).items()):
            if name == module or getattr(point, "module_name", None) == module:
                manager.extension_points.pop(name, None)
        log.warning(
            "jupyter-dua-guard: AI server extension %s disabled (NCCR DUA sec. 22; "
            "approve it with DUAGuard.allow_ai_extensions)",
            module,
        )
        done.append(module)
    return done


def page_config_hook(lab_extensions: Iterable[str], previous: Any = None) -> Any:
    """A ``page_config_hook`` adding ``lab_extensions`` to ``disabledExtensions``."""
    names = list(lab_extensions)

    def hook(handler: Any, page_config: dict[str, Any]) -> dict[str, Any]:
        if previous is not None:
            page_config = previous(handler, page_config)
        current = list(page_config.get("disabledExtensions") or [])
        page_config["disabledExtensions"] = current + [n for n in names if n not in current]
        return page_config

    return hook
