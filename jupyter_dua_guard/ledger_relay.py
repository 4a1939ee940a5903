"""Append relay for the PostgreSQL ledger: one server's kernels share a few connections.

Every append to the hub ledger is a durable transaction on the database, and a transaction
costs the server far more than chaining one more record does. A relay runs beside each
Jupyter server (in its process) and listens on a Unix socket in the user's private runtime
directory. Kernels send their prepared events there instead of to the database; whenever
one of the relay's connections is free it takes everything that has queued meanwhile and
chains it with one ``submit`` call, then answers each kernel with its records once they are
durable. Under load many kernels' events share each transaction; alone, a kernel's event
goes out at once. A hub also needs only a couple of connections per server, not one per
kernel.

The relay adds no trust: it is the user's own process (the socket accepts only the same
user), the database still chains and hashes, and each kernel checks the hashes it gets back.
When the relay is gone or fails, a kernel appends directly or spools, as without a relay
(see ``ledger_pg``): a spool flush skips events already stored, so an answer lost with a
dying relay never duplicates an event.

The relay is one thread around an event loop, talking to PostgreSQL through libpq's
non-blocking calls; frames are plain lines (canonical JSON never contains a raw tab or
newline). The loop runs in C (``_relay_fast``: a pthread around epoll, the system's libpq,
no GIL per event) when that module was built: in Python it costs 65-100 µs of CPU per
event, more than the database spends storing it. Without it (no compiler, or
``JUPYTER_DUA_GUARD_NO_C=1``) the same loop runs in Python (``selectors`` and psycopg's
``pq`` layer). Both share what is said to kernels: the C loop has ``_explain`` word its
failures with ``ledger_pg``'s own functions. A kernel's side (``RelayClient.store``) is one
C call too when ``_chain_fast`` has ``relay_store``; ``submit`` and ``ledger_pg``'s checks
are its fallback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import select
import selectors
import socket
import stat
import struct
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

try:  # the relay loop in C (built with libpq); the Python loop below is the fallback
    from . import _relay_fast
except ImportError:  # pragma: no cover - depends on the build
    _relay_fast = None  # type: ignore[assignment]

try:  # a kernel's relayed append in C (RelayClient.store); else submit() and ledger_pg check
    from ._chain_fast import relay_store as _relay_store
except ImportError:  # pragma: no cover - depends on the build
    _relay_store = None

__all__ = ["LedgerRelay", "RelayClient", "RelayError", "RelayUnknown", "relay_url"]

_LENGTH = struct.Struct("!I")
_MAX_MESSAGE = 64 * 1024 * 1024  # a runaway peer cannot make either side buffer more
_MAX_BATCH = 1000  # events per database call


class RelayError(Exception):
    """The relay could not be used; nothing was handed over, so send the events elsewhere."""


class RelayUnknown(RelayError):
    """The events were handed over but no records came back: they may be stored or not."""


def _frame(payload: bytes) -> bytes:
    return _LENGTH.pack(len(payload)) + payload


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return bytes(buf)


class RelayClient:
    """A kernel's connection to its server's relay (one per process; the caller locks)."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        _kernel_timeouts(sock, self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise RelayError(f"relay {self.path}: {exc.strerror or exc}") from None
        self._sock = sock
        return sock

    def submit(self, heads: list[str], times: list[str]) -> list[tuple[int, str, str]]:
        """``(seq, prev, hash)`` of each event, once durable in the database."""
        payload = "\n".join(t + "\t" + h for h, t in zip(heads, times, strict=True)).encode()
        sock = self._sock or self._connect()
        try:
            sock.sendall(_frame(payload))
            answer = _read_frame(sock)
        except (OSError, ValueError) as exc:
            # Sent in part or whole, or not at all: only a flush can tell, so "unknown".
            self.close()
            raise RelayUnknown(f"relay {self.path} gave no answer ({exc})") from None
        except BaseException:  # e.g. an interrupt mid-answer: its rest must not be read later
            self.close()
            raise
        if answer.startswith(b"!"):
            raise RelayUnknown(answer[1:].decode(errors="replace"))
        try:
            rows = [
                (int(s), p, h)
                for s, p, h in (line.split("\t") for line in answer.decode().split("\n"))
            ]
        except ValueError:
            rows = []
        if len(rows) != len(heads):
            self.close()
            raise RelayUnknown(f"relay {self.path} gave a malformed answer")
        return rows

    def store(self, prepared: list[dict[str, Any]]) -> list[dict[str, Any]] | int:
        """The records of ``prepared`` (as ``Ledger._stored`` gives them) once durable, or the
        seq of the first one whose hash is not this client's: ``submit`` and the ledger's
        checks in one C call (``_chain_fast.relay_store``), which touches far less memory
        than the interpreter does between two appends (a writer's CPU per append)."""
        sock = self._sock or self._connect()
        try:
            out = _relay_store(sock.fileno(), prepared, json.loads)
        except OSError as exc:
            self.close()
            raise RelayUnknown(f"relay {self.path} gave no answer ({exc})") from None
        except BaseException:
            self.close()
            raise
        if type(out) is list or type(out) is int:
            return out
        if out is None:
            self.close()
            raise RelayUnknown(f"relay {self.path} gave a malformed answer")
        raise RelayUnknown(out)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


def _kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    """Blocking calls bounded by the kernel (SO_RCVTIMEO/SO_SNDTIMEO): Python's own socket
    timeouts add a poll() before every call."""
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


def _read_frame(sock: socket.socket) -> bytes:
    """One length-prefixed message; usually a single recv()."""
    buf = sock.recv(1 << 16)
    if not buf:
        raise ConnectionError("connection closed")
    if len(buf) < _LENGTH.size:
        buf += _recv_exact(sock, _LENGTH.size - len(buf))
    (size,) = _LENGTH.unpack_from(buf)
    if size > _MAX_MESSAGE:
        raise ConnectionError(f"message of {size} bytes")
    missing = _LENGTH.size + size - len(buf)
    if missing > 0:
        buf += _recv_exact(sock, missing)
    return buf[_LENGTH.size :]


class _Client:
    __slots__ = ("buf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, bytearray()


class _Link:
    """One database connection and the requests its call in flight answers."""

    __slots__ = ("fd", "ledger", "pgconn", "waiting")

    def __init__(self, ledger: Any) -> None:
        self.ledger = ledger
        self.pgconn: Any = None
        self.fd = -1
        self.waiting: list[tuple[_Client, int]] | None = None


class LedgerRelay:
    """Serve ``socket_path`` for this user's kernels, with ``connections`` calls in flight.

    One connection makes the largest batches; a second lets one batch be chained while the
    previous one waits for its flush (``DUAGuard.ledger_relay_connections``).
    """

    def __init__(
        self,
        url: str,
        socket_path: str | os.PathLike[str],
        connections: int = 1,
        log: logging.Logger | None = None,
    ) -> None:
        from .ledger_pg import (
            _META_SQL,
            _SUBMIT_CALL_PQ,
            SCHEMA,
            PostgresLedger,
            _session_setup,
            split_url,
        )

        self.log = log or logging.getLogger(__name__)
        self.url = url
        self.path = str(socket_path)
        self._call = _SUBMIT_CALL_PQ
        self._stats = {"calls": 0, "events": 0}
        self._fast: Any = None
        # Connects and checks the schema: a wrong one refuses the relay here.
        first = PostgresLedger(url, relay=False)
        try:
            self._listener = self._listen()
        except OSError:
            first.close()
            raise
        if _relay_fast is not None:
            first.close()  # the C loop has its own connections (the system's libpq)
            # the session's bounds, then whether the schema exists (the loop reads column 2)
            setup = (
                _session_setup(first.statement_timeout)
                + f", to_regclass('{SCHEMA}.ledger_meta') IS NOT NULL"
            )
            try:
                self._fast = _relay_fast.Relay(
                    self._listener.fileno(), split_url(url)[0], setup, _META_SQL,
                    _SUBMIT_CALL_PQ.decode(), max(1, connections),
                    functools.partial(_explain, first.url),
                )  # fmt: skip
            except BaseException:
                self._listener.close()
                raise
            return
        self._links = [_Link(first)]
        self._links += [_Link(PostgresLedger(url, relay=False)) for _ in range(connections - 1)]
        self._queue: deque[tuple[_Client, list[bytes]]] = deque()
        self._selector = selectors.DefaultSelector()
        self._down_until = 0.0
        self._down_why = ""
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._stopping = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="dua-guard-relay")
        self._thread.start()

    @property
    def stats(self) -> dict[str, int]:
        """Calls and events stored through the relay (status page, tests)."""
        return self._fast.stats() if self._fast is not None else self._stats

    def _listen(self) -> socket.socket:
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.parent.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise OSError(
                f"relay directory {path.parent} is writable by other users: use a private one"
            )
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()  # left by a relay that died
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        sock.listen(128)
        sock.setblocking(False)
        return sock

    # -- the loop
    def _run(self) -> None:
        while not self._stopping:
            try:
                self._step()
            except Exception:  # a bug must not silently end the relay: kernels would wait
                self.log.exception("jupyter-dua-guard: ledger relay error (it keeps serving)")
        self._shutdown()

    def _step(self) -> None:
        for key, _mask in self._selector.select():
            what = key.data
            if what == "accept":
                self._accept()
            elif what == "wake":
                with contextlib.suppress(OSError):
                    self._wake_r.recv(64)
            elif isinstance(what, _Client):
                self._read(what)
            else:
                self._answer(what)
        self._dispatch()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not _same_user(conn):
                conn.close()
                continue
            # Blocking, with a kernel send timeout: it is read only when the selector says
            # so, and a kernel that stops reading its answers is dropped, not waited for.
            _kernel_timeouts(conn, 5.0)
            self._selector.register(conn, selectors.EVENT_READ, _Client(conn))

    def _drop(self, client: _Client) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(client.sock)
        client.sock.close()

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(1 << 16)
        except OSError:
            data = b""
        if not data:
            self._drop(client)
            return
        buf = client.buf
        buf += data
        while len(buf) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(buf)
            if size > _MAX_MESSAGE:
                self._drop(client)
                return
            if len(buf) < _LENGTH.size + size:
                return
            lines = bytes(buf[_LENGTH.size : _LENGTH.size + size]).split(b"\n")
            del buf[: _LENGTH.size + size]
            if not all(line.count(b"\t") >= 1 for line in lines):
                self._send(client, b"!malformed request")
                continue
            self._queue.append((client, lines))

    def _send(self, client: _Client, payload: bytes) -> None:
        try:
            client.sock.sendall(_frame(payload))
        except OSError:
            self._drop(client)

    # -- database side
    def _dispatch(self) -> None:
        """Give every free connection what has queued (all of it, up to a batch); a batch
        answered at once (database down) leaves its connection free for the next one."""
        queue = self._queue
        for link in self._links:
            while link.waiting is None and queue:
                batch: list[tuple[_Client, int]] = []
                lines: list[bytes] = []
                while queue and (not lines or len(lines) + len(queue[0][1]) <= _MAX_BATCH):
                    client, more = queue.popleft()
                    batch.append((client, len(more)))
                    lines += more
                try:
                    self._start(link, lines)
                except Exception as exc:  # every kernel must get an answer, whatever went wrong
                    self._fail(batch, str(exc))
                    continue
                link.waiting = batch

    def _start(self, link: _Link, lines: list[bytes]) -> None:
        from .ledger import LedgerError
        from .ledger_pg import _text_array_bytes, _Unavailable

        if time.monotonic() < self._down_until:
            raise _Unavailable(self._down_why)
        times, heads = zip(*(line.split(b"\t", 1) for line in lines), strict=True)
        try:
            conn = link.ledger._connection()  # checks the schema when it (re)connects
        except (_Unavailable, LedgerError) as exc:
            link.ledger._drop_connection()
            self._note_down(str(exc))
            raise
        pgconn = conn.pgconn
        try:
            pgconn.nonblocking = 1
            pgconn.send_query_params(
                self._call, [_text_array_bytes(heads), _text_array_bytes(times)]
            )
            while pgconn.flush():  # the rest of a large batch: rarely more than one wait
                select.select([], [pgconn.socket], [], 1.0)
        except Exception:
            link.ledger._drop_connection()  # the next call connects afresh
            raise
        link.pgconn, link.fd = pgconn, pgconn.socket
        self._selector.register(link.fd, selectors.EVENT_READ, link)

    def _answer(self, link: _Link) -> None:
        from .ledger_pg import SubmitResult, _parse_submit_result

        pgconn = link.pgconn
        try:
            pgconn.consume_input()
            if pgconn.is_busy():
                return
            results = []
            while (res := pgconn.get_result()) is not None:
                results.append(res)
            outcome = _parse_submit_result(results)
        except Exception as exc:
            outcome = SubmitResult(None, str(exc), True)
        self._selector.unregister(link.fd)
        batch, link.waiting, link.pgconn = link.waiting or [], None, None
        rows = outcome.rows
        if rows is None or len(rows) != sum(count for _, count in batch):
            if outcome.link_failed:
                self._note_down(outcome.error)
                link.ledger._drop_connection()
            self._fail(batch, outcome.error or "the submit procedure answered for other events")
            return
        self._stats["calls"] += 1
        self._stats["events"] += len(rows)
        # The next batch goes out before these kernels are woken: on a loaded machine a
        # woken kernel may take the CPU before the loop gets back to dispatching.
        self._dispatch()
        start = 0
        for client, count in batch:
            part = rows[start : start + count]
            start += count
            self._send(client, "\n".join(f"{s}\t{p}\t{h}" for s, p, h in part).encode())

    def _fail(self, batch: list[tuple[_Client, int]], why: str) -> None:
        message = f"!the relay could not store the events: {why}".encode()
        for client, _count in batch:
            self._send(client, message)

    def _note_down(self, why: str) -> None:
        """After a failure, answer at once for a few seconds (the kernels spool meanwhile)."""
        self._down_why = why
        self._down_until = time.monotonic() + 5.0

    # -- stopping
    def close(self) -> None:
        """Stop serving; kernels fall back to their own connections."""
        if self._fast is not None:
            self._fast.close()
            self._listener.close()
            self._remove_socket()
            return
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(timeout=10)

    def _shutdown(self) -> None:
        for link in self._links:
            if link.waiting:
                self._fail(link.waiting, "the relay stopped")
            link.ledger.close()
        self._fail([(client, len(lines)) for client, lines in self._queue], "the relay stopped")
        for key in list(self._selector.get_map().values()):
            if isinstance(key.data, _Client):
                self._drop(key.data)
        self._selector.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        self._remove_socket()

    def _remove_socket(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        parent = Path(self.path).parent
        if parent.name.startswith("dua-guard-relay-"):  # made for this relay (short path)
            with contextlib.suppress(OSError):
                parent.rmdir()


def _same_user(conn: socket.socket) -> bool:
    """Only this user's processes may append through the relay (Linux: SO_PEERCRED)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return True  # the socket's mode (0600 in a private directory) is the guard
    creds = conn.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


def _explain(url: str, kind: str, message: Any, state: str) -> tuple[str, bool]:
    """A failure of the C loop worded as the Python loop words it, and whether the database
    link itself failed. ``message`` is libpq's text (bytes), or for ``schema`` the rows of
    ``ledger_meta`` (None: no such table); a good schema gives ``("", False)``."""
    from .ledger import LedgerError
    from .ledger_pg import (
        _check_meta,
        _no_schema_error,
        _one_line,
        _submit_failure,
        _unreadable_schema_error,
    )

    if kind == "schema":
        try:
            if message is None:
                raise _no_schema_error(url)
            _check_meta({k.decode(): v.decode() for k, v in message}, url)
        except LedgerError as exc:
            return str(exc), True
        return "", False
    text = message.decode(errors="replace")
    if kind == "error":
        outcome = _submit_failure(text, state)
        return outcome.error, outcome.link_failed
    if kind == "schema_unreadable":
        return str(_unreadable_schema_error(url, _one_line(Exception(text)))), True
    if kind == "connect":
        text = "connection failed: " + text  # as psycopg says it in the Python loop
    return _one_line(Exception(text)), True


def relay_url(url: str, path: str) -> str:
    """``url`` with the relay's socket added (kernels' ``JUPYTER_DUA_GUARD_LEDGER``)."""
    from urllib.parse import parse_qsl, quote, urlencode, urlsplit

    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "relay"]
    query.append(("relay", path))
    return f"{parts.scheme}://{parts.netloc}{parts.path}?{urlencode(query, quote_via=quote)}"
