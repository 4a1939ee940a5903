"""Egress proxy: the layer that also covers non-Python kernels, ``!curl`` and compiled code.

The kernel's audit hook only sees Python-level socket calls. Every kernel (of any
language) is given ``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY`` pointing here, with
per-kernel credentials in the URL, so requests and CONNECT tunnels to catalogued AI hosts
are refused with ``403`` and recorded against the kernel and notebook that asked.

Request heads are parsed with tornado's ``httputil``. After the head, bytes are relayed
unchanged in both directions with the event loop's ``add_reader``/``add_writer`` on the
raw sockets: on Linux through a pipe with ``splice(2)``, so the payload never enters
Python (copying through user space costs the proxy ~3x the CPU time per byte);
elsewhere with ``recv_into``/``send`` through a buffer per direction. Callbacks rather
than a task and transports per connection keep the per-request cost low (most kernel
traffic is many small requests, one connection each). Works on any asyncio loop;
:func:`serve` runs a standalone proxy on uvloop when it is installed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import hmac
import logging
import os
import re
import secrets
import socket
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from tornado import httputil
from tornado.ioloop import IOLoop
from tornado.netutil import bind_sockets

from .policy import Decision, HostSet, Policy, is_loopback, normalize_host

log = logging.getLogger("jupyter_dua_guard.proxy")

EGRESS_MODES = ("blocklist", "allowlist")
MAX_HEAD = 64 * 1024
#: Bytes moved per read: the pipe's size with splice(2), the buffer's without.
RELAY_CHUNK = 1 << 20
COPY_BUFFER = 256 * 1024
ACCEPT_BATCH = 64
PIPE_POOL = 32
#: A read this large grows the flow's pipe to RELAY_CHUNK (fewer, larger splices).
PIPE_GROW_AT = 64 * 1024
READS_PER_TURN = 16
#: Seconds a refused client may go on sending (a request body) before it is cut off.
LINGER = 5.0
#: Decisions and verified credentials kept per proxy (all are pure functions of settings
#: fixed at construction); the caches are emptied when full.
CACHE_SIZE = 4096
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    }
)
#: Hosts that never go through the proxy: Jupyter's own traffic stays on loopback.
NO_PROXY = "localhost,127.0.0.1,::1,.localhost"
PROXY_ENV_NAMES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
CONNECTED = b"HTTP/1.1 200 Connection established\r\n\r\n"

Recorder = Callable[[str, Mapping[str, Any], Mapping[str, Any]], None]

_SPLICE = getattr(os, "splice", None) if sys.platform.startswith("linux") else None
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_AGAIN = (BlockingIOError, InterruptedError)


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


def _ip_family(address: str) -> int:
    """The address family of an IP literal, 0 for a name that needs resolving."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, address)
        except OSError:
            continue
        return family
    return 0


class _PipePool:
    """Empty pipes for splice(2), reused: creating two per connection would cost small
    requests more than splicing saves them. Pipes start at the system's default size and
    a flow grows its own to :data:`RELAY_CHUNK` once it moves that much at a time (large
    transfers); grown pipes are not kept, since every pipe's size counts against the
    user's pipe quota (``/proc/sys/fs/pipe-user-pages-soft``), which kernels share."""

    def __init__(self) -> None:
        self.free: list[tuple[int, int]] = []
        self.closed = False

    def get(self) -> tuple[int, int] | None:
        if self.free:
            return self.free.pop()
        try:
            return os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None

    def put(self, pipe: tuple[int, int], reusable: bool) -> None:
        if reusable and not self.closed and len(self.free) < PIPE_POOL:
            self.free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def close(self) -> None:
        self.closed = True
        while self.free:
            r, w = self.free.pop()
            os.close(r)
            os.close(w)


class _Flow:
    """One direction of a relayed connection: bytes from ``src`` to ``dst`` in order, with
    back-pressure (``src`` is not read while ``dst`` has not taken what was read)."""

    __slots__ = (
        "buf",
        "conn",
        "dst",
        "dst_fd",
        "eof",
        "grown",
        "held",
        "loop",
        "pending",
        "pipe",
        "reading",
        "src",
        "src_fd",
        "upstream",
        "writing",
    )

    def __init__(
        self, conn: _Connection, src: socket.socket, dst: socket.socket, upstream: bool
    ) -> None:
        self.conn = conn
        self.loop = conn.loop
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.upstream = upstream  # True: server -> client (its end closes the connection)
        self.pipe: tuple[int, int] | None = None
        self.buf: memoryview | None = None
        self.pending: memoryview | bytes = b""
        self.held = 0
        self.reading = self.writing = self.eof = self.grown = False

    def start(self, first: bytes, read_now: bool) -> None:
        """Send ``first``, then relay; ``read_now``: try ``src`` before the next turn."""
        self.pending = first
        if _SPLICE is not None:
            self.pipe = self.conn.proxy._pipes.get()
        if self.pipe is None:
            self.buf = memoryview(bytearray(COPY_BUFFER))
        if not self.send():
            return
        if read_now:
            self.readable()
        else:
            self.loop.add_reader(self.src_fd, self.readable)
            self.reading = True

    def readable(self) -> None:
        """Move data until ``src`` has no more (or ``dst`` is full): one turn of the event
        loop relays a response and its end, not one read each."""
        for _ in range(READS_PER_TURN):
            try:
                if self.pipe is not None:
                    n = self.held = _SPLICE(
                        self.src_fd, self.pipe[1], RELAY_CHUNK, flags=_SPLICE_FLAGS
                    )  # type: ignore[misc]
                    if n >= PIPE_GROW_AT and not self.grown:
                        self.grow()
                else:
                    n = self.src.recv_into(self.buf)  # type: ignore[arg-type]
                    self.pending = self.buf[:n]  # type: ignore[index]
            except _AGAIN:
                break
            except OSError:
                self.conn.close()
                return
            if n == 0:
                self.eof = True
            if not self.send() or self.eof:
                return
        if not self.reading:
            self.loop.add_reader(self.src_fd, self.readable)
            self.reading = True

    def grow(self) -> None:
        """A large transfer: a 1 MiB pipe takes ~40% off the proxy's CPU time per byte."""
        self.grown = True
        with contextlib.suppress(OSError):  # over the pipe quota: keep the small pipe
            import fcntl

            fcntl.fcntl(self.pipe[1], fcntl.F_SETPIPE_SZ, RELAY_CHUNK)  # type: ignore[index]

    def send(self) -> bool:
        """Send what was read; False when ``dst`` is full (then wait) or gone."""
        try:
            while self.pending:
                self.pending = self.pending[self.dst.send(self.pending) :]
            while self.held:
                self.held -= _SPLICE(self.pipe[0], self.dst_fd, self.held, flags=_SPLICE_FLAGS)  # type: ignore[index,misc]
        except _AGAIN:
            if self.reading:
                self.loop.remove_reader(self.src_fd)
                self.reading = False
            if not self.writing:
                self.loop.add_writer(self.dst_fd, self.writable)
                self.writing = True
            return False
        except OSError:
            self.conn.close()
            return False
        if self.eof:
            self.finish()
        return True

    def writable(self) -> None:
        if self.send() and not self.eof:
            self.loop.remove_writer(self.dst_fd)
            self.writing = False
            self.readable()

    def finish(self) -> None:
        """End of ``src``: the server's end closes the connection (as HTTP/1.0 and
        ``Connection: close`` responses need); the client's only half-closes it, so a
        client that shuts down its sending side still gets the answer."""
        self.stop()
        if self.upstream or self.conn.other(self).eof:
            self.conn.close()
        else:
            with contextlib.suppress(OSError):
                self.dst.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.src_fd)
            self.reading = False
        if self.writing:
            self.loop.remove_writer(self.dst_fd)
            self.writing = False

    def release(self) -> None:
        self.stop()
        if self.pipe is not None:
            self.conn.proxy._pipes.put(self.pipe, reusable=self.held == 0 and not self.grown)
            self.pipe = None


class _Connection:
    """One client connection: its request head, the decision, then two flows."""

    __slots__ = ("client", "closed", "flows", "head", "loop", "proxy", "reading", "up")

    def __init__(self, proxy: EgressProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.loop = proxy._loop
        self.client = client
        self.up: socket.socket | None = None
        self.head = b""
        self.flows: tuple[_Flow, _Flow] | None = None
        self.reading = False
        self.closed = False

    def read_head(self) -> None:
        try:
            data = self.client.recv(MAX_HEAD)
        except _AGAIN:
            if not self.reading:
                self.loop.add_reader(self.client.fileno(), self.read_head)
                self.reading = True
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        self.head += data
        match = _HEAD_END.search(self.head)
        if match is None:
            if len(self.head) > MAX_HEAD:
                self.reply(431, "Request Header Fields Too Large", b"request head too large\n")
            elif not self.reading:
                self.loop.add_reader(self.client.fileno(), self.read_head)
                self.reading = True
            return
        if self.reading:
            self.loop.remove_reader(self.client.fileno())
            self.reading = False
        head, rest = self.head[: match.end()], self.head[match.end() :]
        self.head = b""
        try:
            self.proxy._dispatch(self, head, rest)
        except Exception as exc:
            log.warning("jupyter-dua-guard proxy: request failed: %s", exc)
            self.reply(500, "Internal Server Error", b"jupyter-dua-guard proxy error\n")

    def other(self, flow: _Flow) -> _Flow:
        assert self.flows is not None
        return self.flows[0] if flow is self.flows[1] else self.flows[1]

    def relay(self, up: socket.socket, to_server: bytes, to_client: bytes) -> None:
        """Connected upstream: start both flows with what each side must see first."""
        self.up = up
        self.flows = (_Flow(self, self.client, up, False), _Flow(self, up, self.client, True))
        # The client has sent its request (and usually nothing more); the server may
        # well have answered already when it runs on another core.
        self.flows[0].start(to_server, read_now=False)
        if not self.closed:
            self.flows[1].start(to_client, read_now=True)

    def reply(self, status: int, reason: str, body: bytes, extra: str = "") -> None:
        """Answer the client ourselves (short answers fit any socket buffer), then close
        once the client has stopped sending: closing with a request body still arriving
        would reset the connection and could discard the answer before it is read."""
        if self.closed:
            return
        try:
            self.client.send(_response(status, reason, body, extra))
            self.client.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return
        if self.reading:
            self.loop.remove_reader(self.client.fileno())
        self.loop.add_reader(self.client.fileno(), self._discard)
        self.reading = True
        self.loop.call_later(LINGER, self.close)

    def _discard(self) -> None:
        try:
            if self.client.recv(MAX_HEAD):
                return
        except _AGAIN:
            return
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.reading:
            self.loop.remove_reader(self.client.fileno())
            self.reading = False
        if self.flows is not None:
            for flow in self.flows:
                flow.release()
        if self.up is not None:
            self.up.close()
        self.client.close()


class EgressProxy:
    """HTTP forward and CONNECT proxy enforcing the guard's policy (see module docstring).

    Settings are fixed at construction: decisions and verified credentials are cached.
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
        self._loop: Any = None
        self._sock: socket.socket | None = None
        self._pipes = _PipePool()
        self._decisions: dict[tuple[str, int], tuple[str, str, str]] = {}
        self._credentials: dict[str, tuple[str | None, bool]] = {}
        self._families: dict[str, int] = {}

    # -- life cycle
    def listen_loopback(self, port: int = 0, host: str = "127.0.0.1") -> int:
        """Bind ``host:port`` now (0 = any free port); serve once the event loop runs."""
        sockets = bind_sockets(
            port, host, family=socket.AF_INET if ":" not in host else 0, backlog=1024
        )
        sock = sockets[0]
        for extra in sockets[1:]:
            extra.close()
        self.host = host
        self.port = sock.getsockname()[1]
        if hasattr(socket, "TCP_DEFER_ACCEPT"):
            # Wake up once the request has arrived, not once for the connection and once
            # more for its request (clients of a proxy always speak first).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = IOLoop.current().asyncio_loop  # type: ignore[attr-defined]
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._accept)
        return self.port

    def stop(self) -> None:
        """Stop accepting; connections being relayed finish on their own."""
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            self._pipes.close()

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
        known = self._credentials.get(value)
        if known is None:
            known = self._identify(value)
            if len(self._credentials) >= CACHE_SIZE:
                self._credentials.clear()
            self._credentials[value] = known
        return known

    def _identify(self, value: str) -> tuple[str | None, bool]:
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
        key = (host, port)
        known = self._decisions.get(key)
        if known is None:
            known = self._decide(host, port)
            if len(self._decisions) >= CACHE_SIZE:
                self._decisions.clear()
            self._decisions[key] = known
        return known

    def _decide(self, host: str, port: int) -> tuple[str, str, str]:
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

    def _record_then(self, then: Callable[[], None], *args: Any) -> None:
        """Record off the event loop (ledger writes block), then go on."""
        if self.record is None:
            then()
            return
        future = self._loop.run_in_executor(None, self._record, *args)
        future.add_done_callback(lambda _: then())

    # -- connections
    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if self._sock is None:
                return
            try:
                client, _ = self._sock.accept()
            except _AGAIN:
                return
            except OSError as exc:  # e.g. out of file descriptors: try again later
                log.warning("jupyter-dua-guard proxy: accept failed: %s", exc)
                return
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # The request is usually there already: read it now, not on the next turn.
            _Connection(self, client).read_head()

    def _dispatch(self, conn: _Connection, head: bytes, rest: bytes) -> None:
        text = head.decode("latin-1")
        first, _, lines = text.partition("\n")
        try:
            start = httputil.parse_request_start_line(first.strip())
            headers = httputil.HTTPHeaders.parse(lines)
        except httputil.HTTPInputError:
            conn.reply(400, "Bad Request", b"malformed proxy request\n")
            return
        if start.method == "CONNECT":
            target, default_port = start.path, 443
        else:
            parsed = urlsplit(start.path)
            if parsed.scheme != "http" or not parsed.netloc:
                body = b"this is a proxy: send absolute http:// URLs or CONNECT\n"
                conn.reply(400, "Bad Request", body)
                return
            target, default_port = parsed.netloc.rpartition("@")[2], 80
        try:
            host, port = split_host_port(target, default_port)
        except ValueError:
            conn.reply(400, "Bad Request", b"malformed destination\n")
            return
        kernel_id, authenticated = self.identify(headers)
        decision, name, why = self.decide(host, port)
        if decision in (Decision.BLOCK, "deny"):
            body = refusal_body(name, why) if decision == Decision.BLOCK else not_allowed_body(name)
            self._record_then(
                lambda: conn.reply(403, "Forbidden", body),
                "egress_blocked",
                name,
                port,
                why,
                kernel_id,
            )
            return
        if self.require_auth and not authenticated:
            body = b"jupyter-dua-guard proxy: use the proxy URL given to your kernel\n"
            extra = 'Proxy-Authenticate: Basic realm="jupyter-dua-guard"\r\n'
            conn.reply(407, "Proxy Authentication Required", body, extra)
            return
        if start.method == "CONNECT":
            to_server, to_client = rest, CONNECTED
        else:
            path = parsed.path or "/"
            if parsed.query:
                path += "?" + parsed.query
            origin = self._origin_request(start.method, path, start.version, headers, host, port)
            to_server, to_client = origin + rest, b""

        def connect() -> None:
            self._connect(conn, name, self.resolve.get(name, host), port, to_server, to_client)

        if decision == Decision.ALLOW_AI:
            self._record_then(connect, "egress_allowed_ai", name, port, why, kernel_id)
        else:
            connect()

    def _connect(
        self,
        conn: _Connection,
        name: str,
        address: str,
        port: int,
        to_server: bytes,
        to_client: bytes,
    ) -> None:
        """Connect to ``address`` (resolved off the loop when it is a name), then relay."""
        if conn.closed:
            return

        def failed(exc: BaseException) -> None:
            msg = f"jupyter-dua-guard proxy: cannot reach {name}:{port} ({exc})\n".encode()
            conn.reply(502, "Bad Gateway", msg)

        def attempt(candidates: list[tuple[int, Any]], last: BaseException | None) -> None:
            if conn.closed:
                return
            if not candidates:
                failed(last or OSError("no address"))
                return
            family, sockaddr = candidates.pop(0)
            try:
                up = socket.socket(family, socket.SOCK_STREAM)
            except OSError as exc:
                attempt(candidates, exc)
                return
            up.setblocking(False)
            code = up.connect_ex(sockaddr)
            if code not in (0, errno.EINPROGRESS):
                up.close()
                attempt(candidates, OSError(code, os.strerror(code)))
                return
            fd = up.fileno()

            def connected(waited: bool = True) -> None:
                code = 0
                if waited:
                    self._loop.remove_writer(fd)
                    code = up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if conn.closed:
                    up.close()
                elif code:
                    up.close()
                    attempt(candidates, OSError(code, os.strerror(code)))
                else:
                    up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conn.relay(up, to_server, to_client)

            if code == errno.EINPROGRESS:
                try:  # a nearby server has usually answered already: no need to wait a turn
                    up.getpeername()
                except OSError:
                    self._loop.add_writer(fd, connected)
                    return
            connected(waited=False)

        family = self._families.get(address)
        if family is None:
            family = _ip_family(address)
            if len(self._families) >= CACHE_SIZE:
                self._families.clear()
            self._families[address] = family
        if family:
            attempt([(family, (address, port))], None)
            return
        future = self._loop.getaddrinfo(address, port, type=socket.SOCK_STREAM)

        def resolved(future: Any) -> None:
            exc = future.exception()
            if exc is not None:
                failed(exc)
            else:
                attempt([(info[0], info[4]) for info in future.result()], None)

        asyncio.ensure_future(future, loop=self._loop).add_done_callback(resolved)

    @staticmethod
    def _origin_request(
        method: str, path: str, version: str, headers: httputil.HTTPHeaders, host: str, port: int
    ) -> bytes:
        """The request as the origin server expects it: origin-form target, no hop-by-hop
        headers (nor those the client's ``Connection`` header names), one request only."""
        drop = HOP_BY_HOP
        if "Connection" in headers:
            drop = drop | {t.strip().lower() for t in headers["Connection"].split(",")}
        lines = [f"{method} {path} {version}"]
        lines += [f"{k}: {v}" for k, v in headers.get_all() if k.lower() not in drop]
        if "Host" not in headers:
            lines.append("Host: " + (host if port == 80 else f"{host}:{port}"))
        lines.append("Connection: close\r\n\r\n")
        return "\r\n".join(lines).encode("latin-1")


def new_secret() -> bytes:
    return secrets.token_bytes(32)


def serve(
    proxy: EgressProxy,
    port: int,
    host: str = "127.0.0.1",
    *,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Run ``proxy`` as a standalone service until interrupted, on uvloop when installed
    (its event loop, written in C, takes some 5-10% off the proxy's CPU time per request)."""

    async def main() -> None:
        bound = proxy.listen_loopback(port, host)
        if ready is not None:
            ready(bound)
        await asyncio.Event().wait()

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


def ledger_recorder(ledger_url: str | None) -> Recorder:
    """A recorder writing to the usage ledger (opened on first refusal)."""
    from .ledger import open_ledger

    opened: list[Any] = []

    def record(kind: str, data: Mapping[str, Any], context: Mapping[str, Any]) -> None:
        if not opened:
            opened.append(open_ledger(ledger_url))
        opened[0].append(kind, data, context)

    return record
