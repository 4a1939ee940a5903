"""The egress proxy on its own: real proxy on loopback, real curl and Python clients.

AI host names are refused by the proxy before it resolves or connects anything; the only
real connections go to test servers on 127.0.0.1 (reached under test-only host names).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from typing import Any

import pytest
from guard_kernels import LocalServer

from jupyter_dua_guard.ledger import open_ledger
from jupyter_dua_guard.policy import Policy, build_policy
from jupyter_dua_guard.proxy import EgressProxy, kernel_token, ledger_recorder, proxy_env

KERNEL = "0f6b8e1c-kernel-test"
NOTEBOOK = "study/km.ipynb"
SECRET = b"test-secret-0123456789"
PLAIN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_DUA_GUARD")}


class RunningProxy:
    """An EgressProxy served by its own event loop in a thread."""

    def __init__(self, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)

            async def start() -> None:
                self.proxy = EgressProxy(**kwargs)
                self.port = self.proxy.listen_loopback(0)
                ready.set()

            self.loop.run_until_complete(start())
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def url(self, kernel: str = KERNEL, token: str | None = None) -> str:
        token = kernel_token(SECRET, kernel) if token is None else token
        return f"http://{kernel}:{token}@127.0.0.1:{self.port}"

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.proxy.stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def local_server():
    server = LocalServer()
    yield server
    server.close()


def make_proxy(ledger_url: str, **overrides: Any) -> RunningProxy:
    kwargs: dict[str, Any] = {
        "policy": Policy(build_policy(blocked_hosts=["blocked.example.test"])),
        "record": ledger_recorder(ledger_url),
        "secret": SECRET,
        "resolve": {"data.registry.test": "127.0.0.1", "mirror.site.test": "127.0.0.1"},
        "notebooks": {KERNEL: NOTEBOOK},
    }
    kwargs.update(overrides)
    return RunningProxy(**kwargs)


@pytest.fixture
def proxy(ledger_url):
    running = make_proxy(ledger_url)
    yield running
    running.close()


def curl(proxy_url: str, url: str, *extra: str) -> tuple[str, str, str]:
    """(body, http code, connect code) of curl through ``proxy_url``."""
    out = subprocess.run(
        [
            "curl",
            "-s",
            "-m",
            "20",
            "-x",
            proxy_url,
            "-w",
            "\n%{http_code} %{http_connect}",
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        env=PLAIN_ENV,
        timeout=60,
    ).stdout
    body, _, codes = out.rpartition("\n")
    code, _, connect = codes.partition(" ")
    return body, code, connect


def blocked_records(url: str) -> list[dict[str, Any]]:
    ledger = open_ledger(url)
    try:
        return [r for r in ledger.records() if r["kind"] == "egress_blocked"]
    finally:
        ledger.close()


@pytest.mark.parametrize(
    "url",
    [
        "http://api.openai.com/v1/chat/completions",
        "http://API.OPENAI.COM./v1/models",
        "http://blocked.example.test/x",
    ],
)
def test_plain_http_to_ai_host_gets_403_naming_host_and_dua(proxy, ledger_url, url):
    body, code, _ = curl(proxy.url(), url)
    assert code == "403"
    host = url.split("/")[2].lower().rstrip(".")
    assert host in body
    assert "sec. 22" in body
    [record] = blocked_records(ledger_url)
    assert record["data"]["host"] == host
    assert record["data"]["layer"] == "proxy"
    assert record["context"]["kernel_id"] == KERNEL
    assert record["context"]["notebook"] == NOTEBOOK


@pytest.mark.parametrize(
    "host", ["x.openai.azure.com", "bedrock-runtime.us-east-1.amazonaws.com", "api.anthropic.com"]
)
def test_connect_to_ai_host_gets_403(proxy, ledger_url, host):
    _, _, connect = curl(proxy.url(), f"https://{host}/v1/models")
    assert connect == "403"
    records = blocked_records(ledger_url)
    assert [r["data"]["host"] for r in records] == [host]
    assert records[0]["data"]["port"] == 443


def test_non_ai_host_passes_plain_and_tunnelled(proxy, ledger_url, local_server):
    url = f"http://data.registry.test:{local_server.port}/table"
    body, code, _ = curl(proxy.url(), url)
    assert (code, body) == ("200", LocalServer.body.decode())
    body, code, connect = curl(proxy.url(), url, "--proxytunnel")
    assert (code, connect, body) == ("200", "200", LocalServer.body.decode())
    assert blocked_records(ledger_url) == []


def test_wrong_or_missing_credentials_get_407_but_ai_hosts_still_403(proxy, local_server):
    url = f"http://data.registry.test:{local_server.port}/"
    assert curl(proxy.url(token="forged"), url)[1] == "407"
    assert curl(f"http://127.0.0.1:{proxy.port}", url)[1] == "407"
    assert curl(f"http://127.0.0.1:{proxy.port}", "http://api.openai.com/")[1] == "403"


def test_python_process_without_audit_hook_is_refused(proxy, local_server):
    """A Python process the guard's hook does not cover, using only the proxy variables."""
    code = f"""
import json, urllib.request, urllib.error
out = {{}}
for url in ("https://api.openai.com/v1/models", "http://generativelanguage.googleapis.com/x",
            "http://data.registry.test:{local_server.port}/"):
    try:
        out[url] = urllib.request.urlopen(url, timeout=20).read().decode()
    except urllib.error.HTTPError as e:
        out[url] = [e.code, e.read().decode()]
    except OSError as e:
        out[url] = str(e)
import sys
out["hooked"] = "jupyter_dua_guard.guard" in sys.modules
print(json.dumps(out))
"""
    env = {**PLAIN_ENV, **proxy_env(proxy.url())}
    env["NO_PROXY"] = env["no_proxy"] = "localhost"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out.pop("hooked") is False
    assert out["http://generativelanguage.googleapis.com/x"][0] == 403
    assert (
        "generativelanguage.googleapis.com" in out["http://generativelanguage.googleapis.com/x"][1]
    )
    # HTTPS through CONNECT: urllib reports the refused tunnel as an OSError naming 403
    assert "403" in str(out["https://api.openai.com/v1/models"])
    assert out[f"http://data.registry.test:{local_server.port}/"] == LocalServer.body.decode()


def test_allowlist_mode_passes_only_listed_hosts(ledger_url, local_server):
    running = make_proxy(ledger_url, egress_mode="allowlist", egress_allowed_hosts=["*.site.test"])
    try:
        ok = curl(running.url(), f"http://mirror.site.test:{local_server.port}/")
        assert ok[1] == "200"
        body, code, _ = curl(running.url(), f"http://data.registry.test:{local_server.port}/")
        assert code == "403"
        assert "allow-list" in body
        assert curl(running.url(), "http://api.openai.com/")[1] == "403"
        hosts = [r["data"]["host"] for r in blocked_records(ledger_url)]
        assert hosts == ["data.registry.test", "api.openai.com"]
    finally:
        running.close()


def test_record_mode_lets_ai_host_through_and_records_it(ledger_url, local_server):
    running = make_proxy(
        ledger_url,
        policy=Policy(build_policy(blocked_hosts=["ai.lab.test"], mode="record")),
        resolve={"ai.lab.test": "127.0.0.1"},
    )
    try:
        assert curl(running.url(), f"http://ai.lab.test:{local_server.port}/")[1] == "200"
        ledger = open_ledger(ledger_url)
        kinds = [(r["kind"], r["data"]["host"]) for r in ledger.records()]
        ledger.close()
        assert kinds == [("egress_allowed_ai", "ai.lab.test")]
    finally:
        running.close()


def test_malformed_requests_get_400(proxy):
    import socket

    for raw in (b"GARBAGE\r\n\r\n", b"GET /relative HTTP/1.1\r\nHost: x\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
            s.sendall(raw)
            assert s.recv(100).startswith(b"HTTP/1.1 400")


def test_proxy_env_sets_upper_and_lower_case_and_keeps_loopback_direct():
    env = proxy_env("http://k:t@127.0.0.1:9")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        assert env[name] == env[name.lower()] == "http://k:t@127.0.0.1:9"
    assert "127.0.0.1" in env["NO_PROXY"] and "localhost" in env["no_proxy"]


def test_proxy_service_command_refuses_and_records(tmp_path, local_server):
    """``jupyter dua-guard proxy`` as an admin runs it for a hub, with a shared secret."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    url = f"sqlite:///{tmp_path}/svc/ledger.sqlite"
    env = {**PLAIN_ENV, "JUPYTER_CONFIG_DIR": str(tmp_path), "JUPYTER_DUA_GUARD_LEDGER": url}
    args = [sys.executable, "-m", "jupyter_dua_guard.cli", "proxy", "--port", "0"]
    args += [
        "--secret-file",
        str(secret),
        "--DUAGuard.proxy_resolve={'data.registry.test': '127.0.0.1'}",
    ]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, proc.stderr.read()
        port = int(line.rsplit(":", 1)[1])
        good = f"http://{KERNEL}:{kernel_token(SECRET, KERNEL)}@127.0.0.1:{port}"
        body, code, _ = curl(good, "http://api.mistral.ai/v1/chat")
        assert code == "403" and "api.mistral.ai" in body
        ok = curl(good, f"http://data.registry.test:{local_server.port}/")
        assert ok[:2] == (LocalServer.body.decode(), "200")
        assert (
            curl(f"http://127.0.0.1:{port}", f"http://data.registry.test:{local_server.port}/")[1]
            == "407"
        )
        records = blocked_records(url)
        assert [(r["data"]["host"], r["context"]["kernel_id"]) for r in records] == [
            ("api.mistral.ai", KERNEL)
        ]
    finally:
        proc.terminate()
        proc.wait(10)
