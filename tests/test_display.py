"""In-kernel detection: a real ipykernel started through the jupyter_server REST API."""

import asyncio
import json
import sqlite3
import uuid

import pytest

from jupyter_dua_guard.ledger import open_ledger
from jupyter_dua_guard.provisioner import DISPLAY_EXTENSION_ARG, with_output_check

SETUP = """
import numpy as np, pandas as pd
rng = np.random.default_rng(5)
n = 60
cases = pd.DataFrame({
    "Patient ID": [f"P{900000 + i}" for i in range(n)],
    "Age at diagnosis": rng.integers(20, 90, n),
    "Sex": rng.choice(["Male", "Female"], n),
    "Year of diagnosis": rng.integers(2005, 2020, n),
    "Survival months": rng.integers(0, 180, n),
})
"""


def _msg(code, session):
    return {
        "header": {
            "msg_id": uuid.uuid4().hex,
            "msg_type": "execute_request",
            "session": session,
            "username": "test",
            "version": "5.3",
            "date": "",
        },
        "parent_header": {},
        "metadata": {"cellId": f"cell-{uuid.uuid4().hex[:8]}"},
        "content": {"code": code, "silent": False, "store_history": True,
                    "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
        "channel": "shell",
        "buffers": [],
    }  # fmt: skip


async def execute(ws, code, session):
    """Run code over the kernel websocket; return (reply status, display/result outputs)."""
    msg = _msg(code, session)
    await ws.write_message(json.dumps(msg))
    outputs, status, idle = [], None, False
    while status is None or not idle:
        raw = await asyncio.wait_for(ws.read_message(), timeout=60)
        reply = json.loads(raw)
        if reply.get("parent_header", {}).get("msg_id") != msg["header"]["msg_id"]:
            continue
        mtype = reply["msg_type"]
        if mtype in ("execute_result", "display_data", "stream", "error"):
            outputs.append(reply)
        elif mtype == "execute_reply":
            status = reply["content"]["status"]
        elif mtype == "status" and reply["content"]["execution_state"] == "idle":
            idle = True
    return status, outputs


@pytest.fixture
def ledger_url(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/ledger.sqlite"
    monkeypatch.setenv("JUPYTER_DUA_GUARD_LEDGER", url)
    monkeypatch.setenv("JUPYTER_DUA_GUARD_NOTEBOOK", "analysis/survival.ipynb")
    return url


@pytest.mark.timeout(180)
async def test_flagged_dataframe_carries_findings_and_is_recorded(
    jp_fetch, jp_ws_fetch, ledger_url, jp_root_dir
):
    # Started as JupyterLab starts a notebook's kernel, so the guard knows the notebook and
    # the guard provisioner loads the output check without any %load_ext.
    (jp_root_dir / "analysis").mkdir()
    resp = await jp_fetch(
        "api",
        "sessions",
        method="POST",
        body=json.dumps(
            {
                "path": "analysis/survival.ipynb",
                "type": "notebook",
                "kernel": {"name": "python3"},
            }
        ),
    )
    kernel_id = json.loads(resp.body)["kernel"]["id"]
    ws = await jp_ws_fetch("api", "kernels", kernel_id, "channels")
    session = uuid.uuid4().hex
    try:
        status, outputs = await execute(ws, SETUP, session)
        assert status == "ok", outputs

        status, outputs = await execute(ws, "cases", session)
        assert status == "ok"
        (result,) = [o for o in outputs if o["msg_type"] == "execute_result"]
        meta = result["content"]["metadata"]["jupyter_dua_guard"]
        kinds = [f["kind"] for f in meta["findings"]]
        assert kinds == ["individual_level"]
        reasons = " ".join(meta["findings"][0]["reasons"])
        assert "'Patient ID'" in reasons and "60 rows" in reasons

        # display() of a flagged frame, and a clean aggregate next to it
        status, outputs = await execute(
            ws,
            "display(cases.head(3)); display(cases.groupby('Sex').size().to_frame('n') + 100)",
            session,
        )
        shown = [o for o in outputs if o["msg_type"] == "display_data"]
        assert len(shown) == 2
        assert "jupyter_dua_guard" in shown[0]["content"]["metadata"]
        # the clean aggregate carries an empty verdict: the page trusts it and asks no one
        assert shown[1]["content"]["metadata"]["jupyter_dua_guard"]["findings"] == []

        # small cells in a crosstab
        status, outputs = await execute(
            ws, "pd.crosstab(cases['Sex'], cases['Year of diagnosis'])", session
        )
        (result,) = [o for o in outputs if o["msg_type"] == "execute_result"]
        assert [
            f["kind"] for f in result["content"]["metadata"]["jupyter_dua_guard"]["findings"]
        ] == ["small_cells"]
    finally:
        ws.close()
        await jp_fetch("api", "kernels", kernel_id, method="DELETE")

    ledger = open_ledger(ledger_url)
    events = list(ledger.records(kinds=["output_flagged"]))
    assert ledger.verify().ok
    ledger.close()
    assert len(events) == 3
    assert events[0]["context"]["notebook"] == "analysis/survival.ipynb"
    assert "individual_level" in events[0]["data"]["rule"]
    assert events[2]["data"]["rule"] == "small_cells"
    # no data values in the ledger file at all
    db = sqlite3.connect(ledger_url.removeprefix("sqlite:///"))
    dump = "\n".join(db.iterdump())
    db.close()
    for pid in ("P900000", "P900001", "P900059"):
        assert pid not in dump


def test_kernel_thresholds_come_from_policy_file(tmp_path, monkeypatch):
    from jupyter_dua_guard.display import _settings_from_policy

    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"detector": {"min_cell_count": 11, "allow_zero_cells": False}}))
    monkeypatch.setenv("JUPYTER_DUA_GUARD_POLICY", str(policy))
    settings = _settings_from_policy()
    assert settings.min_cell_count == 11 and settings.allow_zero_cells is False
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[qi:geo]\nResidence zone\n", encoding="utf-8")
    policy.write_text(json.dumps({"vocabulary_files": [str(vocab)], "extra_case_variables": ["X"]}))
    assert _settings_from_policy().vocabulary.role("residence_zone") == "qi:geo"
    policy.write_text("{broken")
    assert _settings_from_policy().min_cell_count == 16


def test_only_ipython_kernels_get_the_output_check():
    ipython = ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    guarded = with_output_check(ipython)
    assert guarded[:5] == ipython
    assert guarded.count(DISPLAY_EXTENSION_ARG) == 1
    assert with_output_check(guarded) == guarded
    r_kernel = ["R", "--slave", "-e", "IRkernel::main()", "--args", "{connection_file}"]
    assert with_output_check(r_kernel) == r_kernel
