"""Egress proxy: the layer that also covers non-Python kernels, ``!curl`` and compiled code.

The kernel's audit hook only sees Python-level socket calls. Every kernel (of any
language) is given ``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY`` pointing here, with
per-kernel credentials in the URL, so requests and CONNECT tunnels to catalogued AI hosts
are refused with ``403`` and recorded against the kernel and notebook that asked.

Built on tornado's own networking (``TCPServer``, ``IOStream``, ``httputil`` parsing);
after the request head, bytes are relayed unchanged in both directions.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from tornado import httputil
from tornado.iostream import IOStream, StreamClosedError
from tornado.netutil import bind_sockets
from tornado.tcpclient import TCPClient
from tornado.tcpserver import TCPServer

from .policy import Decision, HostSet, Policy, is_loopback, normalize_host

log = logging.getLogger("jupyter_dua_guard.proxy")

EGRESS_MODES = ("blocklist", "allowlist")
MAX_HEAD = 64 * 1024
CHUNK = 256 * 1024
HOP_BY_HOP = (
    "Connection",
    "Keep-Alive",
    "Proxy-Authenticate",
    "Proxy-Authorization",
    "Proxy-Connection",
    "TE",
    "Trailer",
    "Upgrade",
)
#: Hosts that never go through the proxy: Jupyter's own traffic stays on loopback.
NO_PROXY = "localhost,127.0.0.1,::1,.localhost"
PROXY_ENV_NAMES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")

Recorder = Callable[[str, Mapping[str, Any], Mapping[str, Any]], None]


def kernel_token(secret: bytes, kernel_id: str) -> str:
    """The proxy password of one kernel: an HMAC, so the proxy keeps no per-kernel state."""
    return hmac.new(secret, kernel_id.encode(), hashlib.sha256).hexdigest()[:32]


def proxy_url(host: str, port: int, kernel_id: str, secret: bytes | None) -> str:
    """``http://<kernel id>:<token>@host:port`` (no credentials when there is no secret)."""
    where = f"[{host}]" if ":" in host else host
    if not secret or not kernel_id:
        return f"http://{where}:{port}"
    return f"http://{kernel_id}:{kernel_token(secret, kernel_id)}@{where}:{port}"


def proxy_env(url: str) -> dict[str, str]:
    """Environment variables that send a process's HTTP(S) traffic through ``url``."""
    env: dict[str, str] = {}
    for name in PROXY_ENV_NAMES:
        env[name] = url
        env[name.lower()] = url
    env["NO_PROXY"] = env["no_proxy"] = NO_PROXY
    return env


def refusal_body(host: str, provider: str) -> bytes:
    return (
        f"jupyter-dua-guard: connection to {host} ({provider}) refused. External AI services "
        "must not receive case-level data (NCCR Data Use Agreement sec. 22). The refusal was "
        "recorded. Ask your administrator if this host is an approved service "
        "(DUAGuard.allowed_hosts).\n"
    ).encode()


def not_allowed_body(host: str) -> bytes:
    return (
        f"jupyter-dua-guard: {host} is not on this site's egress allow-list "
        "(DUAGuard.egress_mode = 'allowlist'; add it to DUAGuard.egress_allowed_hosts). "
        "The refusal was recorded.\n"
    ).encode()


def _response(status: int, reason: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    ).encode() + body


def split_host_port(authority: str, default_port: int) -> tuple[str, int]:
    """``host[:port]`` / ``[v6]:port`` -> (host, port); raises ValueError when malformed."""
    if authority.startswith("["):
        end = authority.index("]")
        host, rest = authority[1:end], authority[end + 1 :]
        port = int(rest[1:]) if rest.startswith(":") else default_port
    elif authority.count(":") == 1:
        host, _, p = authority.partition(":")
        port = int(p)
    else:
        host, port = authority, default_port
    if not host or not 0 < port < 65536:
        raise ValueError(authority)
    return host, port


class EgressProxy(TCPServer):
    """HTTP forward and CONNECT proxy enforcing the guard's policy (see module docstring)."""

    def __init__(
        self,
        policy: Policy,
        *,
        record: Recorder | None = None,
        secret: bytes | None = None,
        require_auth: bool = True,
        egress_mode: str = "blocklist",
        egress_allowed_hosts: Iterable[str] = (),
        resolve: Mapping[str, str] | None = None,
        notebooks: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(max_buffer_size=MAX_HEAD + CHUNK)
        if egress_mode not in EGRESS_MODES:
            raise ValueError(
                f"unknown egress mode {egress_mode!r}: use one of {', '.join(EGRESS_MODES)}"
            )
        self.policy = policy
        self.record = record
        self.secret = secret
        self.require_auth = require_auth and bool(secret)
        self.egress_mode = egress_mode
        self.egress_allowed = HostSet(list(egress_allowed_hosts))
        self.resolve = {normalize_host(k) or k: v for k, v in (resolve or {}).items()}
        self.notebooks: dict[str, str] = dict(notebooks or {})
        self.host = "127.0.0.1"
        self.port = 0
        self._client = TCPClient()

    # -- life cycle
    def listen_loopback(self, port: int = 0, host: str = "127.0.0.1") -> int:
        """Bind ``host:port`` (0 = any free port) and return the port."""
        sockets = bind_sockets(port, host, family=socket.AF_INET if ":" not in host else 0)
        self.add_sockets(sockets)
        self.host = host
        self.port = sockets[0].getsockname()[1]
        return self.port

    def url_for(self, kernel_id: str) -> str:
        return proxy_url(self.host, self.port, kernel_id, self.secret)

    def register_kernel(self, kernel_id: str, notebook: str | None) -> None:
        """Remember which notebook a kernel belongs to, for the ledger's records."""
        if notebook:
            self.notebooks[kernel_id] = notebook

    # -- decisions
    def identify(self, headers: httputil.HTTPHeaders) -> tuple[str | None, bool]:
        """(kernel id, credentials valid) from ``Proxy-Authorization: Basic``."""
        value = headers.get("Proxy-Authorization", "")
        scheme, _, encoded = value.partition(" ")
        if scheme.lower() != "basic":
            return None, False
        try:
            user, _, password = base64.b64decode(encoded.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None, False
        if not self.secret:
            return user or None, True
        ok = hmac.compare_digest(password, kernel_token(self.secret, user))
        return (user if ok else None), ok

    def decide(self, host: str, port: int) -> tuple[str, str, str]:
        """(decision, normalized host, provider/reason); decision 'deny' = not allow-listed."""
        decision, name, why = self.policy.decide(host, port)
        if decision == Decision.BLOCK and self.policy.mode == "record":
            return Decision.ALLOW_AI, name, f"{why} (record mode)"
        if (
            decision == Decision.ALLOW
            and self.egress_mode == "allowlist"
            and not is_loopback(name)
            and self.egress_allowed.match(name) is None
            and self.policy.allowed.match(name) is None
        ):
            return "deny", name, "not on the egress allow-list"
        return decision, name, why

    def _record(self, kind: str, host: str, port: int, rule: str, kernel_id: str | None) -> None:
        if self.record is None:
            return
        data = {"host": host, "port": port, "rule": rule, "layer": "proxy"}
        context = {"kernel_id": kernel_id, "notebook": self.notebooks.get(kernel_id or "")}
        try:
            self.record(kind, data, context)
        except Exception as exc:  # the refusal stands even if it could not be written
            log.error("jupyter-dua-guard proxy: could not record %s to %s: %s", kind, host, exc)

    async def _record_async(self, *args: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._record, *args)

    # -- connections
    async def handle_stream(self, stream: IOStream, address: Any) -> None:
        try:
            await self._serve(stream)
        except (StreamClosedError, ConnectionError):
            pass
        except Exception as exc:
            log.warning("jupyter-dua-guard proxy: connection from %s failed: %s", address, exc)
        finally:
            stream.close()

    async def _serve(self, stream: IOStream) -> None:
        head = await stream.read_until_regex(b"\r?\n\r?\n", max_bytes=MAX_HEAD)
        text = head.decode("latin-1")
        first, _, rest = text.partition("\n")
        try:
            start = httputil.parse_request_start_line(first.strip())
            headers = httputil.HTTPHeaders.parse(rest)
        except httputil.HTTPInputError:
            await stream.write(_response(400, "Bad Request", b"malformed proxy request\n"))
            return
        if start.method == "CONNECT":
            target, default_port = start.path, 443
        else:
            parsed = httputil.urlparse(start.path)
            if parsed.scheme != "http" or not parsed.netloc:
                body = b"this is a proxy: send absolute http:// URLs or CONNECT\n"
                await stream.write(_response(400, "Bad Request", body))
                return
            target, default_port = parsed.netloc.rpartition("@")[2], 80
        try:
            host, port = split_host_port(target, default_port)
        except ValueError:
            await stream.write(_response(400, "Bad Request", b"malformed destination\n"))
            return
        kernel_id, authenticated = self.identify(headers)
        decision, name, why = self.decide(host, port)
        if decision in (Decision.BLOCK, "deny"):
            await self._record_async("egress_blocked", name, port, why, kernel_id)
            body = refusal_body(name, why) if decision == Decision.BLOCK else not_allowed_body(name)
            await stream.write(_response(403, "Forbidden", body))
            return
        if self.require_auth and not authenticated:
            body = b"jupyter-dua-guard proxy: use the proxy URL given to your kernel\n"
            extra = 'Proxy-Authenticate: Basic realm="jupyter-dua-guard"\r\n'
            await stream.write(_response(407, "Proxy Authentication Required", body, extra))
            return
        if decision == Decision.ALLOW_AI:
            await self._record_async("egress_allowed_ai", name, port, why, kernel_id)
        address = self.resolve.get(name, host)
        try:
            upstream = await self._client.connect(address, port)
        except (OSError, StreamClosedError) as exc:
            msg = f"jupyter-dua-guard proxy: cannot reach {name}:{port} ({exc})\n".encode()
            await stream.write(_response(502, "Bad Gateway", msg))
            return
        upstream.set_nodelay(True)
        stream.set_nodelay(True)
        try:
            if start.method == "CONNECT":
                await stream.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                await upstream.write(self._origin_request(start, headers, host, port))
            await asyncio.gather(self._pipe(stream, upstream), self._pipe(upstream, stream))
        finally:
            upstream.close()

    @staticmethod
    def _origin_request(
        start: httputil.RequestStartLine, headers: httputil.HTTPHeaders, host: str, port: int
    ) -> bytes:
        parsed = httputil.urlparse(start.path)
        path = parsed.path or "/"
        if parsed.query:
            path += "?" + parsed.query
        for name in HOP_BY_HOP:
            headers.pop(name, None)
        if "Host" not in headers:
            headers["Host"] = host if port == 80 else f"{host}:{port}"
        headers["Connection"] = "close"
        lines = [f"{start.method} {path} {start.version}"]
        lines += [f"{k}: {v}" for k, v in headers.get_all()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    @staticmethod
    async def _pipe(src: IOStream, dst: IOStream) -> None:
        try:
            while True:
                chunk = await src.read_bytes(CHUNK, partial=True)
                await dst.write(chunk)
        except StreamClosedError:
            pass
        finally:
            # half-close is not available on IOStream: closing both ends finishes the exchange
            dst.close()


def new_secret() -> bytes:
    return secrets.token_bytes(32)


def ledger_recorder(ledger_url: str | None) -> Recorder:
    """A recorder writing to the usage ledger (opened on first refusal)."""
    from .ledger import open_ledger

    opened: list[Any] = []

    def record(kind: str, data: Mapping[str, Any], context: Mapping[str, Any]) -> None:
        if not opened:
            opened.append(open_ledger(ledger_url))
        opened[0].append(kind, data, context)

    return record
