"""Many real writer processes on one ledger file, and writers killed mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from jupyter_dua_guard.ledger import open_ledger

WRITER = textwrap.dedent(
    """
    import os, sys
    from jupyter_dua_guard.ledger import open_ledger
    url, n, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    os.environ["JUPYTER_DUA_GUARD_KERNEL_ID"] = tag
    ready = sys.stdin.readline()  # start together
    with open_ledger(url) as ledger:
        for i in range(n):
            ledger.append("ai_ml_import", {"name": "sklearn", "version": "1.5", "i": i,
                                           "writer": tag})
    """
)


def test_fifty_concurrent_writers_lose_nothing(tmp_path):
    url = f"sqlite:///{tmp_path}/ledger.sqlite"
    open_ledger(url).close()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, url, "200", f"w{w}"],
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(50)
    ]
    time.sleep(1.0)
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.close()
    for proc in procs:
        assert proc.wait(timeout=170) == 0, proc.stderr.read()
    with open_ledger(url, create=False) as ledger:
        result = ledger.verify()
        assert result.ok, result.summary()
        assert result.records == 10_000 and result.head_seq == 10_000
        seen = {(r["data"]["writer"], r["data"]["i"]) for r in ledger.records()}
    assert seen == {(f"w{w}", i) for w in range(50) for i in range(200)}


KILLED = textwrap.dedent(
    """
    import os, sys
    from jupyter_dua_guard.ledger import open_ledger
    me = os.getpid()
    with open_ledger(sys.argv[1]) as ledger:
        i = 0
        while True:
            if i % 3 == 0:
                ledger.append_many([("data_read", {"path": f"/d/{me}/{i}-{j}"}, None)
                                    for j in range(200)])
            else:
                ledger.append("data_read", {"path": f"/d/{me}/{i}"})
            i += 1
            if i == 5:
                print("writing", flush=True)
    """
)


def test_writer_killed_mid_run_leaves_a_verifiable_ledger(tmp_path):
    url = f"sqlite:///{tmp_path}/ledger.sqlite"
    for round_ in range(4):
        procs = [
            subprocess.Popen([sys.executable, "-c", KILLED, url], stdout=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        for proc in procs:
            assert proc.stdout.readline().strip() == "writing"
        time.sleep(0.2 + 0.15 * round_)
        for proc in procs:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            assert proc.returncode == -signal.SIGKILL
        with open_ledger(url, create=False) as ledger:
            result = ledger.verify()
            assert result.ok, result.summary()
            assert result.records > 0
            before = result.records
            ledger.append("data_read", {"path": "/after-kill"})
            assert ledger.verify().records == before + 1
            # A killed batch is all-or-nothing: batch records come in whole groups of 200.
            paths = [r["data"]["path"] for r in ledger.records(kinds=["data_read"])]
            batches = {p.rsplit("-", 1)[0] for p in paths if p.startswith("/d/") and "-" in p}
            for batch in batches:
                assert sum(p.startswith(batch + "-") for p in paths) == 200


OPENER = textwrap.dedent(
    """
    import sys
    from jupyter_dua_guard.ledger import open_ledger
    with open_ledger(sys.argv[1]) as ledger:
        ledger.append("data_read", {"path": sys.argv[2]})
    """
)


def test_processes_opening_a_new_ledger_at_once_all_write(tmp_path):
    """Kernels starting together where no ledger exists yet: one makes it, and every one
    writes (a second process once found the half-made file and failed to open it)."""
    for trial in range(6):
        url = f"sqlite:///{tmp_path}/t{trial}/ledger.sqlite"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", OPENER, url, f"/p/{i}"], stderr=subprocess.PIPE, text=True
            )
            for i in range(4)
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
        with open_ledger(url, create=False) as ledger:
            paths = sorted(r["data"]["path"] for r in ledger.records())
            assert paths == [f"/p/{i}" for i in range(4)]
            assert ledger.verify().ok
