"""Egress proxy: the layer that also covers non-Python kernels, ``!curl`` and compiled code.

The kernel's audit hook only sees Python-level socket calls. Every kernel (of any
language) is given ``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY`` pointing here, with
per-kernel credentials in the URL, so requests and CONNECT tunnels to catalogued AI hosts
are refused with ``403`` and recorded against the kernel and notebook that asked.

Request heads are parsed with tornado's ``httputil``; after the head, bytes are relayed
unchanged in both directions by asyncio protocols.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import re
import secrets
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from tornado import httputil
from tornado.ioloop import IOLoop
from tornado.netutil import bind_sockets

from .policy import Decision, HostSet, Policy, is_loopback, normalize_host

log = logging.getLogger("jupyter_dua_guard.proxy")

EGRESS_MODES = ("blocklist", "allowlist")
MAX_HEAD = 64 * 1024
RELAY_READ_SIZE = 1 << 20
_HEAD_END = re.compile(rb"\r?\n\r?\n")
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


def _tune(transport: Any) -> None:
    """Read up to 1 MiB per call (asyncio's default is 256 KiB): fewer Python-level
    round trips on large downloads."""
    if hasattr(transport, "max_size"):
        transport.max_size = RELAY_READ_SIZE


class _Downstream(asyncio.Protocol):
    """The client side of one proxied connection: reads the request head, then relays."""

    def __init__(self, proxy: EgressProxy) -> None:
        self.proxy = proxy
        self.transport: Any = None
        self.up: Any = None
        self.head = bytearray()
        self.pending: list[bytes] = []
        self.dispatched = False
        self.closed = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        _tune(transport)

    def data_received(self, data: bytes) -> None:
        if self.up is not None:
            self.up.write(data)
            return
        if self.dispatched:
            self.pending.append(data)
            return
        self.head += data
        match = _HEAD_END.search(self.head)
        if match is None:
            if len(self.head) > MAX_HEAD:
                self.reply(431, "Request Header Fields Too Large", b"request head too large\n")
            return
        self.dispatched = True
        head, rest = bytes(self.head[: match.end()]), bytes(self.head[match.end() :])
        self.head = bytearray()
        if rest:
            self.pending.append(rest)
        self.transport.pause_reading()
        task = asyncio.ensure_future(self.proxy._dispatch(self, head))
        self.proxy._tasks.add(task)
        task.add_done_callback(self.proxy._tasks.discard)

    def reply(self, status: int, reason: str, body: bytes, extra: str = "") -> None:
        if not self.closed:
            self.transport.write(_response(status, reason, body, extra))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.up is not None:
            self.up.close()

    def pause_writing(self) -> None:
        if self.up is not None:
            self.up.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None:
            self.up.resume_reading()


class _Upstream(asyncio.Protocol):
    """The server side of one proxied connection: relays bytes back to the client."""

    def __init__(self, down: _Downstream) -> None:
        self.down = down

    def connection_made(self, transport: Any) -> None:
        _tune(transport)

    def data_received(self, data: bytes) -> None:
        self.down.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.down.transport.close()  # close() flushes what is buffered first

    def pause_writing(self) -> None:
        self.down.transport.pause_reading()

    def resume_writing(self) -> None:
        self.down.transport.resume_reading()


class EgressProxy:
    """HTTP forward and CONNECT proxy enforcing the guard's policy (see module docstring).

    Request heads are parsed with tornado's ``httputil``; after the head, asyncio
    protocols relay bytes with flow control (IOStream copies cost 4x the throughput).
    """

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
        self._server: Any = None
        self._starting: Any = None
        self._tasks: set[Any] = set()

    # -- life cycle
    def listen_loopback(self, port: int = 0, host: str = "127.0.0.1") -> int:
        """Bind ``host:port`` now (0 = any free port); serve once the event loop runs."""
        sockets = bind_sockets(port, host, family=socket.AF_INET if ":" not in host else 0)
        sock = sockets[0]
        for extra in sockets[1:]:
            extra.close()
        self.host = host
        self.port = sock.getsockname()[1]
        loop = IOLoop.current().asyncio_loop  # type: ignore[attr-defined]

        async def serve() -> None:
            self._server = await loop.create_server(lambda: _Downstream(self), sock=sock)

        self._starting = asyncio.ensure_future(serve(), loop=loop)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        elif self._starting is not None:
            self._starting.cancel()

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

    # -- one connection
    async def _dispatch(self, down: _Downstream, head: bytes) -> None:
        try:
            await self._dispatch_checked(down, head)
        except Exception as exc:
            log.warning("jupyter-dua-guard proxy: request failed: %s", exc)
            down.reply(500, "Internal Server Error", b"jupyter-dua-guard proxy error\n")

    async def _dispatch_checked(self, down: _Downstream, head: bytes) -> None:
        text = head.decode("latin-1")
        first, _, rest = text.partition("\n")
        try:
            start = httputil.parse_request_start_line(first.strip())
            headers = httputil.HTTPHeaders.parse(rest)
        except httputil.HTTPInputError:
            down.reply(400, "Bad Request", b"malformed proxy request\n")
            return
        if start.method == "CONNECT":
            target, default_port = start.path, 443
        else:
            parsed = httputil.urlparse(start.path)
            if parsed.scheme != "http" or not parsed.netloc:
                body = b"this is a proxy: send absolute http:// URLs or CONNECT\n"
                down.reply(400, "Bad Request", body)
                return
            target, default_port = parsed.netloc.rpartition("@")[2], 80
        try:
            host, port = split_host_port(target, default_port)
        except ValueError:
            down.reply(400, "Bad Request", b"malformed destination\n")
            return
        kernel_id, authenticated = self.identify(headers)
        decision, name, why = self.decide(host, port)
        if decision in (Decision.BLOCK, "deny"):
            await self._record_async("egress_blocked", name, port, why, kernel_id)
            body = refusal_body(name, why) if decision == Decision.BLOCK else not_allowed_body(name)
            down.reply(403, "Forbidden", body)
            return
        if self.require_auth and not authenticated:
            body = b"jupyter-dua-guard proxy: use the proxy URL given to your kernel\n"
            extra = 'Proxy-Authenticate: Basic realm="jupyter-dua-guard"\r\n'
            down.reply(407, "Proxy Authentication Required", body, extra)
            return
        if decision == Decision.ALLOW_AI:
            await self._record_async("egress_allowed_ai", name, port, why, kernel_id)
        address = self.resolve.get(name, host)
        loop = asyncio.get_running_loop()
        try:
            up, _ = await loop.create_connection(lambda: _Upstream(down), address, port)
        except OSError as exc:
            msg = f"jupyter-dua-guard proxy: cannot reach {name}:{port} ({exc})\n".encode()
            down.reply(502, "Bad Gateway", msg)
            return
        if down.closed:
            up.close()
            return
        if start.method == "CONNECT":
            down.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            up.write(self._origin_request(start, headers, host, port))
        for chunk in down.pending:
            up.write(chunk)
        down.pending = []
        down.up = up
        down.transport.resume_reading()

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
