"""The ledger on real SQLite files: chain, filters, schema, tampering, bad files."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3

import jsonschema
import pytest
from ledger_helpers import db, make_ledger, rehash, row, set_row

from jupyter_dua_guard import events
from jupyter_dua_guard.ledger import (
    GENESIS,
    LedgerError,
    canonical_json,
    default_ledger_url,
    open_ledger,
)


def test_append_returns_stored_record_with_context(tmp_path, monkeypatch):
    monkeypatch.setenv(events.ENV_KERNEL_ID, "kern-1")
    monkeypatch.setenv(events.ENV_NOTEBOOK, "nb/a.ipynb")
    with open_ledger(f"sqlite:///{tmp_path}/l.sqlite") as ledger:
        rec = ledger.append("egress_blocked", {"host": "llm.test", "port": 443, "rule": "ai"})
        assert rec["seq"] == 1 and rec["prev"] == GENESIS
        ctx = rec["context"]
        assert ctx["kernel_id"] == "kern-1" and ctx["notebook"] == "nb/a.ipynb"
        assert ctx["host"] and ctx["user"] and ctx["platform"] and ctx["python"]
        assert ctx["guard_version"]
        assert rec["time"].endswith("Z")
        stored = list(ledger.records())
        assert stored == [rec]
        second = ledger.append("data_read", {"path": "/d/seer.csv", "format": "csv"})
        assert second["prev"] == rec["hash"] and second["seq"] == 2


def test_hash_is_recomputable_by_an_auditor(tmp_path):
    """The documented rule: sha256(prev + '\\n' + canonical JSON of seq/time/kind/context/data)."""
    records = make_ledger(tmp_path / "l.sqlite", 5)
    prev = GENESIS
    for rec in records:
        body = {k: rec[k] for k in ("seq", "time", "kind", "context", "data")}
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert hashlib.sha256(f"{prev}\n{text}".encode()).hexdigest() == rec["hash"]
        assert rec["prev"] == prev
        prev = rec["hash"]


def test_records_validate_against_documented_schema(tmp_path):
    schema = json.loads(events.SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    with open_ledger(f"sqlite:///{tmp_path}/l.sqlite") as ledger:
        ledger.append(
            "kernel_started", {"kernel_id": "k", "kernel_name": "python3", "notebook": None}
        )
        ledger.append("model_artifact_written", {"path": "/m.pt", "size": 3, "library": "torch"})
        for rec in ledger.records():
            jsonschema.validate(rec, schema)
        bad = next(ledger.records(kinds=["model_artifact_written"]))
        bad["data"].pop("path")
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_filters_since_until_kind_notebook_and_paging(tmp_path):
    with open_ledger(f"sqlite:///{tmp_path}/l.sqlite") as ledger:
        for day in (1, 2, 3):
            for kind in ("ai_ml_import", "egress_blocked"):
                data = (
                    {"name": "x", "version": "1"}
                    if kind == "ai_ml_import"
                    else {"host": "h.test", "port": 443, "rule": "r"}
                )
                ledger.append(
                    kind, data, {"time": f"2026-03-0{day}T12:00:00Z", "notebook": f"nb/{day}.ipynb"}
                )
        assert ledger.count() == 6
        assert [r["seq"] for r in ledger.records(since="2026-03-02")] == [3, 4, 5, 6]
        assert [r["seq"] for r in ledger.records(until="2026-03-02")] == [1, 2, 3, 4]
        assert [r["seq"] for r in ledger.records(until="2026-03-02T11:00:00Z")] == [1, 2]
        assert [r["seq"] for r in ledger.records(kinds=["egress_blocked"])] == [2, 4, 6]
        assert [r["seq"] for r in ledger.records(kinds=["egress_blocked,ai_ml_import"])] == [
            1,
            2,
            3,
            4,
            5,
            6,
        ]
        assert [r["seq"] for r in ledger.records(notebook="nb/3.ipynb")] == [5, 6]
        assert [r["seq"] for r in ledger.records(notebook="nb/[12].ipynb")] == [1, 2, 3, 4]
        assert [r["seq"] for r in ledger.records(offset=2, limit=3)] == [3, 4, 5]
        assert [r["seq"] for r in ledger.records(descending=True, limit=2)] == [6, 5]
        assert ledger.count(kinds=["ai_ml_import"], since="2026-03-02") == 2
        with pytest.raises(LedgerError, match="unknown event kind"):
            list(ledger.records(kinds=["nope"]))
        with pytest.raises(LedgerError, match="cannot read the time"):
            list(ledger.records(since="last tuesday"))


def test_paging_past_one_thousand(tmp_path):
    with open_ledger(f"sqlite:///{tmp_path}/l.sqlite") as ledger:
        ledger.append_many([("data_read", {"path": f"/d/{i}"}, None) for i in range(2500)])
        seqs = [r["seq"] for r in ledger.records()]
        assert seqs == list(range(1, 2501))
        assert [r["seq"] for r in ledger.records(offset=999, limit=1003)][-1] == 2002
        assert ledger.verify().ok


def test_unknown_kind_and_unserialisable_data_refused(tmp_path):
    with open_ledger(f"sqlite:///{tmp_path}/l.sqlite") as ledger:
        with pytest.raises(LedgerError, match="unknown event kind 'made_up'"):
            ledger.append("made_up", {})
        with pytest.raises(LedgerError, match="JSON"):
            ledger.append("data_read", {"path": float("nan")})
        assert ledger.count() == 0


def test_default_url_uses_env_then_jupyter_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv(events.ENV_LEDGER, raising=False)
    assert default_ledger_url() == f"sqlite:///{tmp_path}/data/dua_guard/ledger.sqlite"
    with open_ledger() as ledger:
        ledger.append("data_read", {"path": "/x"})
    assert (tmp_path / "data" / "dua_guard" / "ledger.sqlite").exists()
    monkeypatch.setenv(events.ENV_LEDGER, f"sqlite:///{tmp_path}/env.sqlite")
    with open_ledger() as ledger:
        assert ledger.count() == 0
    assert (tmp_path / "env.sqlite").exists()


def test_canonical_json_is_stable():
    assert canonical_json({"b": 1, "a": [1, "é"]}) == '{"a":[1,"é"],"b":1}'


def test_forked_child_writes_through_its_own_connection(tmp_path):
    ledger = open_ledger(f"sqlite:///{tmp_path}/l.sqlite")
    ledger.append("data_read", {"path": "/parent"})
    pid = os.fork()
    if pid == 0:  # child: reuse the inherited object
        try:
            ledger.append("data_read", {"path": "/child"})
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    ledger.append("data_read", {"path": "/parent-again"})
    assert [r["data"]["path"] for r in ledger.records()] == ["/parent", "/child", "/parent-again"]
    assert ledger.verify().ok
    ledger.close()


# --------------------------------------------------------------------------- tampering


@pytest.fixture(params=["c-walk", "python-walk"])
def walk(request, monkeypatch):
    """Run a test with the C chain walk and again with the pure-Python one."""
    from jupyter_dua_guard import ledger as ledger_module

    if request.param == "python-walk":
        monkeypatch.setattr(ledger_module, "_chain_fast", None)
    elif ledger_module._chain_fast is None:
        pytest.skip("the C chain walk was not built (no compiler or JUPYTER_DUA_GUARD_NO_C)")
    return request.param


@pytest.fixture
def tampered(tmp_path, walk):
    path = tmp_path / "ledger.sqlite"
    records = make_ledger(path, 20)
    conn = db(path)
    yield path, conn, records
    conn.close()


def verify(path, head=None):
    with open_ledger(f"sqlite:///{path}", create=False) as ledger:
        return ledger.verify(head=head)


def test_intact_ledger_verifies(tampered):
    path, _, records = tampered
    result = verify(path)
    assert result.ok and result.records == 20 and result.head_hash == records[-1]["hash"]
    assert result.summary().startswith("ledger intact: 20 records, head 20:")


def test_edit_a_field_is_named(tampered):
    path, conn, _ = tampered
    conn.execute(
        "UPDATE ledger_records SET body = replace(body, '\"1.5.2\"', '\"9.9.9\"') WHERE seq = 9"
    )
    result = verify(path)
    assert not result.ok and result.bad_seq == 9 and "edited" in result.problem


def test_edit_of_prev_column_is_named(tampered):
    path, conn, _ = tampered
    conn.execute("UPDATE ledger_records SET prev = ? WHERE seq = 4", ("f" * 64,))
    result = verify(path)
    assert not result.ok and result.bad_seq == 4


def test_edit_and_rehash_is_named(tampered):
    path, conn, _ = tampered
    prev, _, old = row(conn, 6)
    body = old.replace("torch", "numpy")
    assert body != old
    set_row(conn, 6, prev, rehash(prev, body), body)
    result = verify(path)
    assert not result.ok and result.bad_seq == 6 and "re-hashed" in result.problem


def test_delete_a_row_is_named(tampered):
    path, conn, _ = tampered
    conn.execute("DELETE FROM ledger_records WHERE seq = 12")
    result = verify(path)
    assert not result.ok and result.bad_seq == 12 and "deleted" in result.problem


def test_delete_and_renumber_is_named(tampered):
    path, conn, _ = tampered
    conn.execute("DELETE FROM ledger_records WHERE seq = 5")
    conn.execute("UPDATE ledger_records SET seq = -(seq - 1) WHERE seq > 5")
    conn.execute("UPDATE ledger_records SET seq = -seq WHERE seq < 0")
    result = verify(path)
    assert not result.ok and result.bad_seq == 5


def _shift_from(conn, seq):
    conn.execute("UPDATE ledger_records SET seq = -(seq + 1) WHERE seq >= ?", (seq,))
    conn.execute("UPDATE ledger_records SET seq = -seq WHERE seq < 0")


def test_insert_a_forged_row_is_named(tampered):
    """The best forgery: valid JSON, correct prev, correct hash, slotted in at seq 6."""
    path, conn, records = tampered
    _shift_from(conn, 6)
    body = canonical_json(
        {
            "seq": 6,
            "time": records[5]["time"],
            "kind": "review_signed",
            "context": records[5]["context"],
            "data": {"reviewer": "mallory"},
        }
    )
    prev = records[4]["hash"]
    conn.execute(
        "INSERT INTO ledger_records (seq, prev, hash, body) VALUES (6, ?, ?, ?)",
        (prev, rehash(prev, body), body),
    )
    result = verify(path)
    assert not result.ok and result.bad_seq == 6 and "inserted" in result.problem


def test_insert_a_naive_row_is_named(tampered):
    path, conn, records = tampered
    _shift_from(conn, 11)
    conn.execute(
        "INSERT INTO ledger_records (seq, prev, hash, body) VALUES (11, ?, ?, ?)",
        (records[9]["hash"], "0" * 64, '{"kind":"review_signed","seq":11}'),
    )
    result = verify(path)
    assert not result.ok and result.bad_seq == 11


def test_swap_two_rows_is_named(tampered):
    path, conn, _ = tampered
    a, b = row(conn, 3), row(conn, 8)
    set_row(conn, 3, *b)
    set_row(conn, 8, *a)
    result = verify(path)
    assert not result.ok and result.bad_seq == 3 and "swapped" in result.problem


def test_swap_of_bodies_only_is_named(tampered):
    path, conn, _ = tampered
    a, b = row(conn, 5), row(conn, 9)
    set_row(conn, 5, a[0], a[1], b[2])
    set_row(conn, 9, b[0], b[1], a[2])
    result = verify(path)
    assert not result.ok and result.bad_seq == 5 and "swapped" in result.problem


def test_swap_adjacent_rows_by_renumbering_is_named(tampered):
    path, conn, _ = tampered
    conn.execute("UPDATE ledger_records SET seq = -1 WHERE seq = 14")
    conn.execute("UPDATE ledger_records SET seq = 14 WHERE seq = 15")
    conn.execute("UPDATE ledger_records SET seq = 15 WHERE seq = -1")
    result = verify(path)
    assert not result.ok and result.bad_seq == 14


def test_truncated_tail_detected_against_pinned_head(tampered):
    path, conn, records = tampered
    pinned = f"20:{records[-1]['hash']}"
    assert verify(path, head=pinned).ok
    conn.execute("DELETE FROM ledger_records WHERE seq > 16")
    assert verify(path).ok  # without a pin a clean cut cannot be seen ...
    result = verify(path, head=pinned)  # ... with one it is
    assert not result.ok and result.bad_seq == 17 and "truncated" in result.problem
    result = verify(path, head=records[-1]["hash"])  # hash alone, as printed in a report
    assert not result.ok and result.bad_seq == 17 and "truncated" in result.problem


def test_pinned_head_still_ok_after_more_appends(tampered):
    path, _, records = tampered
    pinned = f"20:{records[-1]['hash']}"
    with open_ledger(f"sqlite:///{path}") as ledger:
        ledger.append("data_read", {"path": "/later"})
    result = verify(path, head=pinned)
    assert result.ok and result.records == 21


def test_rewritten_tail_detected_against_pinned_head(tampered):
    path, conn, records = tampered
    prev, _, old = row(conn, 20)
    body = old.replace("openai", "tampered")
    assert body != old
    set_row(conn, 20, prev, rehash(prev, body), body)
    assert verify(path).ok
    result = verify(path, head=f"20:{records[-1]['hash']}")
    assert not result.ok and result.bad_seq == 20


def test_altered_schema_detected(tampered):
    path, conn, _ = tampered
    conn.execute("DROP INDEX ledger_records_report")
    conn.execute("ALTER TABLE ledger_records RENAME TO old")
    conn.execute("CREATE TABLE ledger_records AS SELECT seq, prev, hash, body, time, kind FROM old")
    result = verify(path)
    assert not result.ok and "schema" in result.problem


def test_dropped_records_table_detected(tampered):
    path, conn, _ = tampered
    conn.execute("DROP TABLE ledger_records")
    result = verify(path)
    assert not result.ok and "removed or altered" in result.problem


def test_bad_pin_text_is_an_error(tampered):
    path, _, _ = tampered
    with pytest.raises(LedgerError, match="pinned head"):
        verify(path, head="not-a-hash")


# --------------------------------------------------------------------------- bad files


def test_non_sqlite_file_refused_untouched(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"these are my notes\n" * 50)
    before = path.read_bytes()
    with pytest.raises(LedgerError) as err:
        open_ledger(f"sqlite:///{path}")
    assert "not a jupyter-dua-guard ledger" in str(err.value) and "\n" not in str(err.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_other_sqlite_database_refused_untouched(tmp_path):
    path = tmp_path / "other.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE patients (id INTEGER)")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(LedgerError, match="not a jupyter-dua-guard ledger"):
        open_ledger(str(path))
    assert path.read_bytes() == before


def test_unknown_scheme_refused_postgres_accepted(tmp_path):
    for url in ("mysql://db/ledger", "https://example.test/l", "ftp:x"):
        with pytest.raises(LedgerError, match="unknown ledger URL"):
            open_ledger(url)
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(LedgerError, match="cannot reach the PostgreSQL ledger"):
        open_ledger(f"postgresql://w@127.0.0.1:{port}/ledger", create=False)
    with pytest.raises(LedgerError, match="unknown ledger URL option"):
        open_ledger(f"sqlite:///{tmp_path}/l.sqlite?color=red")


def test_directory_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LedgerError, match="cannot create the ledger directory"):
        open_ledger(f"sqlite:///{blocker}/sub/ledger.sqlite")
    assert blocker.read_text() == "x"


def test_reader_does_not_create_missing_ledger(tmp_path):
    with pytest.raises(LedgerError, match="no ledger at"):
        open_ledger(f"sqlite:///{tmp_path}/typo.sqlite", create=False)
    assert not (tmp_path / "typo.sqlite").exists()


@pytest.mark.parametrize("seq", [3, 11, 19])
def test_parallel_verification_names_the_same_record(tmp_path, monkeypatch, walk, seq):
    from jupyter_dua_guard import ledger as ledger_module

    monkeypatch.setattr(ledger_module, "PARALLEL_MIN", 1)
    path = tmp_path / "ledger.sqlite"
    make_ledger(path, 20)
    with open_ledger(f"sqlite:///{path}", create=False) as ledger:
        assert ledger.verify(workers=3).ok
    conn = db(path)
    conn.execute("DELETE FROM ledger_records WHERE seq = ?", (seq,))
    conn.close()
    with open_ledger(f"sqlite:///{path}", create=False) as ledger:
        serial, parallel = ledger.verify(), ledger.verify(workers=3)
    assert not parallel.ok and parallel.bad_seq == serial.bad_seq == seq
    assert parallel.problem == serial.problem


@pytest.mark.parametrize("trial", range(12))
def test_c_and_python_walks_agree_on_random_tampering(tmp_path, monkeypatch, trial):
    """Whatever is done to a ledger, both walks give the same verdict and name the same record."""
    import random

    from jupyter_dua_guard import ledger as ledger_module

    if ledger_module._chain_fast is None:
        pytest.skip("the C chain walk was not built")
    monkeypatch.setattr(ledger_module, "PARALLEL_MIN", 1)
    rng = random.Random(trial)
    path = tmp_path / "ledger.sqlite"
    make_ledger(path, 30)
    conn = db(path)
    seq = rng.randint(1, 30)
    action = trial % 6
    if action == 0:
        conn.execute(
            "UPDATE ledger_records SET body = replace(body, 'x', 'y') WHERE seq = ?", (seq,)
        )
    elif action == 1:
        conn.execute("UPDATE ledger_records SET hash = upper(hash) WHERE seq = ?", (seq,))
    elif action == 2:
        conn.execute("DELETE FROM ledger_records WHERE seq = ?", (seq,))
    elif action == 3:
        conn.execute("UPDATE ledger_records SET prev = ? WHERE seq = ?", ("f" * 64, seq))
    elif action == 4:
        conn.execute("UPDATE ledger_records SET body = CAST(body AS BLOB) WHERE seq = ?", (seq,))
    else:
        other = seq % 30 + 1
        conn.execute("UPDATE ledger_records SET seq = -1 WHERE seq = ?", (seq,))
        conn.execute("UPDATE ledger_records SET seq = ? WHERE seq = ?", (seq, other))
        conn.execute("UPDATE ledger_records SET seq = ? WHERE seq = -1", (other,))
    conn.close()
    results = {}
    for name, walker in (("c", ledger_module._chain_fast), ("python", None)):
        monkeypatch.setattr(ledger_module, "_chain_fast", walker)
        for workers in (1, 3):
            with open_ledger(f"sqlite:///{path}", create=False) as ledger:
                r = ledger.verify(workers=workers)
            results[name, workers] = (r.ok, r.records, r.bad_seq, r.problem)
    assert len(set(results.values())) == 1, results


def _random_ledger(path, rng, n):
    """Events with awkward values: missing fields, numbers, empty strings, odd kinds."""
    kinds = [
        "ai_ml_import", "kernel_started", "egress_blocked", "egress_allowed_ai",
        "output_flagged", "data_read", "model_artifact_written", "review_signed",
        "guard_defaults_used", "csp_violation",
    ]  # fmt: skip
    pick = rng.choice
    with open_ledger(f"sqlite:///{path}") as ledger:
        for _ in range(n):
            kind = pick(kinds)
            data = {
                "name": pick(["sklearn", "torch", "", None]),
                "distribution": pick(["scikit-learn", "torch", None]),
                "version": pick(["1.0", "2.0", 3, None]),
                "host": pick(["api.openai.com", "x.test", 443]),
                "port": pick([443, 80, "443", None]),
                "rule": pick(["ai-endpoint", "", None]),
                "path": pick(["m.pt", "data/x.csv", None]),
                "reviewer": pick(["pi", None]),
                "kernel_name": pick(["python3", None]),
            }
            data = {k: v for k, v in data.items() if v is not None or rng.random() < 0.5}
            context = {
                "kernel_id": pick(["k-1", "k-2", "k-3", "", 7, None]),
                "notebook": pick(["a.ipynb", "b/c.ipynb", "", None]),
                "user": pick(["analyst1", "analyst2", "pi"]),
                "host": pick(["hpc-1", "hpc-2", "laptop"]),
                "time": f"2026-0{rng.randint(1, 3)}-{rng.randint(10, 28)}T"
                f"{rng.randint(10, 23)}:00:00Z",
            }
            ledger.append(kind, data, context)


def _same_usage(a, b):
    def rows(items):
        return sorted(json.dumps(sorted(item.items()), default=repr) for item in items)

    assert rows(a["groups"]) == rows(b["groups"])
    assert rows(a["distinct"]) == rows(b["distinct"])
    assert (a["kernels"], a["kernels_started"]) == (b["kernels"], b["kernels_started"])
    assert a["notebooks"] == b["notebooks"]


@pytest.mark.parametrize("trial", range(4))
def test_c_tally_agrees_with_sql_aggregation(tmp_path, monkeypatch, trial):
    """The C tally behind reports gives what the SQL grouping gives, filters included."""
    import random

    from jupyter_dua_guard import ledger as ledger_module

    if not hasattr(ledger_module._chain_fast, "tally"):
        pytest.skip("the C module was not built")
    rng = random.Random(trial)
    path = tmp_path / "ledger.sqlite"
    _random_ledger(path, rng, 300)
    if trial % 2:  # tampered kinds sort before, between and after the real ones
        conn = db(path)
        conn.execute(
            "UPDATE ledger_records SET body = json_remove(body, '$.kind') WHERE seq % 37 = 0"
        )
        for kind, mod in (("aaa", 41), ("b_kind", 43), ("zzz", 47)):
            conn.execute(
                "UPDATE ledger_records SET body = json_set(body, '$.kind', ?) WHERE seq % ? = 0",
                (kind, mod),
            )
        conn.close()
    filters = [
        {},
        {"since": "2026-02-01", "until": "2026-03-15"},
        {"until": "2026-02-20T12:00:00Z"},
        {"user": "analyst*"},
        {"user": "pi", "host": "hpc-[12]"},
        {"host": "nowhere"},
    ]
    fast = ledger_module._chain_fast
    for kw in filters:
        with open_ledger(f"sqlite:///{path}", create=False) as ledger:
            monkeypatch.setattr(ledger_module, "_chain_fast", fast)
            tallied = ledger.aggregate(**kw)
            monkeypatch.setattr(ledger_module, "_chain_fast", None)
            grouped = ledger.aggregate(**kw)
        _same_usage(tallied, grouped)
        if not kw:
            assert tallied["groups"] and tallied["distinct"]


def test_report_survey_gives_figures_of_a_broken_chain(tmp_path):
    """A tampered ledger still gets its figures; the verification says what is wrong."""
    from jupyter_dua_guard.report import build_report

    path = tmp_path / "ledger.sqlite"
    make_ledger(path, 12)
    conn = db(path)
    conn.execute("UPDATE ledger_records SET body = replace(body, 'torch', 'tarch') WHERE seq = 6")
    conn.close()
    with open_ledger(f"sqlite:///{path}", create=False) as ledger:
        report = build_report(ledger, workers=2)
    assert report["verification"]["ok"] is False
    assert report["verification"]["bad_record"] == 6
    assert report["events"] == 12
    assert {t["tool"] for t in report["tools"]} >= {"scikit-learn", "xgboost", "tarch"}


def test_c_and_python_appends_chain_alike(tmp_path, monkeypatch):
    """Appends through the C appender and the Python path interleave into one valid chain."""
    from jupyter_dua_guard import ledger as ledger_module

    fast = ledger_module._chain_fast
    if not hasattr(fast, "Appender"):
        pytest.skip("the C module was not built")
    path = tmp_path / "ledger.sqlite"
    returned = []
    with open_ledger(f"sqlite:///{path}") as ledger:
        for i in range(12):
            monkeypatch.setattr(ledger_module, "_chain_fast", fast if i % 2 else None)
            data = {"name": f"tool-{i}", "note": "naïve ✓ 東京", "n": i}
            if i % 3 == 2:
                returned.extend(ledger.append_many([("ai_ml_import", data, None)] * 3))
            else:
                returned.append(ledger.append("ai_ml_import", data))
        monkeypatch.setattr(ledger_module, "_chain_fast", fast)
        stored = list(ledger.records())
        result = ledger.verify()
    assert result.ok and result.records == len(returned) == 20
    assert [r["seq"] for r in returned] == list(range(1, 21))
    for mine, theirs in zip(returned, stored, strict=True):
        assert {k: mine[k] for k in ("seq", "prev", "hash", "data", "kind", "time")} == {
            k: theirs[k] for k in ("seq", "prev", "hash", "data", "kind", "time")
        }
        assert mine["context"] == theirs["context"]
    assert stored[5]["data"]["note"] == "naïve ✓ 東京"


def test_c_appender_refuses_a_closed_ledger(tmp_path):
    ledger = open_ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    ledger.append("ai_ml_import", {"name": "x"})
    ledger.close()
    with pytest.raises(LedgerError, match="closed"):
        ledger.append("ai_ml_import", {"name": "y"})
