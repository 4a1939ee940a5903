"""Reports over a PostgreSQL ledger: the streamed C pass (``PostgresLedger.survey``) against
the database's own aggregation and verification, on a real server."""

from __future__ import annotations

import json
import random
import threading
import time

import psycopg
import pytest
from pg_server import WRITER_PASSWORD

from jupyter_dua_guard import ledger_pg
from jupyter_dua_guard.ledger import GENESIS, LedgerError, open_ledger, record_hash
from jupyter_dua_guard.report import build_report

pytestmark = pytest.mark.skipif(
    ledger_pg._pgsurvey_fast is None, reason="the C module _pgsurvey_fast is not built"
)

KINDS = [
    "ai_ml_import", "kernel_started", "egress_blocked", "egress_allowed_ai", "output_flagged",
    "data_read", "model_artifact_written", "review_signed", "guard_defaults_used", "other_kind",
]  # fmt: skip

# JSON texts of values as an owner (or another client) could have written them.
TEXTS = [
    '"plain"', '"torch"', '"caf\\u00e9"', '"café"', '"quote \\" and \\\\ slash"',
    '"tab\\tnew\\nline"', '"\\ud83d\\ude00 smile"', '"😀"', '"\\/slash"', '""', "null", "true",
    "false", "0", "443", "-7", "12345678901234567890", "1.50", "1e3", "2E-2", "-0", "0.0",
    "-1.5e+2", '{"a": [1, 2.5, "x"]}', "[]", '["nested", {"k": null}]', "{}",
]  # fmt: skip
USERS = ['"alice"', '"bob"', '"b\\u00f6b"', "null", '"carol"']
HOSTS = ['"node-1"', '"node-2"', '"n\\u00f8de"', "null"]
TIMES = [
    '"2026-01-0{d}T10:00:00Z"', '"2026-01-0{d}T10:00:00.5Z"', '"2026-01-0{d}"',
    '"2026-01-0{d}T23:59:59.999999Z"', "null", "17", '"z-not-a-time"',
]  # fmt: skip
DATA_KEYS = [
    "distribution", "name", "version", "category", "host", "port", "rule", "path", "library",
    "size", "format", "reviewer", "notebook", "scope", "kernel_name", "other",
]  # fmt: skip


def _member(key: str, value: str, rng: random.Random) -> str:
    sep = rng.choice([":", ": ", " : "])
    if rng.random() < 0.03:  # the same key spelled with an escape
        key = key[:-1] + f"\\u{ord(key[-1]):04x}"
    return f'"{key}"{sep}{value}'


def _object(members: list[str], rng: random.Random) -> str:
    return "{" + rng.choice([",", ", "]).join(members) + "}"


def tricky_body(rng: random.Random, seq: int) -> str:
    """A record body with the odd forms a JSON reader must get right."""
    ctx = []
    for key, choices in (
        ("user", USERS), ("host", HOSTS), ("platform", ['"Linux"', '"macOS"', "1.5"]),
        ("kernel_id", ['"k1"', '"k2"', '"k3"', '""', "null", "7"]),
        ("notebook", ['"a.ipynb"', '"b.ipynb"', '""', "null", '"n\\u00e9.ipynb"']),
    ):  # fmt: skip
        if rng.random() < 0.9:
            ctx.append(_member(key, rng.choice(choices), rng))
    if rng.random() < 0.1:
        ctx.append(_member("user", rng.choice(USERS), rng))  # duplicate: the last one counts
    data = []
    for key in rng.sample(DATA_KEYS, rng.randint(0, 8)):
        data.append(_member(key, rng.choice(TEXTS), rng))
    if data and rng.random() < 0.1:
        data.append(data[0])
    members = [
        _member("context", _object(ctx, rng) if rng.random() < 0.95 else '"flat"', rng),
        _member("data", _object(data, rng) if rng.random() < 0.95 else "[1, 2]", rng),
        _member("seq", str(seq), rng),
    ]
    if rng.random() < 0.97:
        kind = rng.choice(KINDS)
        members.append(_member("kind", f'"{kind}"' if rng.random() < 0.97 else "5", rng))
    if rng.random() < 0.97:
        members.append(_member("time", rng.choice(TIMES).format(d=rng.randint(1, 5)), rng))
    if rng.random() < 0.05:
        members.append(_member("kind", '"data_read"', rng))
    rng.shuffle(members)
    return _object(members, rng)


def insert_chain(url: str, bodies: list[str], start: int = 0, prev: str = GENESIS) -> list[tuple]:
    """Append records as written by hand (the owner may INSERT), chained correctly."""
    rows = []
    for i, body in enumerate(bodies, start + 1):
        digest = record_hash(prev, body)
        rows.append((i, prev, digest, body))
        prev = digest
    with psycopg.connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO dua_guard.ledger_records (seq, prev, hash, body) VALUES (%s, %s, %s, %s)",
            rows,
        )
    return rows


def sql(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def normal(usage: dict) -> tuple:
    """Figures in a comparable form (the order of groups carries no meaning)."""
    return (
        sorted(json.dumps(g, sort_keys=True) for g in usage["groups"]),
        sorted(json.dumps(d, sort_keys=True) for d in usage["distinct"]),
        usage["kernels"],
        usage["kernels_started"],
        usage["notebooks"],
    )


def comparable(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "generated"}


@pytest.fixture
def split(monkeypatch):
    """Ranges of a few records, so that small ledgers are streamed as several ranges."""
    monkeypatch.setattr(ledger_pg.PostgresLedger, "_SURVEY_SPLIT", 3)


@pytest.mark.parametrize("seed", [1, 2])
def test_figures_equal_the_database_aggregate_on_tricky_bodies(pg_ledger, split, seed):
    rng = random.Random(seed)
    rows = insert_chain(pg_ledger.owner, [tricky_body(rng, i) for i in range(1, 401)])
    assert len(rows) == 400
    filters = [
        {},
        {"since": "2026-01-02"},
        {"until": "2026-01-03"},
        {"since": "2026-01-02T10:00:00Z", "until": "2026-01-04T10:00:00.5Z"},
        {"user": "alice"},
        {"user": "böb", "host": "nøde"},
        {"host": "node-2", "since": "2026-01-03"},
        {"user": "nobody"},
    ]
    with open_ledger(pg_ledger.writer) as ledger:
        for workers in (1, 3):
            for f in filters:
                since, until = f.get("since"), f.get("until")
                who = {"user": f.get("user"), "host": f.get("host")}
                verification, usage = ledger.survey(since, until, workers=workers, **who)
                assert verification.ok and verification.records == 400
                expected = ledger.aggregate(since, until, **who)
                assert normal(usage) == normal(expected), (workers, f)
        assert usage["groups"] == []  # the last filter matches nobody
        _, everything = ledger.survey(workers=3)
        assert sum(g["count"] for g in everything["groups"]) == 400
        assert any(g["subject"] == "café" for g in everything["groups"])


def test_canonical_records_need_no_sql_and_match(pg_ledger, split, monkeypatch):
    """Records written by the guard itself are read entirely in C: no odd record."""
    with open_ledger(pg_ledger.writer) as ledger:
        for i in range(30):
            ledger.append(
                ["ai_ml_import", "egress_blocked", "data_read", "kernel_started"][i % 4],
                {"name": f"t{i % 3}", "distribution": f"d{i % 3}", "version": "1.0",
                 "host": "api.example.test", "port": 443, "rule": "ai", "path": f"/d/{i % 2}",
                 "format": "csv", "kernel_name": "python3", "note": "é\n\"q\""},
                {"kernel_id": f"k{i % 5}", "notebook": f"nb{i % 4}.ipynb", "user": "u",
                 "host": "h", "platform": "p"},
            )  # fmt: skip
        seen = []
        real = ledger_pg.PostgresLedger._stream

        def spy(self, *args):
            out = real(self, *args)
            seen.append(out[2])
            return out

        monkeypatch.setattr(ledger_pg.PostgresLedger, "_stream", spy)
        verification, usage = ledger.survey(workers=4)
        assert seen == [[]] and verification.ok
        assert normal(usage) == normal(ledger.aggregate())
        assert usage["kernels"] == 5 and usage["kernels_started"] == 5


def test_many_tools_and_kernels_match_the_database(pg_ledger, split):
    """Distinct kernels and notebooks per tool when tools outnumber the C tally's bit rows
    (256) and their ids differ between ranges."""
    rng = random.Random(11)
    bodies = []
    for i in range(1, 901):
        tool = rng.randrange(320)
        data = {"name": f"t{tool}", "distribution": f"dist-{tool}", "version": f"{tool % 7}.0"}
        if i % 9 == 0:
            data = {"kernel_id": f"k{i % 41}", "kernel_name": "python3"}
        context = {"kernel_id": f"k{rng.randrange(41)}", "notebook": f"nb{rng.randrange(13)}"}
        kind = "kernel_started" if i % 9 == 0 else "ai_ml_import"
        bodies.append(json.dumps({"context": {**context, "user": "u"}, "data": data,
                                  "kind": kind, "seq": i, "time": "2026-02-01T00:00:00Z"},
                                 sort_keys=True, separators=(",", ":")))  # fmt: skip
    insert_chain(pg_ledger.owner, bodies)
    with open_ledger(pg_ledger.writer) as ledger:
        expected = normal(ledger.aggregate())
        assert len(expected[1]) > 256
        for workers in (1, 4):
            verification, usage = ledger.survey(workers=workers)
            assert verification.ok and verification.records == 900
            assert normal(usage) == expected, workers


def test_report_equals_the_report_without_the_c_module(pg_ledger, split, monkeypatch):
    rng = random.Random(7)
    insert_chain(pg_ledger.owner, [tricky_body(rng, i) for i in range(1, 121)])
    with open_ledger(pg_ledger.writer) as ledger:
        fast = build_report(ledger, workers=2, since="2026-01-02", user="alice")
        monkeypatch.setattr(ledger_pg, "_pgsurvey_fast", None)
        slow = build_report(ledger, workers=2, since="2026-01-02", user="alice")
    assert fast["verification"]["ok"] and fast["events"] > 0
    assert comparable(fast) == comparable(slow)


@pytest.mark.parametrize("who", [{"user": "a*"}, {"host": "node-?"}, {"user": "[bc]*"},
                                 {"user": "zz*"}, {"user": "*", "host": "n*"}])  # fmt: skip
def test_glob_filters_match_the_database(pg_ledger, split, who):
    """Globs are matched by the database against the ledger's names, then tallied in C."""
    rng = random.Random(3)
    insert_chain(pg_ledger.owner, [tricky_body(rng, i) for i in range(1, 161)])
    with open_ledger(pg_ledger.writer) as ledger:
        verification, usage = ledger.survey(since="2026-01-02", workers=3, **who)
        assert verification.ok
        assert normal(usage) == normal(ledger.aggregate(since="2026-01-02", **who))
        if who.get("user") == "zz*":
            assert usage["groups"] == []


def _rechain(conn: psycopg.Connection, first: int, prev: str) -> None:
    """Recompute the hashes from record ``first`` on after ``prev`` (an undetectable rewrite
    but for the one link before it)."""
    rows = conn.execute(
        "SELECT seq, body FROM dua_guard.ledger_records WHERE seq >= %s ORDER BY seq", (first,)
    ).fetchall()
    for seq, body in rows:
        digest = record_hash(prev, body)
        conn.execute(
            "UPDATE dua_guard.ledger_records SET prev = %s, hash = %s WHERE seq = %s",
            (prev, digest, seq),
        )
        prev = digest


def _tamper(url: str, how: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER TABLE dua_guard.ledger_records DISABLE TRIGGER ALL")
        t = "dua_guard.ledger_records"
        if how == "body":
            conn.execute(f"UPDATE {t} SET body = replace(body, 'v5', 'v9') WHERE seq = 5")
        elif how == "hash":
            conn.execute(f"UPDATE {t} SET hash = repeat('a', 64) WHERE seq = 17")
        elif how == "prev":
            conn.execute(f"UPDATE {t} SET prev = repeat('b', 64) WHERE seq = 23")
        elif how == "gap":
            conn.execute(f"UPDATE {t} SET seq = 1000 WHERE seq = 30")
        elif how == "deleted":
            conn.execute(f"DELETE FROM {t} WHERE seq = 12")
        elif how == "deleted-and-rechained":
            conn.execute(f"DELETE FROM {t} WHERE seq = 12")
            conn.execute(f"UPDATE {t} SET seq = seq - 1 WHERE seq > 12")
            prev = conn.execute(f"SELECT hash FROM {t} WHERE seq = 11").fetchone()[0]
            _rechain(conn, 12, prev)
        elif how == "swapped":
            conn.execute(f"UPDATE {t} SET seq = -seq WHERE seq IN (8, 9)")
            conn.execute(f"UPDATE {t} SET seq = 9 WHERE seq = -8")
            conn.execute(f"UPDATE {t} SET seq = 8 WHERE seq = -9")
        elif how == "boundary":
            # Record 11 opens the second of three ranges; only its link to record 10 breaks.
            _rechain(conn, 11, "c" * 64)
        elif how == "first":
            _rechain(conn, 1, "d" * 64)
        elif how == "below":
            conn.execute(
                f"INSERT INTO {t} (seq, prev, hash, body) SELECT 0, prev, hash, body FROM {t} "
                "WHERE seq = 1"
            )
        elif how == "shifted":
            # The same bytes in prev || hash || body: prev's last character moved to hash.
            conn.execute(
                f"UPDATE {t} SET prev = left(prev, 63), hash = right(prev, 1) || hash "
                "WHERE seq = 14"
            )
        elif how == "truncated-tail":
            conn.execute(f"DELETE FROM {t} WHERE seq > 25")
        conn.execute("ALTER TABLE dua_guard.ledger_records ENABLE TRIGGER ALL")


@pytest.mark.parametrize(
    "how",
    ["body", "hash", "prev", "gap", "deleted", "deleted-and-rechained", "swapped", "boundary",
     "first", "below", "shifted", "truncated-tail", "intact"],
)  # fmt: skip
@pytest.mark.parametrize("ranges", ["blocks", "seq"])
def test_tampering_gives_the_same_verdict_as_verify(pg_ledger, split, how, ranges, monkeypatch):
    monkeypatch.setattr(ledger_pg.PostgresLedger, "_SURVEY_SPLIT", 10)
    if ranges == "seq":  # as on PostgreSQL before 14 (no TID range scans)
        monkeypatch.setattr(ledger_pg.PostgresLedger, "_BLOCK_RANGES_FROM", 10**9)
    with open_ledger(pg_ledger.writer) as ledger:
        records = [ledger.append("data_read", {"path": f"/d/v{i}"}) for i in range(1, 31)]
    pin = f"30:{records[-1]['hash']}"
    _tamper(pg_ledger.owner, how)
    with open_ledger(pg_ledger.writer) as ledger:
        for head in (None, pin):
            expected = ledger.verify(head).to_dict()
            verification, usage = ledger.survey(head=head, workers=3)
            assert verification.to_dict() == expected
            assert normal(usage) == normal(ledger.aggregate())
            report = build_report(ledger, head=head, workers=3)
            assert report["verification"] == expected
        assert expected["ok"] == (how == "intact")


def test_disabled_trigger_and_altered_column_are_reported(pg_ledger, split):
    with open_ledger(pg_ledger.writer) as ledger:
        for i in range(12):
            ledger.append("egress_blocked", {"host": "x.example.test", "port": 443 + i % 2})
    sql(
        pg_ledger.owner,
        "ALTER TABLE dua_guard.ledger_records DISABLE TRIGGER ledger_records_no_truncate",
    )
    with open_ledger(pg_ledger.writer) as ledger:
        verification, _ = ledger.survey(workers=2)
        assert not verification.ok and "trigger" in verification.problem
        assert verification.to_dict() == ledger.verify().to_dict()
    sql(
        pg_ledger.owner,
        "ALTER TABLE dua_guard.ledger_records ENABLE TRIGGER ALL",
        "ALTER TABLE dua_guard.ledger_records ALTER COLUMN fields DROP EXPRESSION",
        "ALTER TABLE dua_guard.ledger_records DISABLE TRIGGER ALL",
        "UPDATE dua_guard.ledger_records SET fields = jsonb_set(fields, '{context,host}', "
        "'\"elsewhere\"') WHERE seq = 2",
        "ALTER TABLE dua_guard.ledger_records ENABLE TRIGGER ALL",
    )
    with open_ledger(pg_ledger.writer) as ledger:
        verification, usage = ledger.survey(workers=2)
        assert not verification.ok and "no longer generated" in verification.problem
        # The figures are what the (altered) columns say, as the database reports them.
        assert normal(usage) == normal(ledger.aggregate())
        assert any(g["host"] == "elsewhere" for g in usage["groups"])


def test_empty_ledger(pg_ledger):
    with open_ledger(pg_ledger.writer) as ledger:
        verification, usage = ledger.survey(workers=2)
        assert verification.ok and verification.records == 0
        assert normal(usage) == normal(ledger.aggregate())


def test_refused_connection_is_one_line_error(pg_ledger, split):
    """The streaming connection is refused (the role may hold one connection only)."""
    fill_url = pg_ledger.writer
    with open_ledger(fill_url) as ledger:
        for i in range(5):
            ledger.append("data_read", {"path": f"/d/{i}"})
    sql(
        pg_ledger.admin,
        "DROP ROLE IF EXISTS dua_one_conn",
        f"CREATE ROLE dua_one_conn LOGIN PASSWORD '{WRITER_PASSWORD}' CONNECTION LIMIT 1 "
        "IN ROLE dua_guard_writer",
    )
    url = fill_url.replace("dua_guard_writer", "dua_one_conn")
    ledger = open_ledger(url)
    try:
        ledger._drop_connection()  # the reader's own connection is then the only one
        with pytest.raises(LedgerError) as info:
            ledger.survey(workers=2)
        message = str(info.value)
        assert "\n" not in message and "cannot reach" in message
        assert "connection" in message and WRITER_PASSWORD not in message
    finally:
        ledger.close()


def test_backend_killed_mid_stream_is_one_line_error(pg_ledger):
    """A backend ended while it streams: a one-line error, no traceback, no hang."""
    body = (
        """'{"context":{"host":"h","kernel_id":"k' || g % 50 || '","user":"u"},"""
        """"data":{"path":"/data/file-' || g % 1000 || '.csv","format":"csv"},"""
        """"kind":"data_read","seq":' || g || ',"time":"2026-02-01T00:00:00Z"}'"""
    )
    sql(
        pg_ledger.owner,
        "INSERT INTO dua_guard.ledger_records (seq, prev, hash, body) "
        f"SELECT g, repeat('0', 64), repeat('0', 64), {body} FROM generate_series(1, 400000) g",
    )
    stop = threading.Event()
    killed = []

    def killer() -> None:
        with psycopg.connect(pg_ledger.admin, autocommit=True) as conn:
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline:
                rows = conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE query LIKE 'COPY (SELECT seq, %%ledger_records%%' "
                    "AND state = 'active' AND pid <> pg_backend_pid()"
                ).fetchall()
                if rows:
                    killed.extend(rows)
                    return
                time.sleep(0.002)

    thread = threading.Thread(target=killer)
    with open_ledger(pg_ledger.writer) as ledger:
        thread.start()
        try:
            with pytest.raises(LedgerError) as info:
                ledger.survey(workers=2)
        finally:
            stop.set()
            thread.join()
    assert killed
    message = str(info.value)
    assert "\n" not in message and "failed" in message and "retry" in message


def test_non_bytewise_collation_takes_the_figures_from_the_database(pg_ledger, split, monkeypatch):
    """Where ``time`` does not sort bytewise the C pass only verifies; the database groups."""
    rng = random.Random(5)
    insert_chain(pg_ledger.owner, [tricky_body(rng, i) for i in range(1, 41)])
    real = ledger_pg._survey_summary
    monkeypatch.setattr(ledger_pg, "_survey_summary", lambda conn: (*real(conn)[:3], False))
    tallying = []
    stream = ledger_pg.PostgresLedger._stream

    def spy(self, *args):
        tallying.append(args[-1])
        return stream(self, *args)

    monkeypatch.setattr(ledger_pg.PostgresLedger, "_stream", spy)
    with open_ledger(pg_ledger.writer) as ledger:
        verification, usage = ledger.survey(since="2026-01-03", workers=2)
        assert verification.ok and tallying == [False]
        assert normal(usage) == normal(ledger.aggregate(since="2026-01-03"))


def test_records_stored_out_of_seq_order_verify_without_the_database(pg_ledger, split, monkeypatch):
    """Heap order differs from seq order (concurrent writers, restores): the C pass checks
    the links across runs and ranges itself, and still catches a broken one."""
    rng = random.Random(9)
    bodies = [tricky_body(rng, i) for i in range(1, 91)]
    rows, prev = [], GENESIS
    for i, body in enumerate(bodies, 1):
        digest = record_hash(prev, body)
        rows.append((i, prev, digest, body))
        prev = digest
    rng.shuffle(rows)
    with psycopg.connect(pg_ledger.owner, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO dua_guard.ledger_records (seq, prev, hash, body) VALUES (%s, %s, %s, %s)",
            rows,
        )
    with open_ledger(pg_ledger.writer) as ledger:
        expected = ledger.verify().to_dict()
        aggregate = ledger.aggregate()
        monkeypatch.setattr(
            ledger_pg.PostgresLedger, "verify", lambda *a, **k: pytest.fail("fell back")
        )
        for workers in (1, 2, 3):
            verification, usage = ledger.survey(workers=workers)
            assert verification.to_dict() == expected and verification.ok
            assert normal(usage) == normal(aggregate)
    monkeypatch.undo()
    sql(
        pg_ledger.owner,
        "ALTER TABLE dua_guard.ledger_records DISABLE TRIGGER ALL",
        "UPDATE dua_guard.ledger_records SET prev = repeat('e', 64) WHERE seq = 47",
        "ALTER TABLE dua_guard.ledger_records ENABLE TRIGGER ALL",
    )
    with open_ledger(pg_ledger.writer) as ledger:
        expected = ledger.verify().to_dict()
        assert not expected["ok"]
        for workers in (1, 3):
            assert ledger.survey(workers=workers)[0].to_dict() == expected
