"""The central ledger on a real PostgreSQL server (started on loopback by the test set-up)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import pytest
from ledger_helpers import check_writers_once_in_order
from pg_server import ADMIN_PASSWORD, WRITER_PASSWORD, free_port

from jupyter_dua_guard import ledger_pg
from jupyter_dua_guard.ledger import Ledger, LedgerError, open_ledger, redact_url
from jupyter_dua_guard.report import build_report, render_csv, render_html

TOOL = {"name": "torch", "distribution": "torch", "version": "2.4.1", "category": "deep-learning"}


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jupyter_dua_guard.cli", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **(env or {})},
    )


def sql(url: str, statement: str, params: tuple = ()) -> list:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def fill(url: str, n: int = 10, **ctx: str) -> list[dict]:
    with open_ledger(url) as ledger:
        return [
            ledger.append("ai_ml_import", {**TOOL, "version": f"2.{i}"}, {"kernel_id": "k1", **ctx})
            for i in range(n)
        ]


# --------------------------------------------------------------------------- selection, secrets


def test_url_selects_postgres_and_never_shows_the_password(pg_ledger):
    with open_ledger(pg_ledger.writer) as ledger:
        assert type(ledger).__name__ == "PostgresLedger"
        rec = ledger.append("kernel_started", {"kernel_id": "k1", "kernel_name": "python3"})
        assert rec["seq"] == 1 and len(rec["hash"]) == 64
        assert WRITER_PASSWORD not in ledger.url and ":***@" in ledger.url
        result = ledger.verify()
        assert result.ok and result.records == 1
        assert WRITER_PASSWORD not in result.summary()
        report = build_report(ledger)
    for text in (json.dumps(report), render_html(report), render_csv(report)):
        assert WRITER_PASSWORD not in text


def test_redact_url_forms():
    assert redact_url("postgresql://w:s3cr%40t@db:5432/x") == "postgresql://w:***@db:5432/x"
    assert "pw1" not in redact_url("postgresql://db/x?password=pw1&sslmode=require")
    assert "pw2" not in redact_url("host=db password=pw2 dbname=x")
    assert redact_url("postgresql://w@db/x?service=hub") == "postgresql://w@db/x?service=hub"


def test_wrong_password_is_one_line_error_without_secret(pg_ledger):
    bad = pg_ledger.server.url("dua_guard_writer", "Wrong-Secret-9", pg_ledger.db)
    proc = cli("verify", "--ledger", bad)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "Wrong-Secret-9" not in proc.stderr and "password authentication failed" in lines[0]


def test_credentials_from_service_file_and_environment(pg_ledger, tmp_path):
    service = tmp_path / "pg_service.conf"
    service.write_text(
        f"[dua]\nhost=127.0.0.1\nport={pg_ledger.server.port}\ndbname={pg_ledger.db}\n"
        "user=dua_guard_writer\n"
    )
    env = {"PGSERVICEFILE": str(service), "PGPASSWORD": WRITER_PASSWORD}
    proc = cli("log", "--json", "--ledger", "postgresql:///?service=dua", env=env)
    assert proc.returncode == 0, proc.stderr
    fill(pg_ledger.writer, 2)
    proc = cli("verify", "--ledger", "postgresql:///?service=dua", env=env)
    assert proc.returncode == 0 and "2 records" in proc.stdout, proc.stderr


def test_database_without_schema_asks_for_db_init(pg_server):
    db = pg_server.create_database()
    with pytest.raises(LedgerError, match="db init") as err:
        open_ledger(pg_server.url(db=db))
    assert ADMIN_PASSWORD not in str(err.value)


def _backends(admin: str, db: str) -> int:
    return sql(
        admin,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND usename = 'dua_guard_writer'",
        (db,),
    )[0][0]


def test_kernels_behind_a_relay_hold_no_connection_of_their_own(pg_ledger, tmp_path):
    """A hub's connections stay at the relay's few per server, however many kernels run;
    a kernel connects itself only while its relay is away."""
    from jupyter_dua_guard.ledger_relay import LedgerRelay, relay_url

    sock_dir = Path(tempfile.mkdtemp(prefix="dua-relay-test-"))
    relay = LedgerRelay(pg_ledger.writer, sock_dir / "r.sock", connections=1)
    url = relay_url(pg_ledger.writer, relay.path)
    kernels = [open_ledger(url) for _ in range(4)]
    try:
        for i, ledger in enumerate(kernels):
            ledger.append("ai_ml_import", {**TOOL, "version": f"1.{i}"})
        assert relay.stats["events"] == 4
        assert _backends(pg_ledger.admin, pg_ledger.db) == 1  # the relay's link only
        relay.close()
        for i, ledger in enumerate(kernels):
            # the first append finds the relay gone (spooled), the second goes direct
            ledger.append("ai_ml_import", {**TOOL, "version": f"2.{i}"})
            ledger.append("ai_ml_import", {**TOOL, "version": f"3.{i}"})
            assert ledger.spooled() == 0
        assert _backends(pg_ledger.admin, pg_ledger.db) == 4
    finally:
        relay.close()
        for ledger in kernels:
            ledger.close()
        sock_dir.rmdir()
    with open_ledger(pg_ledger.writer) as ledger:
        assert ledger.count() == 12 and ledger.verify().ok


def test_relayed_kernel_meeting_a_database_without_schema_spools_with_the_reason(
    pg_server, tmp_path
):
    """It learns of the missing schema only when it must connect: its events are kept."""
    db = pg_server.create_database()
    spool = tmp_path / "spool"
    url = pg_server.url(db=db, spool=str(spool), relay=str(tmp_path / "no-relay.sock"))
    with open_ledger(url) as ledger:
        stored = ledger.append("ai_ml_import", TOOL)
        assert stored["seq"] == 1 and ledger.spooled() == 1
        assert "db init" in (ledger.last_error or "")
        with pytest.raises(LedgerError, match="db init"):
            ledger.count()


def test_unreachable_database_for_readers_is_one_line_error(tmp_path):
    url = f"postgresql://w:Hidden-Pw-7@127.0.0.1:{free_port()}/x?connect_timeout=2"
    proc = cli("log", "--ledger", url)
    assert proc.returncode == 2
    assert "cannot reach the PostgreSQL ledger" in proc.stderr and "Hidden-Pw-7" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- same semantics


def test_same_chain_and_records_as_sqlite(pg_ledger, tmp_path):
    ctx = {"kernel_id": "k-1", "notebook": "nb/a.ipynb", "time": "2026-03-01T10:00:00Z"}
    sqlite = open_ledger(f"sqlite:///{tmp_path}/l.sqlite")
    pg = open_ledger(pg_ledger.writer)
    try:
        for kind, data in [
            ("kernel_started", {"kernel_id": "k-1", "kernel_name": "python3"}),
            ("ai_ml_import", TOOL),
            ("egress_blocked", {"host": "llm.example.test", "port": 443, "rule": "ai-endpoint"}),
            ("output_flagged", {"rule": "small-cell", "cell": 2, "note": "ünïcødé ✓"}),
        ]:
            a, b = sqlite.append(kind, data, ctx), pg.append(kind, data, ctx)
            assert a == b  # same body, same seq, same hash
        assert list(sqlite.records()) == list(pg.records())
        assert pg.verify().head == sqlite.verify().head
        assert pg.count(kinds=["ai_ml_import"]) == 1
        assert [r["seq"] for r in pg.records(notebook="nb/*.ipynb", descending=True)] == [
            4,
            3,
            2,
            1,
        ]
        got = pg.aggregate()
        want = sqlite.aggregate()
        key = lambda r: json.dumps(r, sort_keys=True, default=str)  # noqa: E731
        assert sorted(got["groups"], key=key) == sorted(want["groups"], key=key)
        assert got["kernels"] == want["kernels"] and got["notebooks"] == want["notebooks"]
        rep_pg, rep_sq = build_report(pg), build_report(sqlite)
        for section in ("tools", "egress_blocked", "outputs_flagged", "users", "locations"):
            assert rep_pg[section] == rep_sq[section], section
    finally:
        sqlite.close()
        pg.close()


def test_user_and_host_filters_in_log_report_closeout(pg_ledger, tmp_path):
    sqlite_url = f"sqlite:///{tmp_path}/l.sqlite"
    for url in (pg_ledger.writer, sqlite_url):
        with open_ledger(url) as ledger:
            for user, host in [("alice", "node-1"), ("bob", "node-1"), ("bob", "node-2")]:
                ctx = {"user": user, "host": host, "kernel_id": f"{user}-{host}"}
                ledger.append("ai_ml_import", {**TOOL, "name": user}, ctx)
                ledger.append(
                    "model_artifact_written",
                    {"path": f"/tmp/none-{user}-{host}.pt", "size": 1, "library": "torch"},
                    ctx,
                )
        proc = cli("log", "--json", "--ledger", url, "--user", "bob")
        rows = [json.loads(line) for line in proc.stdout.splitlines()]
        assert len(rows) == 4 and {r["context"]["user"] for r in rows} == {"bob"}, proc.stderr
        proc = cli("log", "--json", "--ledger", url, "--user", "bob", "--host", "node-2")
        assert len(proc.stdout.splitlines()) == 2
        proc = cli("log", "--json", "--ledger", url, "--host", "node-*")
        assert len(proc.stdout.splitlines()) == 6
        proc = cli("report", "--format", "json", "--ledger", url, "--host", "node-1")
        report = json.loads(proc.stdout)
        assert report["events"] == 4 and [u["user"] for u in report["users"]] == ["alice", "bob"]
        assert report["verification"]["ok"] and report["filters"]["host"] == "node-1"
        everyone = json.loads(cli("report", "--format", "json", "--ledger", url).stdout)
        assert {u["user"]: u["hosts"] for u in everyone["users"]} == {
            "alice": ["node-1"],
            "bob": ["node-1", "node-2"],
        }
        proc = cli("closeout", "--json", "--ledger", url, "--user", "alice")
        assert [json.loads(x)["path"] for x in proc.stdout.splitlines()] == [
            "/tmp/none-alice-node-1.pt"
        ]


def test_cli_verify_report_log_on_postgres(pg_ledger, tmp_path):
    fill(pg_ledger.writer, 5, notebook="nb/x.ipynb")
    proc = cli("verify", "--ledger", pg_ledger.writer)
    assert (
        proc.returncode == 0 and "5 records" in proc.stdout and WRITER_PASSWORD not in proc.stdout
    )
    head = proc.stdout.split("head ")[1].split()[0]
    out = tmp_path / "r.html"
    proc = cli("report", "--ledger", pg_ledger.writer, "-o", str(out), "--head", head)
    assert proc.returncode == 0, proc.stderr
    assert "torch" in out.read_text() and WRITER_PASSWORD not in out.read_text()
    proc = cli("log", "--ledger", pg_ledger.writer, "--notebook", "nb/x.ipynb")
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 6


# --------------------------------------------------------------------------- concurrency


def _writer(url: str, host: str, wid: int, n: int, start) -> None:
    ledger = open_ledger(url)
    start.wait()
    for i in range(n):
        ledger.append(
            "ai_ml_import",
            {**TOOL, "version": f"{wid}.{i}"},
            {"host": host, "kernel_id": f"w{wid}"},
        )
    ledger.close()


def test_many_writers_on_two_hosts_total_gap_free_order(pg_ledger):
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    n, per_host = 60, 8
    procs = [
        ctx.Process(target=_writer, args=(pg_ledger.writer, host, h * per_host + w, n, start))
        for h, host in enumerate(("hub-node-a", "hub-node-b"))
        for w in range(per_host)
    ]
    for p in procs:
        p.start()
    time.sleep(2)
    start.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with open_ledger(pg_ledger.writer) as ledger:
        rows = list(ledger.records())
        assert [r["seq"] for r in rows] == list(range(1, 16 * n + 1))
        versions = [r["data"]["version"] for r in rows]
        assert len(set(versions)) == len(versions) == 16 * n
        for wid in range(16):  # each writer's events keep its order
            mine = [int(v.split(".")[1]) for v in versions if v.startswith(f"{wid}.")]
            assert mine == list(range(n))
        assert {r["context"]["host"] for r in rows} == {"hub-node-a", "hub-node-b"}
        assert ledger.verify().ok
        assert ledger.spooled() == 0
    assert not list(pg_ledger.spool.rglob("spool-*.sqlite"))


# --------------------------------------------------------------------------- append-only


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE dua_guard.ledger_records SET body = body WHERE seq = 1",
        "DELETE FROM dua_guard.ledger_records WHERE seq = 2",
        "TRUNCATE dua_guard.ledger_records",
        "ALTER TABLE dua_guard.ledger_records DISABLE TRIGGER ALL",
        "DROP TRIGGER ledger_records_append_only ON dua_guard.ledger_records",
        "DROP TABLE dua_guard.ledger_records",
        "CREATE TABLE dua_guard.extra (x int)",
        "CREATE TABLE public.extra (x int)",
        "UPDATE dua_guard.ledger_meta SET value = '0' WHERE key = 'schema_version'",
        "ALTER PROCEDURE dua_guard.submit(text[], text[], bigint[], text[], text[]) "
        "SECURITY DEFINER",
        "DROP PROCEDURE dua_guard.submit(text[], text[], bigint[], text[], text[])",
        "ALTER FUNCTION dua_guard.append(text[], text[], boolean) SECURITY INVOKER",
    ],
)
def test_writer_cannot_change_or_remove_records(pg_ledger, statement):
    fill(pg_ledger.writer, 3)
    writer = pg_ledger.server.url("dua_guard_writer", WRITER_PASSWORD, pg_ledger.db)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        sql(writer, statement)
    with open_ledger(writer) as ledger:
        assert ledger.verify().ok and ledger.count() == 3


def test_trigger_refuses_update_and_delete_even_for_owner(pg_ledger):
    fill(pg_ledger.writer, 3)
    for statement in (
        "UPDATE dua_guard.ledger_records SET body = body WHERE seq = 1",
        "DELETE FROM dua_guard.ledger_records WHERE seq = 3",
        "TRUNCATE dua_guard.ledger_records",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            sql(pg_ledger.owner, statement)


def test_verify_detects_owner_tampering(pg_ledger):
    fill(pg_ledger.writer, 8)
    off = "ALTER TABLE dua_guard.ledger_records DISABLE TRIGGER ledger_records_append_only"
    on = "ALTER TABLE dua_guard.ledger_records ENABLE TRIGGER ledger_records_append_only"
    sql(pg_ledger.owner, off)
    with open_ledger(pg_ledger.writer) as ledger:
        result = ledger.verify()  # protection switched off: reported even before any edit
        assert not result.ok and "trigger" in result.problem
        sql(pg_ledger.owner, on)
        assert ledger.verify().ok
        sql(pg_ledger.owner, off)
        sql(
            pg_ledger.owner,
            "UPDATE dua_guard.ledger_records SET body = replace(body, '\"2.3\"', '\"9.9\"') "
            "WHERE seq = 4",
        )
        sql(pg_ledger.owner, on)
        result = ledger.verify()
        assert not result.ok and result.bad_seq == 4 and "stored hash" in result.problem
        proc = cli("verify", "--ledger", pg_ledger.writer)
        assert proc.returncode == 1 and "record 4" in proc.stdout


@pytest.mark.parametrize(
    "change",
    [
        # a report column cut loose from the body, then edited with the protection off
        [
            "ALTER TABLE dua_guard.ledger_records ALTER COLUMN fields DROP EXPRESSION",
            "ALTER TABLE dua_guard.ledger_records DISABLE TRIGGER ledger_records_append_only",
            "UPDATE dua_guard.ledger_records SET fields = jsonb_set(fields, '{kind}', "
            "'\"data_read\"') WHERE seq = 2",
            "ALTER TABLE dua_guard.ledger_records ENABLE TRIGGER ledger_records_append_only",
        ],
        # a report column recomputed another way for every record
        [
            "ALTER TABLE dua_guard.ledger_records DROP COLUMN fields",
            "ALTER TABLE dua_guard.ledger_records ADD COLUMN fields jsonb GENERATED ALWAYS AS "
            "(CASE WHEN seq = 2 THEN jsonb_set((body::jsonb) - 'data', '{context,host}', "
            "'\"elsewhere\"') ELSE (body::jsonb) - 'data' END) STORED",
        ],
    ],
)
def test_verify_detects_owner_changing_report_columns(pg_ledger, change):
    """Reports read generated columns; an owner who alters the table to change what they
    say (leaving the hashed bodies alone) is caught by verify and the report."""
    fill(pg_ledger.writer, 3)
    for statement in change:
        sql(pg_ledger.owner, statement)
    with open_ledger(pg_ledger.writer) as ledger:
        result = ledger.verify()
        assert not result.ok and "no longer generated" in result.problem
        assert not build_report(ledger)["verification"]["ok"]


def test_verify_detects_owner_deletion_and_truncation(pg_ledger):
    records = fill(pg_ledger.writer, 8)
    pinned = f"8:{records[-1]['hash']}"
    sql(pg_ledger.owner, "ALTER TABLE dua_guard.ledger_records DISABLE TRIGGER ALL")
    sql(pg_ledger.owner, "DELETE FROM dua_guard.ledger_records WHERE seq = 6")
    with open_ledger(pg_ledger.writer) as ledger:
        result = ledger.verify()
        assert not result.ok and result.bad_seq == 6 and "deleted" in result.problem
        sql(pg_ledger.owner, "DELETE FROM dua_guard.ledger_records WHERE seq >= 6")
        sql(pg_ledger.owner, "ALTER TABLE dua_guard.ledger_records ENABLE TRIGGER ALL")
        assert ledger.verify().ok  # a clean cut of the tail ...
        result = ledger.verify(head=pinned)  # ... is found against the pinned head
        assert not result.ok and result.bad_seq == 6 and "truncated" in result.problem


# --------------------------------------------------------------------------- db init / upgrade


def test_db_init_cli_records_schema_version_and_is_idempotent(pg_server):
    db = pg_server.create_database()
    env = {"JUPYTER_DUA_GUARD_WRITER_PASSWORD": "Cli-Writer-5"}
    proc = cli("db", "init", "--ledger", pg_server.url(db=db), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "schema dua_guard created (version 1)" in proc.stdout
    assert ADMIN_PASSWORD not in proc.stdout + proc.stderr and "Cli-Writer-5" not in proc.stdout
    assert sql(
        pg_server.url(db=db), "SELECT value FROM dua_guard.ledger_meta WHERE key='schema_version'"
    ) == [(str(ledger_pg.SCHEMA_VERSION),)]
    again = cli("db", "init", "--ledger", pg_server.url(db=db), env=env)
    assert again.returncode == 0 and "already present" in again.stdout
    writer = pg_server.url("dua_guard_writer", "Cli-Writer-5", db)
    fill(writer, 1)
    status = cli("db", "status", "--ledger", writer)
    assert status.returncode == 0
    assert f"schema version {ledger_pg.SCHEMA_VERSION}" in status.stdout
    upgrade = cli("db", "upgrade", "--ledger", pg_server.url(db=db))
    assert upgrade.returncode == 0 and "nothing to upgrade" in upgrade.stdout
    bad = cli("db", "init", "--ledger", "sqlite:////tmp/x.sqlite")
    assert bad.returncode == 2 and "PostgreSQL" in bad.stderr


def test_version_1_ledger_upgrades_with_its_records_and_queued_events(pg_server, monkeypatch):
    """A ledger written by version 1 (with an event still queued for chaining) upgrades in
    place: same chain, the queued event chained once, reports and appends work after."""
    db = pg_server.create_database()
    admin = pg_server.url(db=db)
    with monkeypatch.context() as m:
        m.setattr(ledger_pg, "SCHEMA_VERSION", 1)
        m.setattr(ledger_pg, "MIGRATIONS", {})
        ledger_pg.db_init(admin, writer_password=WRITER_PASSWORD)
    writer = pg_server.url("dua_guard_writer", WRITER_PASSWORD, db)
    events = [
        Ledger._prepare("ai_ml_import", {**TOOL, "version": f"1.{i}"}, {"kernel_id": f"k{i % 2}"})
        for i in range(5)
    ]
    sql(
        writer,
        "SELECT count(*) FROM dua_guard.append(%s, %s, false)",
        ([e["head"] for e in events[:4]], [e["time"] for e in events[:4]]),
    )
    sql(
        writer,
        "INSERT INTO dua_guard.ledger_pending (head, time) VALUES (%s, %s)",
        (events[4]["head"], events[4]["time"]),
    )
    with pytest.raises(LedgerError, match="db upgrade"):
        open_ledger(writer)
    done = ledger_pg.db_upgrade(admin)
    assert done == [
        f"schema dua_guard upgraded to version {v}" for v in range(2, ledger_pg.SCHEMA_VERSION + 1)
    ]
    assert sql(
        admin, "SELECT attname, attgenerated FROM pg_attribute WHERE attrelid = "
        "'dua_guard.ledger_records'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
    ) == [("seq", ""), ("prev", ""), ("hash", ""), ("body", ""), ("fields", "s")]  # fmt: skip
    with open_ledger(writer) as ledger:
        assert [r["data"]["version"] for r in ledger.records()] == [f"1.{i}" for i in range(5)]
        assert ledger.verify().ok
        ledger.append("ai_ml_import", {**TOOL, "version": "2.0"}, {"kernel_id": "k9"})
        result = ledger.verify()
        assert result.ok and result.records == 6
        usage = ledger.aggregate()
        assert sum(g["count"] for g in usage["groups"]) == 6 and usage["kernels"] == 3
        torch = [d for d in usage["distinct"] if d["subject"] == "torch"]
        assert torch == [
            {"kind": "ai_ml_import", "subject": "torch", "detail": None, "extra": None,
             "kernels": 3, "notebooks": 0}
        ]  # fmt: skip
    assert sql(admin, "SELECT to_regclass('dua_guard.ledger_pending')") == [(None,)]


def test_db_upgrade_applies_migrations_in_order(pg_ledger, monkeypatch):
    fill(pg_ledger.writer, 2)
    current = ledger_pg.SCHEMA_VERSION
    monkeypatch.setattr(ledger_pg, "SCHEMA_VERSION", current + 1)
    monkeypatch.setattr(
        ledger_pg,
        "MIGRATIONS",
        {
            **ledger_pg.MIGRATIONS,
            current + 1: [
                "CREATE INDEX ledger_records_user ON dua_guard.ledger_records "
                "((fields -> 'context' ->> 'user'), (fields ->> 'time'))"
            ],
        },
    )
    with pytest.raises(LedgerError, match="db upgrade"):
        open_ledger(pg_ledger.writer)
    done = ledger_pg.db_upgrade(pg_ledger.admin)
    assert done == [f"schema dua_guard upgraded to version {current + 1}"]
    assert sql(pg_ledger.admin, "SELECT to_regclass('dua_guard.ledger_records_user')::text") == [
        ("dua_guard.ledger_records_user",)
    ]
    with open_ledger(pg_ledger.writer) as ledger:
        assert ledger.verify().ok and ledger.count() == 2
    monkeypatch.setattr(ledger_pg, "SCHEMA_VERSION", current)
    with pytest.raises(LedgerError, match="upgrade jupyter-dua-guard"):
        open_ledger(pg_ledger.writer)


# --------------------------------------------------------------------------- outages and spool


def adopt_spool(spool: Path, url: str) -> None:
    """Treat spools written for an unreachable address as the real database's (as if that
    address had been the database all along), and check they were kept apart before."""
    target = spool / ledger_pg.spool_key(url)
    target.mkdir(parents=True, exist_ok=True)
    with open_ledger(url) as other:  # a spool of another database is never flushed here
        assert other.count() == 0
    for path in list(spool.glob("db-*/spool-*")):
        if path.parent != target:
            path.rename(target / path.name)


def test_unreachable_database_spools_and_spool_verifies(pg_ledger, tmp_path):
    spool = tmp_path / "spool-down"
    down = f"postgresql://dua_guard_writer:{WRITER_PASSWORD}@127.0.0.1:{free_port()}/x"
    ledger = open_ledger(down + f"?spool={spool}&connect_timeout=2")
    t0 = time.monotonic()
    stored = [ledger.append("ai_ml_import", {**TOOL, "version": f"1.{i}"}) for i in range(5)]
    assert time.monotonic() - t0 < 10
    assert [r["seq"] for r in stored] == [1, 2, 3, 4, 5] and ledger.spooled() == 5
    ledger.close()
    files = list(spool.rglob("spool-*.sqlite"))
    assert len(files) == 1
    proc = cli("verify", "--ledger", f"sqlite:///{files[0]}")
    assert proc.returncode == 0 and "5 records" in proc.stdout
    # the database is back (here: the real one): the spool is flushed once, in order
    url = pg_ledger.server.url("dua_guard_writer", WRITER_PASSWORD, pg_ledger.db, spool=str(spool))
    adopt_spool(spool, url)
    with open_ledger(url) as back:
        versions = [r["data"]["version"] for r in back.records()]
        assert versions == [f"1.{i}" for i in range(5)]
        assert back.verify().ok
    assert not list(spool.rglob("spool-*"))


def test_silent_server_never_hangs_a_kernel(tmp_path):
    """A peer that accepts TCP but never answers: the append returns within the timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        url = f"postgresql://w:pw@127.0.0.1:{port}/x?connect_timeout=2&spool={tmp_path / 's'}"
        t0 = time.monotonic()
        ledger = open_ledger(url)
        ledger.append("kernel_started", {"kernel_id": "k"})
        ledger.append("kernel_started", {"kernel_id": "k2"})  # no second wait: retry later
        assert time.monotonic() - t0 < 12
        assert ledger.spooled() == 2 and "timeout" in (ledger.last_error or "").lower()
        ledger.close()
    finally:
        listener.close()


def test_reflushing_a_spool_never_duplicates(pg_ledger, tmp_path):
    spool = tmp_path / "sp"
    down = f"postgresql://dua_guard_writer:pw@127.0.0.1:{free_port()}/x?spool={spool}"
    with open_ledger(down) as ledger:
        ledger.append_many([("ai_ml_import", TOOL, None)] * 3)  # identical events, one burst
        ledger.append("ai_ml_import", {**TOOL, "version": "last"})
    (path,) = spool.rglob("spool-*.sqlite")
    backup = tmp_path / "copy.sqlite"
    backup.write_bytes(path.read_bytes())
    url = pg_ledger.server.url("dua_guard_writer", WRITER_PASSWORD, pg_ledger.db, spool=str(spool))
    adopt_spool(spool, url)
    (path,) = spool.rglob("spool-*.sqlite")
    with open_ledger(url) as ledger:
        assert ledger.count() == 4
        # the same spool again (a crash after the database committed, before the file went)
        os.replace(backup, path)
        assert ledger.flush() == 0
        assert ledger.count() == 4 and ledger.verify().ok
    assert not list(spool.rglob("spool-*"))


def _steady_writer(url: str, wid: int, n: int, out, pause: float = 0.01) -> None:
    ledger = open_ledger(url)
    for i in range(n):
        ledger.append("ai_ml_import", {**TOOL, "version": f"{wid}.{i}"}, {"kernel_id": f"w{wid}"})
        time.sleep(pause)
    out.put((wid, ledger.spooled()))
    ledger.close()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_database_stopped_mid_run_then_restarted(pg_ledger, mode):
    """``immediate`` is a crash: records chained but not yet flushed are lost with the
    server's WAL buffers; their writers were not told they were stored and spool them."""
    url = pg_ledger.writer + "&retry=0.5&connect_timeout=2"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    # a crash is tested at full speed, so that many appends are in flight when it comes
    n, writers, pause = (250, 4, 0.01) if mode == "fast" else (300, 8, 0.0)
    procs = [
        ctx.Process(target=_steady_writer, args=(url, w, n, out, pause)) for w in range(writers)
    ]
    for p in procs:
        p.start()
    with open_ledger(pg_ledger.writer) as probe:
        deadline = time.monotonic() + 60
        while probe.count() < 100 * writers // 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert probe.count() >= 100 * writers // 4
    pg_ledger.server.stop(mode)
    time.sleep(2.5)
    spooled_during = list(pg_ledger.spool.rglob("spool-*.sqlite"))
    pg_ledger.server.start()
    for p in procs:
        p.join(180)
        assert p.exitcode == 0
    assert spooled_during, "no writer spooled while the database was down"
    check_writers_once_in_order(pg_ledger.writer, writers, n)  # flushes ended writers' spools
    assert not list(pg_ledger.spool.rglob("spool-*"))


def test_orphan_spool_is_left_alone_while_its_process_lives(pg_ledger, tmp_path):
    spool = tmp_path / "sp"
    down = f"postgresql://dua_guard_writer:pw@127.0.0.1:{free_port()}/x?spool={spool}"
    alive = open_ledger(down)
    alive.append("kernel_started", {"kernel_id": "k"})
    url = pg_ledger.server.url("dua_guard_writer", WRITER_PASSWORD, pg_ledger.db, spool=str(spool))
    adopt_spool(spool, url)
    with open_ledger(url) as other:
        assert other.count() == 0  # the owner is alive: it flushes its own spool
    alive.close()  # the process "ends": its spool is now an orphan
    with open_ledger(url) as other:
        assert other.count() == 1


def test_events_are_not_lost_when_spool_and_database_fail(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    down = f"postgresql://w:pw@127.0.0.1:{free_port()}/x?spool={blocked}/sub"
    ledger = open_ledger(down)
    with pytest.raises(LedgerError, match="spool directory") as err:
        ledger.append("kernel_started", {"kernel_id": "k"})
    assert "pw" not in str(err.value).replace("spool", "")
    ledger.close()


def test_threads_share_one_ledger(pg_ledger):
    with open_ledger(pg_ledger.writer) as ledger:
        threads = [
            threading.Thread(
                target=lambda t=t: [
                    ledger.append("data_read", {"path": f"/d/{t}-{i}", "format": "csv"})
                    for i in range(25)
                ]
            )
            for t in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert ledger.count() == 100 and ledger.verify().ok


def test_pg_server_binaries_are_in_dev_script():
    script = (Path(__file__).parents[1] / "scripts" / "dev.sh").read_text()
    assert "postgresql" in script
