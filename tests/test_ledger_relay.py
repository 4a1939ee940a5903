"""The append relay in front of the PostgreSQL ledger: real server, real processes, real
Unix sockets. Whatever happens to the relay, every event is stored once and in order."""

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

from jupyter_dua_guard import ledger_pg
from jupyter_dua_guard.ledger import open_ledger
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
from jupyter_dua_guard.ledger_relay import LedgerRelay
relay = LedgerRelay(sys.argv[1], sys.argv[2])
print("ready", flush=True)
time.sleep(600)
"""


def test_relay_killed_mid_run_loses_and_doubles_nothing(pg_ledger, sock_dir):
    """SIGKILL the relay while 6 writers append through it: answers in flight are lost, so
    their writers spool those events and a flush stores each exactly once."""
    path = str(sock_dir / "r.sock")
    proc = subprocess.Popen(
        [sys.executable, "-c", _RELAY_MAIN, pg_ledger.writer, path], stdout=subprocess.PIPE,
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


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
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


def test_relay_directory_writable_by_others_is_refused(pg_ledger, sock_dir):
    os.chmod(sock_dir, 0o777)
    with pytest.raises(OSError, match="writable by other users"):
        LedgerRelay(pg_ledger.writer, sock_dir / "r.sock")
