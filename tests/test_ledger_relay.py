"""The append relay in front of the PostgreSQL ledger: real server, real processes, real
Unix sockets. Whatever happens to the relay, every event is stored once and in order.
Each relay test runs with both loops: the C one (``_relay_fast``) and the Python fallback."""

from __future__ import annotations

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
from jupyter_dua_guard.ledger import open_ledger, redact_url
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


@pytest.mark.usefixtures("impl")
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
