"""Server-side behaviour of the kernel guard: bad settings fail closed; check-host CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_bad_guard_setting_stops_the_server_with_one_line(tmp_path) -> None:
    """Fail closed: a server whose block/allow-lists cannot be read must not start."""
    from test_server_process import _start_server

    process, _ = _start_server(
        tmp_path, '--DUAGuard.allowed_hosts=["api.openai.com", "10.0.0.0/99"]'
    )
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    lines = [line for line in output.splitlines() if "DUAGuard.allowed_hosts" in line]
    assert lines and "CIDR" in lines[0] and "Fix it in jupyter_server_config" in lines[0]
    assert "Traceback" not in output


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
