"""AI assistant server/lab extensions are turned off at start unless approved.

A fake AI server extension is installed for the test (a real importable package with
extension points, on sys.path); detection is ``ai_extensions.find_ai_extensions``,
stood in here by a minimal detector over the same record shape; the real catalogue's
detection is tested in ``test_ai_extensions.py``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from jupyter_dua_guard.ai_disable import is_approved, page_config_hook, plan

FAKE = "fake_jupyter_ai"
FAKE_SRC = """
LOADED = []

def _jupyter_server_extension_points():
    return [{"module": "fake_jupyter_ai"}]

def _load_jupyter_server_extension(serverapp):
    LOADED.append(serverapp)
"""


def fake_find(jpserver_extensions: dict[str, bool]) -> list[dict[str, Any]]:
    active = [m for m, on in jpserver_extensions.items() if on and m == FAKE]
    return [
        {
            "name": "fake-jupyter-ai",
            "kind": "assistant",
            "distributions": ["fake-jupyter-ai"],
            "active_server_extensions": active,
            "active_lab_extensions": ["@fake/jupyter-ai"],
            "disabled": False,
        }
    ]


@pytest.fixture
def fake_extension(tmp_path, monkeypatch):
    (tmp_path / f"{FAKE}.py").write_text(FAKE_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("jupyter_dua_guard.app.find_ai_extensions", fake_find)
    monkeypatch.delitem(sys.modules, FAKE, raising=False)
    yield
    sys.modules.pop(FAKE, None)


@pytest.fixture
def allow() -> list[str]:
    return []


@pytest.fixture
def jp_server_config(ledger_url, fake_extension, allow):
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_dua_guard": True, FAKE: True}},
        "DUAGuard": {"ledger_url": ledger_url, "allow_ai_extensions": allow},
    }


async def test_fake_ai_server_extension_is_disabled_and_listed(jp_fetch, jp_serverapp):
    import fake_jupyter_ai

    assert fake_jupyter_ai.LOADED == []
    assert jp_serverapp.jpserver_extensions[FAKE] is False
    assert jp_serverapp.extension_manager.extensions[FAKE].enabled is False
    status = json.loads((await jp_fetch("dua-guard", "api", "status")).body)
    [entry] = status["ai_extensions_actions"]
    assert entry["name"] == "fake-jupyter-ai"
    assert entry["action"] == "disabled"
    assert entry["disabled_server_extensions"] == [FAKE]
    assert entry["disabled_lab_extensions"] == ["@fake/jupyter-ai"]
    hook = jp_serverapp.web_app.settings["page_config_hook"]
    config = hook(None, {"disabledExtensions": ["other"]})
    assert config["disabledExtensions"] == ["other", "@fake/jupyter-ai"]
    [listed] = status["ai_extensions"]
    assert listed["disabled"] is True


@pytest.mark.parametrize("allow", [["Fake_Jupyter_AI"]])
async def test_approved_ai_extension_is_kept(jp_fetch, jp_serverapp, allow):
    import fake_jupyter_ai

    assert len(fake_jupyter_ai.LOADED) == 1
    status = json.loads((await jp_fetch("dua-guard", "api", "status")).body)
    [entry] = status["ai_extensions_actions"]
    assert entry["approved"] is True
    assert entry["disabled_server_extensions"] == []
    assert "page_config_hook" not in jp_serverapp.web_app.settings


def test_plan_matches_names_and_distributions_loosely():
    ext = {"name": "notebook-intelligence", "distributions": ["notebook_intelligence"]}
    assert is_approved(ext, ["Notebook_Intelligence"])
    assert not is_approved(ext, ["jupyter-ai"])
    [entry] = plan([{**ext, "active_server_extensions": [], "active_lab_extensions": []}], [])
    assert entry["action"] == "nothing active"


def test_page_config_hook_chains_previous_hook():
    def previous(handler: Any, config: dict) -> dict:
        config["seen"] = True
        return config

    config = page_config_hook(["@x/ai"], previous)(None, {})
    assert config == {"seen": True, "disabledExtensions": ["@x/ai"]}
