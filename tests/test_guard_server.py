"""Server-side behaviour of the kernel guard: bad settings fail closed; check-host CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from guard_kernels import run_cell, start_notebook_kernel


@pytest.fixture
def jp_server_config(tmp_path, monkeypatch) -> dict[str, Any]:
    monkeypatch.setenv("JUPYTER_DUA_GUARD_LEDGER", f"sqlite:///{tmp_path}/ledger.sqlite")
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_dua_guard": True}},
        "DUAGuard": {"allowed_hosts": ["api.openai.com", "10.0.0.0/99"]},
    }


async def test_bad_setting_fails_closed(jp_fetch, jp_serverapp) -> None:
    _, client = await start_notebook_kernel(jp_fetch, jp_serverapp, "bad-config.ipynb")
    try:
        out, errors = await run_cell(
            client,
            "import json, os, socket\n"
            "try:\n    socket.getaddrinfo('api.openai.com', 443)\n"
            "except PermissionError as e:\n    print(type(e).__name__)\n"
            "print(json.load(open(os.environ['JUPYTER_DUA_GUARD_POLICY']))['allowed_hosts'])",
        )
    finally:
        client.stop_channels()
    assert not errors, errors
    # the broken allow-list was not applied, not even in part: the host stays blocked
    assert out.split("\n")[:2] == ["AIEndpointBlocked", "[]"]


def check_host(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_DUA_GUARD")}
    return subprocess.run(
        [sys.executable, "-m", "jupyter_dua_guard.cli", "check-host", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_check_host_cli() -> None:
    proc = check_host("API.OpenAI.com.:443", "pypi.org", "localhost:11434", "--json")
    assert proc.returncode == 1, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["host"], r["decision"]) for r in rows] == [
        ("api.openai.com", "block"),
        ("pypi.org", "allow"),
        ("localhost", "allow-ai"),
    ]
    proc = check_host("x.openai.azure.com", '--DUAGuard.allowed_hosts=["*.openai.azure.com"]')
    assert proc.returncode == 0
    assert "allowed, recorded as AI use" in proc.stdout


def test_check_host_bad_setting_is_one_line() -> None:
    proc = check_host("x", '--DUAGuard.blocked_hosts=["10.0.0.0/99"]')
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "DUAGuard.blocked_hosts" in proc.stderr and "Traceback" not in proc.stderr
