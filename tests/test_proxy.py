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


# ---------------------------------------------------------------- the relay itself


class DataServer:
    """Serves ``size`` deterministic pseudo-random bytes on GET and answers a POST with
    the SHA-256 of its body: checks that the relay keeps every byte, in order."""

    def __init__(self, size: int) -> None:
        import hashlib
        import random
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.data = random.Random(7).randbytes(size)
        self.digest = hashlib.sha256(self.data).hexdigest()
        data = self.data

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                answer = hashlib.sha256(body).hexdigest().encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(answer)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def auth(kernel: str = KERNEL) -> str:
    import base64

    token = kernel_token(SECRET, kernel)
    return "Proxy-Authorization: Basic " + base64.b64encode(f"{kernel}:{token}".encode()).decode()


def exchange(
    port: int, request: bytes, *, tunnel: str | None = None, slow: bool = False, half_close=False
) -> tuple[bytes, bytes]:
    """(response head, body) of one request through the proxy on a fresh connection.

    ``tunnel``: CONNECT to that authority first; ``slow``: a small receive buffer and a
    pause before reading, so the proxy must wait for the client (back-pressure);
    ``half_close``: shut down the sending side after the request."""
    import socket
    import time

    with socket.socket() as s:
        if slow:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        s.settimeout(30)
        s.connect(("127.0.0.1", port))
        reader = s.makefile("rb")
        if tunnel:
            s.sendall(f"CONNECT {tunnel} HTTP/1.1\r\nHost: {tunnel}\r\n{auth()}\r\n\r\n".encode())
            status = reader.readline()
            assert status.startswith(b"HTTP/1.1 200"), status
            while reader.readline() not in (b"\r\n", b""):
                pass
        s.sendall(request)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        if slow:
            time.sleep(0.5)
        raw = reader.read()
    head, _, body = raw.partition(b"\r\n\r\n")
    return head, body


@pytest.fixture(params=["splice", "copy"])
def relay_mode(request, monkeypatch):
    """Both relays: splice(2) through a pipe (Linux) and recv/send (elsewhere)."""
    import jupyter_dua_guard.proxy as proxy_module

    if request.param == "copy":
        monkeypatch.setattr(proxy_module, "_SPLICE", None)
    elif proxy_module._SPLICE is None:
        pytest.skip("splice(2) is Linux-only")
    return request.param


@pytest.fixture
def data_server():
    server = DataServer(6 * 1024 * 1024 + 12345)
    yield server
    server.close()


@pytest.mark.parametrize("tunnel", [False, True], ids=["plain", "connect"])
@pytest.mark.parametrize("slow", [False, True], ids=["fast-client", "slow-client"])
def test_large_download_is_relayed_intact(relay_mode, proxy, data_server, tunnel, slow):
    import hashlib

    authority = f"data.registry.test:{data_server.port}"
    if tunnel:
        request = f"GET /big HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
        head, body = exchange(proxy.port, request, tunnel=authority, slow=slow)
    else:
        request = f"GET http://{authority}/big HTTP/1.1\r\nHost: {authority}\r\n{auth()}\r\n\r\n"
        head, body = exchange(proxy.port, request.encode(), slow=slow)
    assert head.startswith(b"HTTP/1.1 200")
    assert len(body) == len(data_server.data)
    assert hashlib.sha256(body).hexdigest() == data_server.digest


@pytest.mark.parametrize("tunnel", [False, True], ids=["plain", "connect"])
def test_large_upload_is_relayed_intact(relay_mode, proxy, data_server, tunnel):
    authority = f"data.registry.test:{data_server.port}"
    size = len(data_server.data)
    if tunnel:
        head = f"POST /up HTTP/1.1\r\nHost: {authority}\r\nContent-Length: {size}\r\n\r\n"
        reply = exchange(proxy.port, head.encode() + data_server.data, tunnel=authority)
    else:
        head = (
            f"POST http://{authority}/up HTTP/1.1\r\nHost: {authority}\r\n{auth()}\r\n"
            f"Content-Length: {size}\r\n\r\n"
        )
        reply = exchange(proxy.port, head.encode() + data_server.data)
    assert reply[0].startswith(b"HTTP/1.1 200")
    assert reply[1].decode() == data_server.digest


def test_client_that_half_closes_still_gets_the_answer(relay_mode, proxy, local_server):
    authority = f"data.registry.test:{local_server.port}"
    request = f"GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n{auth()}\r\n\r\n"
    head, body = exchange(proxy.port, request.encode(), half_close=True)
    assert head.split(b" ")[1] == b"200"
    assert body == LocalServer.body


def test_refused_upload_still_reads_403_and_is_recorded(proxy, ledger_url):
    """A POST to an AI host with a large body: the client gets the 403 (the proxy does not
    reset the connection under a body still arriving), and the ledger has the refusal."""
    body = b"{" + b"x" * (4 * 1024 * 1024) + b"}"
    head = (
        "POST http://api.openai.com/v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n"
        f"{auth()}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    status, answer = exchange(proxy.port, head.encode() + body)
    assert status.startswith(b"HTTP/1.1 403")
    assert b"api.openai.com" in answer and b"sec. 22" in answer
    [record] = blocked_records(ledger_url)
    assert record["data"]["host"] == "api.openai.com"
    assert record["context"] == {**record["context"], "kernel_id": KERNEL, "notebook": NOTEBOOK}


def test_each_kernel_is_recorded_under_its_own_credentials(proxy, ledger_url):
    """Verified credentials are cached per header value: a second kernel, and a forged
    token for the first kernel's id, must not ride on the first kernel's entry."""
    other = "7c2d-other-kernel"
    proxy.proxy.register_kernel(other, "study/other.ipynb")
    for kernel in (KERNEL, other, KERNEL):
        assert curl(proxy.url(kernel), "http://api.openai.com/v1/models")[1] == "403"
    records = blocked_records(ledger_url)
    assert [(r["context"]["kernel_id"], r["context"]["notebook"]) for r in records] == [
        (KERNEL, NOTEBOOK),
        (other, "study/other.ipynb"),
        (KERNEL, NOTEBOOK),
    ]
    assert curl(proxy.url(KERNEL, token=kernel_token(SECRET, other)), "http://x.test/")[1] == "407"


def test_unreachable_upstream_gets_502_naming_host(proxy):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    body, code, _ = curl(proxy.url(), f"http://data.registry.test:{port}/")
    assert code == "502"
    assert f"data.registry.test:{port}" in body


def test_host_names_are_resolved(proxy, local_server):
    """A destination that is a name (not in ``resolve``) is looked up off the event loop."""
    request = (
        f"GET http://localhost:{local_server.port}/ HTTP/1.1\r\n"
        f"Host: localhost:{local_server.port}\r\n{auth()}\r\n\r\n"
    )
    head, body = exchange(proxy.port, request.encode())
    assert head.split(b" ")[1] == b"200"
    assert body == LocalServer.body


@pytest.mark.parametrize("uvloop", [True, False], ids=["uvloop", "asyncio"])
def test_serve_runs_the_proxy_with_or_without_uvloop(local_server, uvloop):
    """``serve`` (what ``jupyter dua-guard proxy`` runs) uses uvloop when it can be
    imported and asyncio's own loop otherwise."""
    if uvloop:
        pytest.importorskip("uvloop")
    code = f"""
import asyncio, sys
if {not uvloop}:
    sys.modules["uvloop"] = None  # as if not installed
from jupyter_dua_guard.policy import Policy, build_policy
from jupyter_dua_guard.proxy import EgressProxy, serve
def ready(port):
    print(port, type(asyncio.get_running_loop()).__module__, flush=True)
proxy = EgressProxy(Policy(build_policy()), secret={SECRET!r},
                    resolve={{"data.registry.test": "127.0.0.1"}})
serve(proxy, 0, ready=ready)
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=PLAIN_ENV
    )
    try:
        port, module = proc.stdout.readline().split()
        assert module.startswith("uvloop" if uvloop else "asyncio")
        url = f"http://{KERNEL}:{kernel_token(SECRET, KERNEL)}@127.0.0.1:{port}"
        assert curl(url, f"http://data.registry.test:{local_server.port}/")[:2] == (
            LocalServer.body.decode(),
            "200",
        )
        assert curl(url, "http://api.openai.com/v1/models")[1] == "403"
    finally:
        proc.terminate()
        proc.wait(10)


def test_non_ascii_url_as_curl_sends_it_passes(proxy, local_server):
    """curl sends a URL's UTF-8 bytes unencoded (``/données.csv``): the proxy must relay
    such requests, not refuse them as malformed."""
    body, code, _ = curl(proxy.url(), f"http://data.registry.test:{local_server.port}/données.csv")
    assert (code, body) == ("200", LocalServer.body.decode())
