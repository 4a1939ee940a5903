"""End to end through a real Jupyter server: kernel_started, the events API, the CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from tornado.httpclient import HTTPClientError

from jupyter_dua_guard.ledger import open_ledger


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jupyter_dua_guard.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


async def events(jp_fetch, **params) -> dict:
    resp = await jp_fetch("dua-guard", "api", "events", params=params or None)
    assert resp.code == 200
    return json.loads(resp.body)


async def test_kernel_started_visible_in_log_report_and_api(jp_fetch, ledger_url, jp_root_dir):
    (jp_root_dir / "nb").mkdir()
    resp = await jp_fetch(
        "api",
        "kernels",
        method="POST",
        body=json.dumps({"name": "python3", "path": "nb/x.ipynb"}),
    )
    kernel_id = json.loads(resp.body)["id"]
    try:
        page = await events(jp_fetch, kind="kernel_started")
        assert page["total"] == 1
        rec = page["events"][0]
        assert rec["kind"] == "kernel_started"
        assert rec["data"]["kernel_id"] == kernel_id
        assert rec["data"]["notebook"] == "nb/x.ipynb"
        assert rec["data"]["kernel_name"] == "python3"
        assert rec["context"]["kernel_id"] == kernel_id
        assert rec["context"]["notebook"] == "nb/x.ipynb"
        assert rec["context"]["user"] and rec["context"]["host"]

        proc = await asyncio.to_thread(cli, "log", "--ledger", ledger_url, "--json")
        assert proc.returncode == 0, proc.stderr
        logged = [json.loads(line) for line in proc.stdout.splitlines()]
        assert [r["data"]["kernel_id"] for r in logged if r["kind"] == "kernel_started"] == [
            kernel_id
        ]

        proc = await asyncio.to_thread(cli, "report", "--ledger", ledger_url, "--format", "json")
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["kernels_started"] == 1 and report["kernels"] == 1
        assert report["notebooks"] == ["nb/x.ipynb"]
        assert report["verification"]["ok"]
    finally:
        await jp_fetch("api", "kernels", kernel_id, method="DELETE")


async def test_session_start_records_notebook_path(jp_fetch, jp_root_dir):
    (jp_root_dir / "study").mkdir()
    resp = await jp_fetch(
        "api",
        "sessions",
        method="POST",
        body=json.dumps(
            {
                "path": "study/survival.ipynb",
                "type": "notebook",
                "name": "survival.ipynb",
                "kernel": {"name": "python3"},
            }
        ),
    )
    session = json.loads(resp.body)
    try:
        page = await events(jp_fetch, kind="kernel_started", notebook="study/survival.ipynb")
        assert page["total"] == 1
        assert page["events"][0]["data"]["kernel_id"] == session["kernel"]["id"]
    finally:
        await jp_fetch("api", "sessions", session["id"], method="DELETE")


async def test_events_api_filters_and_pagination(jp_fetch, ledger_url):
    with open_ledger(ledger_url) as ledger:
        for i in range(25):
            ledger.append(
                "egress_blocked" if i % 5 == 0 else "ai_ml_import",
                {"host": "llm.test", "port": 443, "rule": "ai"}
                if i % 5 == 0
                else {"name": "torch", "version": "2.4"},
                {"time": f"2026-05-{1 + i:02d}T10:00:00Z", "notebook": f"nb/{i % 2}.ipynb"},
            )
    page = await events(jp_fetch, limit=10)
    assert [e["seq"] for e in page["events"]] == list(range(1, 11))
    assert page["total"] == 25 and page["next_offset"] == 10
    page = await events(jp_fetch, limit=10, offset=20)
    assert [e["seq"] for e in page["events"]] == list(range(21, 26))
    assert page["next_offset"] is None
    page = await events(jp_fetch, order="desc", limit=3)
    assert [e["seq"] for e in page["events"]] == [25, 24, 23]
    page = await events(jp_fetch, kind="egress_blocked")
    assert [e["seq"] for e in page["events"]] == [1, 6, 11, 16, 21]
    page = await events(jp_fetch, kind="egress_blocked,ai_ml_import", since="2026-05-20")
    assert page["total"] == 6
    page = await events(jp_fetch, notebook="nb/1.ipynb", until="2026-05-04")
    assert [e["seq"] for e in page["events"]] == [2, 4]


async def test_events_api_user_and_host_filters(jp_fetch, ledger_url):
    with open_ledger(ledger_url) as ledger:
        for user, host in [("alice", "node-1"), ("bob", "node-1"), ("bob", "node-2")]:
            ledger.append("data_read", {"path": "/d.csv"}, {"user": user, "host": host})
    assert (await events(jp_fetch, user="bob"))["total"] == 2
    page = await events(jp_fetch, user="bob", host="node-1")
    assert [e["seq"] for e in page["events"]] == [2]
    assert (await events(jp_fetch, host="node-*"))["total"] == 3


@pytest.mark.parametrize(
    "params",
    [
        {"kind": "nope"},
        {"since": "soon"},
        {"limit": "0"},
        {"limit": "5000"},
        {"offset": "x"},
        {"order": "sideways"},
    ],
)
async def test_events_api_rejects_bad_filters(jp_fetch, params):
    with pytest.raises(HTTPClientError) as err:
        await jp_fetch("dua-guard", "api", "events", params=params)
    assert err.value.code == 400
    body = json.loads(err.value.response.body)
    assert body["message"] and "\n" not in body["message"]


async def test_events_api_requires_authentication(jp_fetch):
    with pytest.raises(HTTPClientError) as err:
        await jp_fetch("dua-guard", "api", "events", headers={"Authorization": ""})
    assert err.value.code == 403


async def test_kernel_started_emitted_to_jupyter_events(jp_fetch, jp_serverapp, jp_root_dir):
    from jupyter_dua_guard.events import SCHEMA_ID

    logger = jp_serverapp.event_logger
    assert SCHEMA_ID in logger.schemas.schema_ids
    seen: list[dict] = []

    async def listener(logger, schema_id, data) -> None:
        seen.append(data)

    logger.add_listener(schema_id=SCHEMA_ID, listener=listener)
    resp = await jp_fetch("api", "kernels", method="POST", body=json.dumps({"name": "python3"}))
    kernel_id = json.loads(resp.body)["id"]
    try:
        for _ in range(50):
            if seen:
                break
            await asyncio.sleep(0.05)
        assert seen and seen[0]["kind"] == "kernel_started"
        assert seen[0]["data"]["kernel_id"] == kernel_id
    finally:
        await jp_fetch("api", "kernels", kernel_id, method="DELETE")
