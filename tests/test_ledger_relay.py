"""The append relay in front of the PostgreSQL ledger: real server, real processes, real
Unix sockets. Whatever happens to the relay, every event is stored once and in order.
Each relay test runs with both loops: the C one (``_relay_fast``) and the Python fallback."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from ledger_helpers import check_writers_once_in_order

from jupyter_dua_guard import ledger_pg, ledger_relay
from jupyter_dua_guard.ledger import LedgerError, open_ledger, redact_url
from jupyter_dua_guard.ledger_relay import LedgerRelay, RelayClient, RelayUnknown, relay_url

TOOL = {"name": "torch", "distribution": "torch", "version": "2.4.1", "category": "deep-learning"}


@pytest.fixture
def sock_dir():
    """A short private directory: Unix socket paths are limited to about 100 bytes."""
    path = Path(tempfile.mkdtemp(prefix="dua-relay-test-"))
    yield path
    for item in path.iterdir():
        item.unlink()
    path.rmdir()


@pytest.fixture(params=["c", "python"])
def impl(request, monkeypatch) -> str:
    """Which relay loop runs: C when built (CI checks it is), else the Python fallback."""
    if request.param == "python":
        monkeypatch.setattr(ledger_relay, "_relay_fast", None)
    elif ledger_relay._relay_fast is None:
        pytest.skip("the C relay loop (_relay_fast) is not built")
    return request.param


def _writer(url: str, wid: int, n: int, start, pause: float = 0.0) -> None:
    start.wait()
    ledger = open_ledger(url)
    for i in range(n):
        ledger.append("ai_ml_import", {**TOOL, "version": f"{wid}.{i}"}, {"kernel_id": f"w{wid}"})
        if pause:
            time.sleep(pause)
    ledger.close()


def run_writers(url: str, writers: int, n: int, pause: float = 0.0, during=None) -> None:
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(url, w, n, start, pause)) for w in range(writers)]
    for p in procs:
        p.start()
    start.set()
    if during is not None:
        during()
    for p in procs:
        p.join(180)
        assert p.exitcode == 0


@pytest.mark.usefixtures("impl")
def test_relay_batches_many_writers_into_one_gap_free_chain(pg_ledger, sock_dir):
    relay = LedgerRelay(pg_ledger.writer, sock_dir / "r.sock")
    try:
        url = relay_url(pg_ledger.writer, relay.path)
        run_writers(url, writers=8, n=80)
        stats = dict(relay.stats)
    finally:
        relay.close()
    check_writers_once_in_order(pg_ledger.writer, 8, 80)
    assert stats["events"] == 8 * 80  # every append went through the relay...
    assert stats["calls"] < stats["events"]  # ...and writers shared database calls
    assert not (sock_dir / "r.sock").exists()  # a closed relay leaves no socket behind


@pytest.mark.usefixtures("impl", "client")
def test_records_through_relay_are_what_readers_see(pg_ledger, sock_dir):
    relay = LedgerRelay(pg_ledger.writer, sock_dir / "r.sock", connections=1)
    try:
        with open_ledger(relay_url(pg_ledger.writer, relay.path)) as ledger:
            data = {"name": "zé", "note": 'tab\there "quoted" \\ back\nline', "n": 3}
            got = [ledger.append("ai_ml_import", data), ledger.append_many(
                [("egress_blocked", {"host": "api.openai.com", "port": 443}, None)] * 3
            )]  # fmt: skip
            stored = list(ledger.records())
    finally:
        relay.close()
    assert relay.stats["events"] == 4
    assert [got[0], *got[1]] == stored
    assert stored[0]["data"] == data and [r["seq"] for r in stored] == [1, 2, 3, 4]


def test_without_a_relay_listening_kernels_append_directly(pg_ledger, sock_dir):
    url = relay_url(pg_ledger.writer, str(sock_dir / "none.sock"))
    with open_ledger(url) as ledger:
        for i in range(3):
            ledger.append("ai_ml_import", {**TOOL, "version": str(i)})
        assert ledger.spooled() == 0
    with open_ledger(pg_ledger.writer) as ledger:
        assert ledger.count() == 3 and ledger.verify().ok


_RELAY_MAIN = """
import sys, time
from jupyter_dua_guard import ledger_relay
if sys.argv[3] == "python":
    ledger_relay._relay_fast = None
relay = ledger_relay.LedgerRelay(sys.argv[1], sys.argv[2])
print("ready", flush=True)
time.sleep(600)
"""


def test_relay_killed_mid_run_loses_and_doubles_nothing(pg_ledger, sock_dir, impl):
    """SIGKILL the relay while 6 writers append through it: answers in flight are lost, so
    their writers spool those events and a flush stores each exactly once."""
    path = str(sock_dir / "r.sock")
    proc = subprocess.Popen(
        [sys.executable, "-c", _RELAY_MAIN, pg_ledger.writer, path, impl], stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    url = relay_url(pg_ledger.writer + "&retry=0.5", path)

    def kill_when_busy() -> None:
        with open_ledger(pg_ledger.writer) as probe:
            deadline = time.monotonic() + 60
            while probe.count() < 150 and time.monotonic() < deadline:
                time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)

    try:
        run_writers(url, writers=6, n=120, pause=0.003, during=kill_when_busy)
    finally:
        proc.kill()
        proc.wait()
    check_writers_once_in_order(pg_ledger.writer, 6, 120)
    assert not list(pg_ledger.spool.rglob("spool-*.sqlite"))


@pytest.mark.usefixtures("impl")
def test_database_stopped_behind_the_relay(pg_ledger, sock_dir):
    relay = LedgerRelay(pg_ledger.writer, sock_dir / "r.sock")
    url = relay_url(pg_ledger.writer + "&retry=0.5&connect_timeout=2", relay.path)

    def outage() -> None:
        with open_ledger(pg_ledger.writer) as probe:
            deadline = time.monotonic() + 60
            while probe.count() < 100 and time.monotonic() < deadline:
                time.sleep(0.02)
        pg_ledger.server.stop("fast")
        time.sleep(2.0)
        pg_ledger.server.start()

    try:
        run_writers(url, writers=4, n=150, pause=0.01, during=outage)
    finally:
        relay.close()
    check_writers_once_in_order(pg_ledger.writer, 4, 150)


def _frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


def _ask(path: str, raw: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(raw)
        head = sock.recv(4)
        if not head:
            return b""
        (size,) = struct.unpack("!I", head)
        return sock.recv(size)


@pytest.mark.usefixtures("impl")
def test_malformed_and_oversized_requests_do_not_harm_others(pg_ledger, sock_dir):
    relay = LedgerRelay(pg_ledger.writer, sock_dir / "r.sock")
    try:
        assert _ask(relay.path, _frame(b"no tab here")).startswith(b"!malformed")
        assert _ask(relay.path, struct.pack("!I", 2**31)) == b""  # dropped, nothing buffered
        bad_json = _ask(relay.path, _frame(b"2026-01-01T00:00:00Z\t{not json"))
        assert bad_json.startswith(b"!") and b"could not store" in bad_json
        client = RelayClient(relay.path, 10)
        event = ledger_pg.PostgresLedger._prepare("ai_ml_import", TOOL, None)
        ((seq, _prev, _hash),) = client.submit([event["head"]], [event["time"]])
        client.close()
    finally:
        relay.close()
    assert seq == 1
    with open_ledger(pg_ledger.writer) as ledger:
        assert ledger.count() == 1 and ledger.verify().ok


def _line(version: str) -> bytes:
    """One prepared event as a relay request line (``time\thead``)."""
    event = ledger_pg.PostgresLedger._prepare("ai_ml_import", {**TOOL, "version": version}, None)
    return f"{event['time']}\t{event['head']}".encode()


def _read_answer(sock: socket.socket) -> bytes:
    def exactly(size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            assert chunk, "the relay closed the connection"
            data += chunk
        return data

    (size,) = struct.unpack("!I", exactly(4))
    return exactly(size)


@pytest.mark.usefixtures("impl")
def test_split_pipelined_and_abandoned_requests(pg_ledger, sock_dir):
    """Frames cut anywhere or sent back to back are answered in order; kernels that leave
    before their answer harm no one (their events are stored all the same)."""
    relay = LedgerRelay(pg_ledger.writer, sock_dir / "r.sock", connections=1)
    try:
        for i in range(20):
            with socket.socket(socket.AF_UNIX) as gone:
                gone.connect(relay.path)
                gone.sendall(_frame(_line(f"gone.{i}")))
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(relay.path)
            raw = _frame(_line("a")) + _frame(_line("b") + b"\n" + _line("c"))
            for at in range(0, len(raw), 7):
                sock.sendall(raw[at : at + 7])
            answers = [_read_answer(sock), _read_answer(sock)]
    finally:
        relay.close()
    rows = [line.split(b"\t") for answer in answers for line in answer.split(b"\n")]
    assert [len(answer.split(b"\n")) for answer in answers] == [1, 2]
    with open_ledger(pg_ledger.writer) as ledger:
        stored = {r["seq"]: r for r in ledger.records()}
        assert ledger.count() == 23 and ledger.verify().ok
    for (seq, prev, digest), version in zip(rows, "abc", strict=True):
        record = stored[int(seq)]
        assert record["data"]["version"] == version
        assert (record["prev"], record["hash"]) == (prev.decode(), digest.decode())
    assert [int(r[0]) for r in rows] == sorted(int(r[0]) for r in rows)


@pytest.mark.usefixtures("impl")
def test_schema_changed_under_the_relay_is_named_to_kernels(pg_ledger, sock_dir):
    """Each (re)connection checks the schema: after an upgrade by a newer version, kernels
    hear the same one-line error as when they open the ledger, and nothing is stored."""
    import psycopg

    relay = LedgerRelay(pg_ledger.writer, sock_dir / "r.sock", connections=1)
    expected = (
        f"!the relay could not store the events: ledger {redact_url(pg_ledger.writer)} has "
        f"schema version 99, this jupyter-dua-guard knows up to {ledger_pg.SCHEMA_VERSION}: "
        "upgrade jupyter-dua-guard"
    ).encode()
    try:
        assert not _ask(relay.path, _frame(_line("1"))).startswith(b"!")
        with psycopg.connect(pg_ledger.admin, autocommit=True) as admin:
            admin.execute(
                "UPDATE dua_guard.ledger_meta SET value = '99' WHERE key = 'schema_version'"
            )
            admin.execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                "WHERE usename = 'dua_guard_writer'"
            )
        deadline = time.monotonic() + 30
        while (answer := _ask(relay.path, _frame(_line("2")))) != expected:
            assert answer.startswith(b"!the relay could not store the events: "), answer
            assert time.monotonic() < deadline, answer
            time.sleep(0.3)
    finally:
        relay.close()
    with psycopg.connect(pg_ledger.admin) as admin:
        assert admin.execute("SELECT count(*) FROM dua_guard.ledger_records").fetchone()[0] == 1


@pytest.mark.usefixtures("impl")
def test_closing_answers_the_kernels_left_waiting(pg_ledger, sock_dir):
    """A call in flight and a request queued behind it both hear that the relay stopped
    (their kernels spool), instead of waiting for a timeout."""
    import psycopg

    relay = LedgerRelay(pg_ledger.writer, sock_dir / "r.sock", connections=1)
    with psycopg.connect(pg_ledger.admin, autocommit=True) as admin:
        admin.execute("SELECT pg_advisory_lock(%s)", (ledger_pg.LOCK_KEY,))  # submit waits
        socks = [socket.socket(socket.AF_UNIX) for _ in range(2)]
        try:
            for i, sock in enumerate(socks):
                sock.settimeout(10)
                sock.connect(relay.path)
                sock.sendall(_frame(_line(str(i))))
                time.sleep(0.3)
            relay.close()
            answers = [_read_answer(sock) for sock in socks]
        finally:
            for sock in socks:
                sock.close()
            admin.execute("SELECT pg_advisory_unlock(%s)", (ledger_pg.LOCK_KEY,))
    assert answers == [b"!the relay could not store the events: the relay stopped"] * 2
    assert not os.path.exists(relay.path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
@pytest.mark.usefixtures("impl")
def test_other_users_are_refused(pg_ledger, sock_dir):
    relay = LedgerRelay(pg_ledger.writer, sock_dir / "r.sock")
    try:
        os.chmod(sock_dir, 0o711)
        os.chmod(relay.path, 0o666)  # past the file mode: the peer check must still refuse
        event = ledger_pg.PostgresLedger._prepare("ai_ml_import", TOOL, None)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                os.setuid(65534)
                RelayClient(relay.path, 5).submit([event["head"]], [event["time"]])
            except RelayUnknown:
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        relay.close()
    with open_ledger(pg_ledger.writer) as ledger:
        assert ledger.count() == 0


@pytest.mark.usefixtures("impl")
def test_relay_directory_writable_by_others_is_refused(pg_ledger, sock_dir):
    os.chmod(sock_dir, 0o777)
    with pytest.raises(OSError, match="writable by other users"):
        LedgerRelay(pg_ledger.writer, sock_dir / "r.sock")


# -- a kernel's side of a relayed append: C (_chain_fast.relay_store) and Python fallback


@pytest.fixture(params=["c", "python"])
def client(request, monkeypatch) -> dict[str, int]:
    """Which kernel-side path runs: C when built, else submit() and ledger_pg's checks. The
    counts prove which one served the appends."""
    calls = {"c": 0, "python": 0}
    if request.param == "python":
        monkeypatch.setattr(ledger_relay, "_relay_store", None)
        submit = RelayClient.submit

        def counted_submit(self, heads, times):
            calls["python"] += 1
            return submit(self, heads, times)

        monkeypatch.setattr(RelayClient, "submit", counted_submit)
    else:
        real = ledger_relay._relay_store
        if real is None:
            pytest.skip("the C client path (_chain_fast.relay_store) is not built")

        def counted_store(*args):
            calls["c"] += 1
            return real(*args)

        monkeypatch.setattr(ledger_relay, "_relay_store", counted_store)
    calls["param"] = request.param
    return calls


def _served_by(calls: dict, n: int) -> None:
    other = "python" if calls["param"] == "c" else "c"
    assert calls[calls["param"]] == n and calls[other] == 0


class FakeRelay:
    """A relay stand-in: stores each request through its own direct connection (when
    ``store``), then answers with what ``answer(request_number, rows)`` gives: byte chunks
    sent one by one with pauses (so the kernel reads them in several recv()s), and a final
    None to close the connection there."""

    def __init__(self, url: str, path: str, answer, store: bool = True) -> None:
        import threading

        self.db = ledger_pg.PostgresLedger(url, relay=False)
        self.answer, self.store = answer, store
        self.connections = self.requests = 0
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(path)
        self.listener.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                self._talk(conn)

    def _talk(self, conn: socket.socket) -> None:
        while True:
            try:
                payload = _read_answer(conn)
            except (AssertionError, OSError):
                return
            lines = [line.split(b"\t", 1) for line in payload.split(b"\n")]
            rows = None
            if self.store:
                heads, times = [h.decode() for _, h in lines], [t.decode() for t, _ in lines]
                rows = self.db._submit(heads, times)
            chunks = self.answer(self.requests, rows)
            self.requests += 1
            for chunk in chunks:
                if chunk is None:
                    return
                conn.sendall(chunk)
                time.sleep(0.002)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (Linux)
        self.listener.close()
        self.thread.join(10)
        self.db.close()


def _answer(rows) -> bytes:
    return "\n".join(f"{s}\t{p}\t{h}" for s, p, h in rows).encode()


def _verified_records(url: str) -> list[dict]:
    """What a reader sees in the database, once its chain has verified."""
    with open_ledger(url) as ledger:
        stored = list(ledger.records())
        assert ledger.verify().ok
    return stored


def _in_pieces(payload: bytes, size: int = 3) -> list[bytes]:
    raw = _frame(payload)
    return [raw[i : i + size] for i in range(0, len(raw), size)]


ODD = {"name": "zé 東京", "note": 'tab\there "quoted" \\ back\nline \u2028', "n": 3, "x": None}


def test_answers_in_many_pieces_give_the_stored_records(pg_ledger, sock_dir, client):
    """An answer cut into 3-byte recv()s, and one larger than the first read (the C path's
    16 KiB), give exactly the records readers see; odd text and explicit contexts too."""

    def answer(i, rows):
        return [*_in_pieces(_answer(rows))] if i == 0 else [_frame(_answer(rows))]

    relay = FakeRelay(pg_ledger.writer, str(sock_dir / "f.sock"), answer)
    many = [("ai_ml_import", {**ODD, "i": i}, {"kernel_id": f"k\t{i}"}) for i in range(150)]
    many += [("egress_blocked", {"host": "x.test", "i": i}, None) for i in range(150)]
    try:
        with open_ledger(relay_url(pg_ledger.writer, relay.path)) as ledger:
            got = [ledger.append("ai_ml_import", ODD), *ledger.append_many(many)]
            assert ledger.spooled() == 0
        stored = _verified_records(pg_ledger.writer)
    finally:
        relay.close()
    assert got == stored and len(stored) == 301
    assert len(_frame(_answer([(1, "0" * 64, "0" * 64)] * 300))) > 16384
    assert stored[0]["data"] == ODD and stored[1]["context"]["kernel_id"] == "k\t0"
    assert relay.connections == 1 and relay.requests == 2
    _served_by(client, 2)


def test_relay_message_spools_and_keeps_the_connection(pg_ledger, sock_dir, client):
    """A '!' answer: the events are spooled (stored once by the next append's flush), and
    the connection to the relay is kept for that next append."""

    def answer(i, rows):
        if i == 0:
            return [_frame("!the relay could not store the events: ñ".encode())]
        return _in_pieces(_answer(rows), 40)

    relay = FakeRelay(pg_ledger.writer, str(sock_dir / "f.sock"), answer, store=False)
    try:
        with open_ledger(relay_url(pg_ledger.writer, relay.path)) as ledger:
            ledger.append("ai_ml_import", {**TOOL, "version": "1"})
            assert ledger.spooled() == 1
            assert ledger.last_error == "the relay could not store the events: ñ"
            relay.store = True
            second = ledger.append("ai_ml_import", {**TOOL, "version": "2"})
            assert ledger.spooled() == 0
        with open_ledger(pg_ledger.writer) as ledger:
            stored = list(ledger.records())
    finally:
        relay.close()
    assert [r["data"]["version"] for r in stored] == ["1", "2"] and second == stored[1]
    assert relay.connections == 1 and relay.requests == 2
    _served_by(client, 2)


_GOOD = "0" * 64


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"1\tabc",
        b"1\ta\tb\tc",
        f"1\t{_GOOD}\t{_GOOD}\n".encode(),  # a line too many
        f"x1\t{_GOOD}\t{_GOOD}".encode(),
        f"1\t\xff{_GOOD}\t{_GOOD}".encode("latin-1"),  # not UTF-8
        f"1\t{_GOOD}\t{_GOOD}\n2\t{_GOOD}\t{_GOOD}".encode(),  # rows for other events
    ],
)
def test_malformed_answer_spools_and_drops_the_relay(pg_ledger, sock_dir, client, bad):
    relay = FakeRelay(pg_ledger.writer, str(sock_dir / "f.sock"), lambda i, rows: [_frame(bad)])
    try:
        with open_ledger(relay_url(pg_ledger.writer, relay.path)) as ledger:
            record = ledger.append("ai_ml_import", TOOL)
            assert ledger.spooled() == 1 and "gave a malformed answer" in ledger.last_error
            assert ledger._relay is None  # closed: the next appends go direct for a while
            ledger.append("ai_ml_import", {**TOOL, "version": "2"})
        stored = _verified_records(pg_ledger.writer)
    finally:
        relay.close()
    assert [r["data"] for r in stored] == [TOOL, {**TOOL, "version": "2"}]  # once each
    assert record["data"] == TOOL
    _served_by(client, 1)


def test_wrong_hash_from_the_relay_is_an_error(pg_ledger, sock_dir, client):
    """A relay (or database) that answers another hash: the append raises the ledger's
    error naming the record, and returns no records."""

    def answer(i, rows):
        rows = [list(r) for r in rows]
        rows[1][2] = rows[1][2][::-1]  # still 64 hex digits, not the client's
        return [_frame(_answer(rows))]

    relay = FakeRelay(pg_ledger.writer, str(sock_dir / "f.sock"), answer)
    try:
        with open_ledger(relay_url(pg_ledger.writer, relay.path)) as ledger:
            with pytest.raises(LedgerError, match=r"hashed record 2 differently from this client"):
                ledger.append_many([("ai_ml_import", TOOL, None)] * 3)
            assert ledger.spooled() == 0
    finally:
        relay.close()
    _served_by(client, 1)


def test_relay_closing_mid_answer_stores_each_event_once(pg_ledger, sock_dir, client):
    """The relay stored the events but died half-way through its answer: the kernel spools
    them, and the flush at its next append skips what the database already has."""

    def answer(i, rows):
        return [*_in_pieces(_answer(rows), 50)[:2], None] if i == 0 else [_frame(_answer(rows))]

    relay = FakeRelay(pg_ledger.writer, str(sock_dir / "f.sock"), answer)
    try:
        with open_ledger(relay_url(pg_ledger.writer, relay.path)) as ledger:
            ledger.append_many([("ai_ml_import", {**TOOL, "version": v}, None) for v in "ab"])
            assert ledger.spooled() == 2 and "gave no answer" in ledger.last_error
            ledger.append("ai_ml_import", {**TOOL, "version": "c"})
            assert ledger.spooled() == 0
        stored = _verified_records(pg_ledger.writer)
    finally:
        relay.close()
    assert [r["data"]["version"] for r in stored] == ["a", "b", "c"]
    _served_by(client, 1)


def test_relay_that_never_answers_times_out(pg_ledger, sock_dir, client):
    relay = FakeRelay(pg_ledger.writer, str(sock_dir / "f.sock"), lambda i, rows: [], store=False)
    url = relay_url(pg_ledger.writer + "&statement_timeout=0.3", relay.path)
    try:
        with open_ledger(url) as ledger:
            began = time.monotonic()
            ledger.append("ai_ml_import", TOOL)
            assert 5 <= time.monotonic() - began < 15  # statement_timeout + 5 s
            assert ledger.spooled() == 1 and "gave no answer" in ledger.last_error
    finally:
        relay.close()
    with open_ledger(pg_ledger.writer) as ledger:
        ledger.flush()
        assert [r["data"] for r in ledger.records()] == [TOOL]
    _served_by(client, 1)
