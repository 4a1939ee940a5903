"""AI assistant extensions found in this Jupyter are listed by the status API."""

from __future__ import annotations

import json
import sys

import pytest

from jupyter_dua_guard.ai_extensions import catalogue


@pytest.fixture
def fake_notebook_intelligence(jp_data_dir, tmp_path, monkeypatch):
    """A lab extension and a distribution that look like Notebook Intelligence."""
    lab = jp_data_dir / "labextensions" / "@notebook-intelligence" / "notebook-intelligence"
    lab.mkdir(parents=True)
    (lab / "package.json").write_text(
        json.dumps({"name": "@notebook-intelligence/notebook-intelligence", "version": "9.9.9"})
    )
    site = tmp_path / "site"
    dist = site / "notebook_intelligence-9.9.9.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: notebook-intelligence\nVersion: 9.9.9\n"
    )
    monkeypatch.syspath_prepend(str(site))
    return lab


async def test_ai_lab_extension_is_listed_and_disabled_by_default(
    fake_notebook_intelligence, jp_fetch
):
    status = json.loads((await jp_fetch("dua-guard", "api", "status")).body)
    [found] = [e for e in status["ai_extensions"] if e["name"] == "Notebook Intelligence"]
    assert found["distributions"] == ["notebook-intelligence"]
    assert found["active_lab_extensions"] == []
    assert found["disabled"] is True
    assert found["action"] == "disabled"


@pytest.mark.parametrize(
    "jp_server_config",
    [
        {
            "ServerApp": {"jpserver_extensions": {"jupyter_dua_guard": True}},
            "DUAGuard": {"allow_ai_extensions": ["Notebook Intelligence"]},
        }
    ],
)
async def test_approved_ai_lab_extension_stays_active(fake_notebook_intelligence, jp_fetch):
    status = json.loads((await jp_fetch("dua-guard", "api", "status")).body)
    [found] = [e for e in status["ai_extensions"] if e["name"] == "Notebook Intelligence"]
    assert found["active_lab_extensions"] == ["@notebook-intelligence/notebook-intelligence"]
    assert found["disabled"] is False


@pytest.fixture
def lab_extension_disabled(jp_config_dir):
    labconfig = jp_config_dir / "labconfig"
    labconfig.mkdir()
    (labconfig / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@notebook-intelligence/notebook-intelligence": True}})
    )


async def test_disabled_ai_lab_extension_is_reported_disabled(
    fake_notebook_intelligence, lab_extension_disabled, jp_fetch
):
    status = json.loads((await jp_fetch("dua-guard", "api", "status")).body)
    [found] = [e for e in status["ai_extensions"] if e["name"] == "Notebook Intelligence"]
    assert found["active_lab_extensions"] == []
    assert found["disabled"] is True


async def test_nothing_listed_without_ai_extensions(jp_fetch):
    status = json.loads((await jp_fetch("dua-guard", "api", "status")).body)
    assert status["ai_extensions"] == []


def test_catalogue_covers_the_known_assistants():
    names = {entry["name"] for entry in catalogue()}
    assert {"Jupyter AI", "Notebook Intelligence"} <= names
    for entry in catalogue():
        assert entry["distributions"], entry["name"]
    assert sys.modules["jupyter_dua_guard.ai_extensions"]
