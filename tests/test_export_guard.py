"""nbconvert on a real server refuses notebooks with unreviewed findings until confirmed."""

from __future__ import annotations

import json

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output
from tornado.httpclient import HTTPClientError

from jupyter_dua_guard import events
from jupyter_dua_guard.ledger import open_ledger


def _listing_output(reviewed: bool = False) -> dict:
    rows = "".join(
        f"<tr><th>{i}</th><td>SYN{i:05d}</td><td>{i % 19}</td><td>{2001 + i % 15}</td></tr>"
        for i in range(40)
    )
    html = (
        "<table><thead><tr><th></th><th>Patient ID</th><th>Age at diagnosis</th>"
        f"<th>Year of diagnosis</th></tr></thead><tbody>{rows}</tbody></table>"
    )
    metadata = {}
    if reviewed:
        metadata["jupyter_dua_guard"] = {
            "findings": [{"kind": "individual_level", "confidence": 0.9, "reasons": ["x"]}],
            "review": {"reviewer": "alice", "reason": "synthetic", "time": "2026-01-01"},
        }
    return new_output("display_data", data={"text/html": html}, metadata=metadata)


def _write(root, name: str, outputs: list) -> str:
    nb = new_notebook(cells=[new_code_cell("cases", outputs=outputs)])
    nbformat.write(nb, root / name)
    return name


def _decisions(url: str) -> list[dict]:
    ledger = open_ledger(url)
    try:
        return [r["data"] for r in ledger.records(kinds=[events.DISCLOSURE_DECISION])]
    finally:
        ledger.close()


async def test_unreviewed_listing_is_refused_with_the_findings(jp_fetch, jp_root_dir, ledger_url):
    name = _write(jp_root_dir, "cases.ipynb", [_listing_output()])
    with pytest.raises(HTTPClientError) as caught:
        await jp_fetch("nbconvert", "html", name, params={"download": "true"})
    assert caught.value.code == 409
    page = caught.value.response.body.decode()
    assert "Unreviewed individual-level outputs" in page
    assert "Cell 1, output 1" in page and "Patient ID" in page
    assert "SYN00003" not in page
    assert "dua_guard_confirm=1" in page
    assert _decisions(ledger_url) == []


async def test_confirmed_export_goes_through_and_is_recorded(jp_fetch, jp_root_dir, ledger_url):
    name = _write(jp_root_dir, "cases.ipynb", [_listing_output()])
    response = await jp_fetch(
        "nbconvert", "html", name, params={"download": "true", "dua_guard_confirm": "1"}
    )
    assert response.code == 200
    [decision] = _decisions(ledger_url)
    assert decision["action"] == "export" and decision["decision"] == "exported"
    assert decision["command"] == "nbconvert:html"
    assert decision["flagged_outputs"] == 1


async def test_export_anyway_from_the_page_covers_the_next_request(
    jp_fetch, jp_root_dir, ledger_url
):
    name = _write(jp_root_dir, "cases.ipynb", [_listing_output()])
    await jp_fetch(
        "dua-guard",
        "api",
        "decisions",
        method="POST",
        body=json.dumps({"action": "export", "decision": "exported", "path": name}),
    )
    response = await jp_fetch("nbconvert", "html", name)
    assert response.code == 200


@pytest.mark.parametrize("reviewed", [True])
async def test_clean_and_reviewed_notebooks_export(jp_fetch, jp_root_dir, reviewed):
    clean = _write(
        jp_root_dir,
        "clean.ipynb",
        [new_output("stream", name="stdout", text="mean age 52.3\n")],
    )
    assert (await jp_fetch("nbconvert", "html", clean)).code == 200
    done = _write(jp_root_dir, "reviewed.ipynb", [_listing_output(reviewed=reviewed)])
    assert (await jp_fetch("nbconvert", "html", done)).code == 200


@pytest.mark.parametrize(
    "jp_server_config",
    [
        {
            "ServerApp": {"jpserver_extensions": {"jupyter_dua_guard": True}},
            "DUAGuard": {"enabled": False},
        }
    ],
)
async def test_guard_off_leaves_nbconvert_alone(jp_fetch, jp_root_dir):
    name = _write(jp_root_dir, "cases.ipynb", [_listing_output()])
    assert (await jp_fetch("nbconvert", "html", name)).code == 200
