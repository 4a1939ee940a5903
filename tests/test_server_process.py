"""A real ``jupyter server`` process: settings from config files and the command line."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

TOKEN = "test-token-dua-guard"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "config"))
    command = [
        sys.executable,
        "-m",
        "jupyter_server",
        "--no-browser",
        "--allow-root",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={TOKEN}",
        f"--ServerApp.root_dir={tmp_path}",
        *args,
    ]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return process, port


def _status(port: int, deadline: float = 60.0) -> dict:
    url = f"http://127.0.0.1:{port}/dua-guard/api/status"
    request = urllib.request.Request(url, headers={"Authorization": f"token {TOKEN}"})
    stop = time.monotonic() + deadline
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return json.load(response)
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > stop:
                raise
            time.sleep(0.3)


@pytest.fixture
def server(tmp_path):
    started = []

    def start(*args: str) -> int:
        process, port = _start_server(tmp_path, *args)
        started.append(process)
        return port

    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=30)


def test_setting_from_config_file(server, tmp_path):
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "jupyter_server_config.json").write_text(
        json.dumps({"DUAGuard": {"enabled": False}})
    )
    assert _status(server())["active"] is False


def test_command_line_overrides_config_file(server, tmp_path):
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "jupyter_server_config.py").write_text("c.DUAGuard.enabled = False\n")
    assert _status(server("--DUAGuard.enabled=True"))["active"] is True


def test_invalid_setting_stops_the_server_with_a_clear_message(tmp_path):
    process, _ = _start_server(tmp_path, "--DUAGuard.enabled=maybe")
    output, _ = process.communicate(timeout=60)
    assert process.returncode != 0
    assert "invalid DUAGuard setting" in output
    assert "enabled" in output
