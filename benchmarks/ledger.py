"""Usage-ledger benchmark: appends/s with 1 and 8 writer processes, report time at 1M events.

Run: ``python benchmarks/ledger.py [--events 1000000] [--keep DIR] [--no-postgres |
--only-postgres | --pg-ledger URL]``. SQLite first, then the PostgreSQL hub ledger on a
throw-away cluster (Debian's ``postgresql`` binaries; skipped when absent); ``--pg-ledger``
times only the reports on an existing PostgreSQL ledger. Prints figures measured in this
run (wall and CPU seconds; SQLite figures and the PostgreSQL report as the median of
``--rounds`` runs, since a shared 2-CPU machine moves single runs by 20 %); goals from
issue 3: >= 5,000 appends/s with 8 writers, report over 1,000,000 events <= 2 s. The
1M-event ledger is generated in bulk (precomputed canonical JSON, one transaction): going
through ``append`` takes minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import random
import resource
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jupyter_dua_guard.ledger import GENESIS, open_ledger
from jupyter_dua_guard.report import build_report, render_html


def _writer(
    url: str, n: int, batch: int, start: mp.Event, done: mp.Queue, measured: mp.Event
) -> None:
    ledger = open_ledger(url)
    data = {"name": "sklearn", "distribution": "scikit-learn", "version": "1.5.2", "category": "ml"}
    ledger.append("ai_ml_import", data)  # connected (database, relay) before the clock starts
    start.wait()
    cpu = time.process_time()
    if batch <= 1:
        for _ in range(n):
            ledger.append("ai_ml_import", data)
    else:
        for _ in range(n // batch):
            ledger.append_many([("ai_ml_import", data, None)] * batch)
    done.put((time.time(), time.process_time() - cpu))
    measured.wait(60)  # its database session's CPU is counted while the session lives
    ledger.close()


def _postgres_cpu() -> float:
    """CPU seconds used so far by this machine's PostgreSQL processes (Linux ``/proc``)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if "(postgres)" in text:
            fields = text.rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


CPU_SPLIT: dict[str, float] = {}  # CPU µs per append of the last run: writers, this, postgres


def appends_per_second(url: str, writers: int, per_writer: int, batch: int = 1) -> float:
    """Appends per second from the start signal to the last writer's last append (process
    start-up, the warm-up append and shutdown are left out). Where the CPU went is left in
    ``CPU_SPLIT``: the writers, this process (the relay, when it runs one) and PostgreSQL."""
    ctx = mp.get_context("spawn")
    start, done, measured = ctx.Event(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=_writer, args=(url, per_writer, batch, start, done, measured))
        for _ in range(writers)
    ]
    for proc in procs:
        proc.start()
    time.sleep(1.0 + 0.2 * writers)  # let every writer import, open and warm up first
    own, pg = time.process_time(), _postgres_cpu()
    t0 = time.time()
    start.set()
    ends = [done.get(timeout=600) for _ in procs]
    total = writers * per_writer / 1e6
    CPU_SPLIT.update(
        writers=sum(cpu for _, cpu in ends) / total,
        this=(time.process_time() - own) / total,
        postgres=(_postgres_cpu() - pg) / total,
    )
    measured.set()
    for proc in procs:
        proc.join()
    return writers * per_writer / (max(end for end, _ in ends) - t0)


def canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def generate(path: Path, total: int, seed: int = 7) -> None:
    """Bulk-write ``total`` synthetic, correctly chained events (no case-level values)."""
    open_ledger(f"sqlite:///{path}").close()  # create with the real schema
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN IMMEDIATE")
    rows = []
    for row in synthetic_rows(total, seed):
        rows.append(row)
        if len(rows) == 50_000:
            conn.executemany(
                "INSERT INTO ledger_records (seq, prev, hash, body) VALUES (?, ?, ?, ?)", rows
            )
            rows.clear()
    if rows:
        conn.executemany(
            "INSERT INTO ledger_records (seq, prev, hash, body) VALUES (?, ?, ?, ?)", rows
        )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("ANALYZE")
    conn.close()


def synthetic_rows(total: int, seed: int = 7):  # type: ignore[no-untyped-def]
    """``(seq, prev, hash, body)`` of ``total`` correctly chained synthetic events."""
    rng = random.Random(seed)
    hosts = [
        ("hpc-node-1", "Linux-5.14-x86_64"),
        ("hpc-node-2", "Linux-5.14-x86_64"),
        ("laptop-7", "macOS-14.5-arm64"),
        ("vdi-3", "Windows-10-AMD64"),
    ]
    users = ["analyst1", "analyst2", "pi"]
    notebooks = [f"projects/study-{i // 20}/nb-{i}.ipynb" for i in range(300)]
    kernels = [f"{rng.getrandbits(128):032x}" for _ in range(5000)]
    contexts = []
    for i, kernel in enumerate(kernels):
        host, plat = hosts[i % len(hosts)]
        contexts.append(
            canonical(
                {
                    "user": users[i % 3],
                    "host": host,
                    "platform": plat,
                    "kernel_id": kernel,
                    "notebook": notebooks[i % len(notebooks)],
                    "python": "3.11.7",
                    "guard_version": "0.1.0",
                    "pid": 1000 + i,
                }
            )
        )
    tools = [
        (f"tool{i}", f"tool-dist-{i}", f"{1 + i % 4}.{v}.0", "ml")
        for i in range(40)
        for v in range(3)
    ]
    pools = {
        "ai_ml_import": [
            canonical({"name": a, "distribution": b, "version": c, "category": d})
            for a, b, c, d in tools
        ],
        "data_read": [
            canonical({"path": f"/data/seer/extract-{i}.csv", "format": "csv"}) for i in range(50)
        ],
        "egress_blocked": [
            canonical({"host": f"llm{i}.example.test", "port": 443, "rule": "ai-endpoint"})
            for i in range(30)
        ],
        "egress_allowed_ai": [
            canonical({"host": "ai.internal.test", "port": 443, "rule": "allow:institutional"})
        ],
        "output_flagged": [canonical({"rule": r, "cell": 3}) for r in ("small-cell", "id-column")],
        "review_signed": [
            canonical(
                {
                    "reviewer": "Dr. Synthetic",
                    "notebook": "nb.ipynb",
                    "scope": "figures",
                    "statement": "reviewed",
                }
            )
        ],
    }
    weights = [
        ("ai_ml_import", 700),
        ("data_read", 150),
        ("egress_blocked", 80),
        ("kernel_started", 30),
        ("egress_allowed_ai", 20),
        ("output_flagged", 15),
        ("model_artifact_written", 4),
        ("review_signed", 1),
    ]
    kinds = [k for k, w in weights for _ in range(w)]
    start = 1_767_225_600.0  # 2026-01-01
    step = 365 * 86400 / total
    sha = hashlib.sha256
    prev = GENESIS
    for seq in range(1, total + 1):
        kind = kinds[rng.randrange(len(kinds))]
        ki = rng.randrange(len(kernels))
        if kind == "kernel_started":
            data = canonical(
                {
                    "kernel_id": kernels[ki],
                    "kernel_name": "python3",
                    "notebook": notebooks[ki % len(notebooks)],
                }
            )
        elif kind == "model_artifact_written":
            data = canonical(
                {"path": f"/tmp/models-{seed}/model-{seq}.pt", "size": 1024, "library": "torch"}
            )
        else:
            pool = pools[kind]
            data = pool[rng.randrange(len(pool))]
        moment = time.gmtime(start + seq * step)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", moment) + f".{seq % 1_000_000:06d}Z"
        body = (
            f'{{"context":{contexts[ki]},"data":{data},"kind":"{kind}",'
            f'"seq":{seq},"time":"{stamp}"}}'
        )
        digest = sha(f"{prev}\n{body}".encode()).hexdigest()
        yield (seq, prev, digest, body)
        prev = digest


def _cpu() -> float:
    """CPU seconds of this process and of its finished children (verification workers)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn):  # type: ignore[no-untyped-def]
    w0, c0 = time.perf_counter(), _cpu()
    value = fn()
    return value, time.perf_counter() - w0, _cpu() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--appends", type=int, default=2000, help="appends per writer")
    parser.add_argument("--keep", help="directory to keep (and reuse) the generated ledger in")
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="runs of each SQLite measure and of the PostgreSQL report (medians printed)",
    )
    parser.add_argument(
        "--no-postgres", action="store_true", help="skip the PostgreSQL (hub ledger) figures"
    )
    parser.add_argument("--only-postgres", action="store_true", help="only the PostgreSQL figures")
    parser.add_argument(
        "--pg-ledger",
        metavar="URL",
        help="only the PostgreSQL report figures, on this existing ledger (no appends, no load)",
    )
    args = parser.parse_args()
    if args.pg_ledger:
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
        wall_r = pg_report_figures(args.pg_ledger, args.rounds)
        print(
            f"  goal check (median): report <= 2 s: {'met' if wall_r <= 2 else 'NOT met'} "
            f"({wall_r:.2f} s)"
        )
        return
    if args.only_postgres:
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
        postgres(args)
        return
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="dua-ledger-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")

    eight = []
    for writers, batch in ((1, 1), (8, 1), (8, 50)):
        url = f"sqlite:///{workdir}/appends-{writers}-{batch}.sqlite"
        rates, intact = [], True
        for _ in range(args.rounds):
            for suffix in ("", "-wal", "-shm", ".lock"):
                Path(url[10:] + suffix).unlink(missing_ok=True)
            open_ledger(url).close()
            per = args.appends if batch == 1 else args.appends * 5
            rates.append(appends_per_second(url, writers, per, batch))
            with open_ledger(url) as ledger:
                result = ledger.verify()
            intact = intact and result.ok and result.records == writers * (per + 1)
        label = "single appends" if batch == 1 else f"append_many batches of {batch}"
        print(
            f"appends/s, {writers} writer process{'es' if writers > 1 else ''}, {label}: "
            f"median {statistics.median(rates):,.0f} of {len(rates)} rounds "
            f"({min(rates):,.0f}-{max(rates):,.0f}; every round complete and intact: {intact})"
        )
        if (writers, batch) == (8, 1):
            eight = rates

    big = workdir / f"ledger-{args.events}.sqlite"
    if not big.exists():
        _, wall, _ = timed(lambda: generate(big, args.events))
        print(
            f"generated {args.events:,} synthetic events in {wall:.1f} s "
            f"({big.stat().st_size / 1e6:.0f} MB)"
        )
    with open_ledger(f"sqlite:///{big}") as ledger:
        agg, wall_a, _ = timed(lambda: ledger.aggregate())
        cpus = os.cpu_count() or 1
        ver, wall_v, cpu_v = timed(lambda: ledger.verify(workers=cpus))
        reports = [timed(lambda: build_report(ledger, workers=cpus)) for _ in range(args.rounds)]
        rep = reports[0][0]
        walls = sorted(r[1] for r in reports)
        wall_r = statistics.median(walls)
        cpu_r = statistics.median(r[2] for r in reports)
        _, wall_h, _ = timed(lambda: render_html(rep))
        _, wall_p, _ = timed(lambda: build_report(ledger, since="2026-12-01", workers=cpus))
    print(
        f"report over {ver.records:,} events (aggregation + full chain verification): "
        f"median {wall_r:.2f} s wall of {len(walls)} ({walls[0]:.2f}-{walls[-1]:.2f}), "
        f"{cpu_r:.2f} s CPU; HTML rendering {wall_h:.3f} s"
    )
    print(
        f"  of which aggregation {wall_a:.2f} s wall ({len(agg['groups']):,} groups), "
        f"verification {wall_v:.2f} s wall / {cpu_v:.2f} s CPU (intact: {ver.ok})"
    )
    print(f"  report for one month (--since 2026-12-01) incl. full verification: {wall_p:.2f} s")
    print(
        f"  tools {len(rep['tools'])}, kernels {rep['kernels']}, notebooks "
        f"{len(rep['notebooks'])}, artefacts {len(rep['model_artifacts'])}"
    )
    rate8 = statistics.median(eight) if eight else 0.0
    print(
        f"goal check (medians): 8 writers >= 5,000 appends/s: "
        f"{'met' if rate8 >= 5000 else 'NOT met'} ({rate8:,.0f}/s); "
        f"report <= 2 s: {'met' if wall_r <= 2 else 'NOT met'} ({wall_r:.2f} s)"
    )
    if not args.no_postgres:
        postgres(args)
    if not args.keep:
        for item in workdir.iterdir():
            item.unlink()
        workdir.rmdir()


def postgres(args: argparse.Namespace) -> None:
    """The hub ledger: a throw-away PostgreSQL cluster on loopback (fsync on, defaults)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from pg_server import OWNER_PASSWORD, WRITER_PASSWORD, start_server

    from jupyter_dua_guard.ledger_pg import db_init

    server = start_server()
    if server is None:
        print("PostgreSQL: binaries not found (apt-get install postgresql); figures skipped")
        return
    try:
        print(f"PostgreSQL: throw-away cluster on 127.0.0.1:{server.port} (fsync on, defaults)")

        def fresh() -> tuple[str, str]:
            db = server.create_database()
            db_init(
                server.url(db=db), writer_password=WRITER_PASSWORD, owner_password=OWNER_PASSWORD
            )
            return db, server.url("dua_guard_writer", WRITER_PASSWORD, db)

        from jupyter_dua_guard.ledger_relay import LedgerRelay, relay_url

        def relayed(url: str) -> tuple[str, LedgerRelay]:
            """The hub set-up: this process plays the Jupyter server and runs the relay."""
            sock_dir = tempfile.mkdtemp(prefix="dua-guard-relay-")
            relay = LedgerRelay(url, os.path.join(sock_dir, "relay.sock"))
            return relay_url(url, relay.path), relay

        cases = [
            (1, 1, "single appends, direct", "", False, 1),
            (8, 1, "single appends through the server's relay (hub set-up)", "", True, 0),
            (8, 1, "single appends, each writer direct to the database", "", False, 0),
            (8, 50, "append_many batches of 50, direct", "", False, 1),
            (
                8,
                1,
                "single appends, direct, synchronous_commit=off (opt-in: not flushed on return)",
                "options=-c%20synchronous_commit%3Doff",
                False,
                1,
            ),
        ]
        relay_rates: list[float] = []
        for writers, batch, label, extra, via_relay, rounds in cases:
            rates, splits, intact, load = [], [], True, os.getloadavg()[0]
            for _ in range(rounds or args.rounds):
                _, url = fresh()
                if extra:
                    url += "?" + extra
                relay = None
                if via_relay:
                    url, relay = relayed(url)
                per = args.appends if batch == 1 else args.appends * 5
                per = max(batch, per // 2)
                try:
                    rates.append(appends_per_second(url, writers, per, batch))
                    splits.append(dict(CPU_SPLIT))
                finally:
                    if relay is not None:
                        relay.close()
                with open_ledger(url) as ledger:
                    result = ledger.verify()
                intact = intact and result.ok and result.records == writers * (per + 1)
            if via_relay:
                relay_rates = rates
            spread = (
                f" of {len(rates)} rounds ({min(rates):,.0f}-{max(rates):,.0f})"
                if len(rates) > 1
                else ""
            )
            print(
                f"  appends/s, {writers} writer process{'es' if writers > 1 else ''}, {label}: "
                f"{'median ' if len(rates) > 1 else ''}{statistics.median(rates):,.0f}{spread}"
                f"  (complete and intact: {intact}; load before {load:.2f}, after "
                f"{os.getloadavg()[0]:.2f})"
            )
            cpu = {k: statistics.median(s[k] for s in splits) for k in splits[0]}
            print(
                f"    CPU µs per append (medians): writers {cpu['writers']:.0f}, "
                f"{'relay' if via_relay else 'benchmark process'} {cpu['this']:.0f}, "
                f"PostgreSQL {cpu['postgres']:.0f}"
            )

        db, url = fresh()
        _, wall_g, _ = timed(lambda: _pg_generate(server.url(db=db), args.events))
        print(f"  loaded {args.events:,} synthetic events with COPY in {wall_g:.1f} s")
        wall_r = pg_report_figures(url, args.rounds)
        rate8 = statistics.median(relay_rates) if relay_rates else 0.0
        print(
            f"  goal check: 8 writers >= 5,000 appends/s (median, through the relay): "
            f"{'met' if rate8 >= 5000 else 'NOT met'} ({rate8:,.0f}/s); "
            f"report <= 2 s (median): {'met' if wall_r <= 2 else 'NOT met'} ({wall_r:.2f} s)"
        )
    finally:
        server.destroy()


def pg_report_figures(url: str, rounds: int) -> float:
    """Report figures on a PostgreSQL ledger: the report as built (median of ``rounds``), and
    what the database's own aggregation and verification take (the path without the C
    module, with glob filters, or on a non-C collation)."""
    from jupyter_dua_guard import ledger_pg

    print(f"  load average before the report figures: {os.getloadavg()[0]:.2f}")
    with open_ledger(url) as ledger:
        cpus = os.cpu_count() or 1
        reports = [timed(lambda: build_report(ledger, workers=cpus)) for _ in range(rounds)]
        rep = reports[0][0]
        walls = sorted(r[1] for r in reports)
        wall_r, cpu_r = statistics.median(walls), statistics.median(r[2] for r in reports)
        _, wall_p, _ = timed(lambda: build_report(ledger, since="2026-12-01", workers=cpus))
        _, wall_u, _ = timed(lambda: build_report(ledger, user="analyst1", workers=cpus))
        agg, wall_a, _ = timed(lambda: ledger.aggregate())
        ver, wall_v, _ = timed(lambda: ledger.verify(workers=cpus))
    how = (
        f"{cpus} ranges streamed (COPY) and checked/tallied in C"
        if ledger_pg._pgsurvey_fast is not None
        else "C module not built: the database aggregates and verifies"
    )
    print(
        f"  report over {rep['verification']['records']:,} events (full chain verification, "
        f"intact: {rep['verification']['ok']}; {how}): median {wall_r:.2f} s wall of "
        f"{len(walls)} ({walls[0]:.2f}-{walls[-1]:.2f}), {cpu_r:.2f} s CPU in this process "
        f"(the server's not counted); {len(rep['tools'])} tools (load "
        f"{os.getloadavg()[0]:.2f})"
    )
    print(f"    one month (--since 2026-12-01): {wall_p:.2f} s; one user (--user): {wall_u:.2f} s")
    print(
        f"    inside the database instead: aggregation {wall_a:.2f} s ({len(agg['groups']):,} "
        f"groups), verification {wall_v:.2f} s with {cpus} ranges (intact: {ver.ok})"
    )
    return wall_r


def _pg_generate(admin_url: str, total: int) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        with (
            conn.cursor() as cur,
            cur.copy("COPY dua_guard.ledger_records (seq, prev, hash, body) FROM STDIN") as copy,
        ):
            for row in synthetic_rows(total):
                copy.write_row(row)
        conn.execute("VACUUM ANALYZE dua_guard.ledger_records")
        # Write the bulk load's gigabyte out now, not while the reports are being timed.
        conn.execute("CHECKPOINT")


if __name__ == "__main__":
    main()
