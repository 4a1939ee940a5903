"""A real Jupyter server writing to the central PostgreSQL ledger (the JupyterHub set-up)."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest
from pg_server import WRITER_PASSWORD

from jupyter_dua_guard.ledger import open_ledger


@pytest.fixture
def ledger_url(pg_ledger):
    """The server of these tests writes to PostgreSQL as the writer role."""
    return pg_ledger.writer


async def events(jp_fetch, **params) -> dict:
    resp = await jp_fetch("dua-guard", "api", "events", params=params or None)
    assert resp.code == 200
    return json.loads(resp.body)


async def test_server_records_kernels_in_postgres(jp_fetch, jp_root_dir, ledger_url, caplog):
    caplog.set_level(logging.DEBUG)
    resp = await jp_fetch(
        "api", "kernels", method="POST", body=json.dumps({"name": "python3", "path": "a.ipynb"})
    )
    kernel_id = json.loads(resp.body)["id"]
    try:
        page = await events(jp_fetch, kind="kernel_started")
        assert page["total"] == 1 and page["events"][0]["data"]["kernel_id"] == kernel_id
        user = page["events"][0]["context"]["user"]
        assert (await events(jp_fetch, user=user))["total"] == 1
        assert (await events(jp_fetch, user="someone-else"))["total"] == 0
        assert (await events(jp_fetch, host="no-such-host-*"))["total"] == 0
        with open_ledger(ledger_url) as ledger:
            assert ledger.count(kinds=["kernel_started"]) == 1 and ledger.verify().ok
    finally:
        await jp_fetch("api", "kernels", kernel_id, method="DELETE")
    assert WRITER_PASSWORD not in caplog.text


async def test_kernels_append_through_the_servers_relay(
    jp_fetch, jp_serverapp, ledger_url, pg_ledger
):
    """The server relays its kernels' appends: a blocked AI call in a kernel reaches the
    central ledger through the relay's socket, chained after the server's own record."""
    from guard_kernels import run_cell, start_notebook_kernel

    (extension,) = jp_serverapp.extension_manager.extension_apps["jupyter_dua_guard"]
    relay = extension.relay
    assert relay is not None and os.path.exists(relay.path)
    assert stat.S_IMODE(os.stat(relay.path).st_mode) == 0o600
    kernel_id, client = await start_notebook_kernel(jp_fetch, jp_serverapp, "hub.ipynb")
    try:
        out, errors = await run_cell(
            client,
            "import os, socket\n"
            "print('relay=' in os.environ['JUPYTER_DUA_GUARD_LEDGER'])\n"
            "try:\n    socket.create_connection(('api.openai.com', 443))\n"
            "except PermissionError:\n    print('refused')",
        )
        assert errors == [] and out.split() == ["True", "refused"]
    finally:
        client.stop_channels()
        await jp_fetch("api", "kernels", kernel_id, method="DELETE")
    assert relay.stats["events"] >= 1
    with open_ledger(pg_ledger.writer) as ledger:
        (blocked,) = ledger.records(kinds=["egress_blocked"])
        assert blocked["context"]["kernel_id"] == kernel_id
        assert blocked["data"]["host"] == "api.openai.com"
        assert ledger.verify().ok
    status = json.loads((await jp_fetch("dua-guard", "api", "status")).body)
    assert status["defence"]["ledger_relay"] == relay.path
