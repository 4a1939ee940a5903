"""PostgreSQL backend of the usage ledger: one central, append-only ledger for a hub.

Per-user SQLite files can be deleted by their owners and are scattered across servers; a
compliance officer answering NIH needs one place. This backend keeps the same events and
the same hash chain as SQLite, and lets the database itself enforce append-only:

- ``jupyter dua-guard db init`` creates schema ``dua_guard`` owned by an *owner* role and a
  *writer* role that may only INSERT and SELECT; a trigger refuses UPDATE, DELETE and
  TRUNCATE (even for the owner, unless the owner disables it — which ``verify`` reports).
- An append is one call of the ``submit`` procedure: under a transaction-scoped advisory
  lock it chains the events after the head and commits without waiting for the disk (so
  the lock is held for microseconds, not for a flush), then commits a second, tiny
  transaction synchronously, whose flush covers the first and is shared by concurrent
  writers. The order is total and gap-free however many kernels on however many hosts
  write at once, and ``append`` returns only once its records are durable. The database
  hashes exactly as ``record_hash`` does; the client checks the hashes it gets back.
- When the database cannot be reached, events go to a local spool — an ordinary SQLite
  ledger per process under the spool directory — and are flushed in order once the database
  answers again. Flushing is idempotent: an event already in the database (same time and
  content) is not inserted twice, so a lost acknowledgement or a crash mid-flush never
  duplicates. Every network wait is bounded (connect_timeout, tcp_user_timeout,
  statement_timeout), so a kernel never hangs on the database.

Credentials come from the URL, a libpq service file (``?service=NAME``) or the environment
(``PGPASSWORD``, ``PGPASSFILE``); they are passed to libpq only and never appear in messages.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from . import events
from .ledger import (
    _AGG_COLUMNS,
    _INHERITED,
    GENESIS,
    LEDGER_FORMAT,
    LEDGER_VERSION,
    Ledger,
    LedgerError,
    SQLiteLedger,
    VerifyResult,
    _parse_pin,
    canonical_json,
    default_ledger_url,
    diagnose_rows,
    parse_time,
    record_hash,
    redact_url,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

try:
    import psycopg
    from psycopg import sql as _sql
except ImportError:  # pragma: no cover - depends on the installation
    psycopg = None  # type: ignore[assignment]
    _sql = None  # type: ignore[assignment]

try:  # streams the records to verify and tally them in C (built with libpq)
    from . import _pgsurvey_fast
except ImportError:  # pragma: no cover - depends on the build
    _pgsurvey_fast = None  # type: ignore[assignment]

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "PostgresLedger",
    "db_init",
    "db_status",
    "db_upgrade",
]

SCHEMA = "dua_guard"
SCHEMA_VERSION = 4
LOCK_KEY = 0x6475615F6C656467  # "dua_ledg": the one advisory lock that orders appends
OWNER_ROLE = "dua_guard_owner"
WRITER_ROLE = "dua_guard_writer"

# Our own URL options; everything else goes to libpq untouched.
_OWN_OPTIONS = {"spool", "retry", "statement_timeout", "relay"}
# Bounded network waits unless the URL or service file says otherwise (seconds / ms).
_LIBPQ_DEFAULTS = {
    "connect_timeout": "5",
    "tcp_user_timeout": "10000",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "2",
    "application_name": "jupyter-dua-guard",
}

_J = "(body::jsonb)"
_RECORDS_SQL = f"""CREATE TABLE {SCHEMA}.ledger_records (
    seq bigint PRIMARY KEY,
    prev text NOT NULL,
    hash text NOT NULL,
    body text NOT NULL,
    pending_id bigint UNIQUE,
    time text GENERATED ALWAYS AS ({_J} ->> 'time') STORED,
    kind text GENERATED ALWAYS AS ({_J} ->> 'kind') STORED,
    username text GENERATED ALWAYS AS ({_J} -> 'context' ->> 'user') STORED,
    host text GENERATED ALWAYS AS ({_J} -> 'context' ->> 'host') STORED,
    platform text GENERATED ALWAYS AS ({_J} -> 'context' ->> 'platform') STORED,
    kernel text GENERATED ALWAYS AS ({_J} -> 'context' ->> 'kernel_id') STORED,
    notebook text GENERATED ALWAYS AS ({_J} -> 'context' ->> 'notebook') STORED,
    subject text GENERATED ALWAYS AS (CASE {_J} ->> 'kind'
        WHEN 'ai_ml_import' THEN coalesce({_J} -> 'data' ->> 'distribution',
                                          {_J} -> 'data' ->> 'name')
        WHEN 'egress_blocked' THEN {_J} -> 'data' ->> 'host'
        WHEN 'egress_allowed_ai' THEN {_J} -> 'data' ->> 'host'
        WHEN 'model_artifact_written' THEN {_J} -> 'data' ->> 'path'
        WHEN 'data_read' THEN {_J} -> 'data' ->> 'path'
        WHEN 'output_flagged' THEN {_J} -> 'data' ->> 'rule'
        WHEN 'review_signed' THEN {_J} -> 'data' ->> 'reviewer'
        WHEN 'kernel_started' THEN {_J} -> 'data' ->> 'kernel_name'
        END) STORED,
    detail text GENERATED ALWAYS AS (CASE {_J} ->> 'kind'
        WHEN 'ai_ml_import' THEN {_J} -> 'data' ->> 'version'
        WHEN 'egress_blocked' THEN {_J} -> 'data' ->> 'port'
        WHEN 'egress_allowed_ai' THEN {_J} -> 'data' ->> 'port'
        WHEN 'model_artifact_written' THEN {_J} -> 'data' ->> 'library'
        WHEN 'data_read' THEN {_J} -> 'data' ->> 'format'
        WHEN 'review_signed' THEN {_J} -> 'data' ->> 'notebook'
        END) STORED,
    extra text GENERATED ALWAYS AS (CASE {_J} ->> 'kind'
        WHEN 'ai_ml_import' THEN {_J} -> 'data' ->> 'category'
        WHEN 'egress_blocked' THEN {_J} -> 'data' ->> 'rule'
        WHEN 'egress_allowed_ai' THEN {_J} -> 'data' ->> 'rule'
        WHEN 'model_artifact_written' THEN {_J} -> 'data' ->> 'size'
        WHEN 'review_signed' THEN {_J} -> 'data' ->> 'scope'
        END) STORED
)"""

# Version 1 (kept as written, since ``db upgrade`` starts from it; version 2 replaces the
# queue below). Appends in two steps, so that many writers share each fsync (group commit)
# instead of queueing behind one lock across it:
# 1. the event is committed durably to ``ledger_pending`` (plain INSERT; concurrent commits
#    are flushed together by PostgreSQL);
# 2. ``chain(ids)`` takes the advisory lock, chains *every* pending event in id order after
#    the head and removes it from ``ledger_pending`` in the same transaction, then returns the
#    caller's records. That transaction commits asynchronously: were the server to crash
#    before its WAL is flushed, it is lost as a whole, and its events, still pending, are
#    chained again by the next append — never lost, never twice, the chain always a prefix.
# ``_drain`` is the shared chaining step; the caller holds the lock.
_DRAIN_SQL = f"""CREATE FUNCTION {SCHEMA}._drain() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    s bigint; p text; b text; h text; rec record; done bigint[] := '{{}}';
BEGIN
    SELECT r.seq, r.hash INTO s, p FROM {SCHEMA}.ledger_records r ORDER BY r.seq DESC LIMIT 1;
    IF NOT FOUND THEN s := 0; p := repeat('0', 64); END IF;
    FOR rec IN SELECT q.id, q.head, q.time FROM {SCHEMA}.ledger_pending q ORDER BY q.id LOOP
        s := s + 1;
        b := rec.head || ',"seq":' || s || ',"time":"' || rec.time || '"}}';
        h := encode(sha256(convert_to(p || E'\\n' || b, 'UTF8')), 'hex');
        INSERT INTO {SCHEMA}.ledger_records (seq, prev, hash, body, pending_id)
            VALUES (s, p, h, b, rec.id);
        p := h;
        done := done || rec.id;
    END LOOP;
    DELETE FROM {SCHEMA}.ledger_pending WHERE id = ANY(done);
END
$fn$"""

_CHAIN_SQL = f"""CREATE FUNCTION {SCHEMA}.chain(mine bigint[])
RETURNS TABLE (r_id bigint, r_seq bigint, r_prev text, r_hash text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF EXISTS (SELECT 1 FROM {SCHEMA}.ledger_pending q WHERE q.id = ANY(mine)) THEN
        PERFORM pg_advisory_xact_lock({LOCK_KEY});
        PERFORM set_config('synchronous_commit', 'off', true);
        PERFORM {SCHEMA}._drain();
    END IF;
    RETURN QUERY SELECT r.pending_id, r.seq, r.prev, r.hash FROM {SCHEMA}.ledger_records r
        WHERE r.pending_id = ANY(mine) ORDER BY r.seq;
END
$fn$"""

# Flushing a spool: chain what is pending, then the spooled events in their order, skipping
# any already stored (same time and content) so that re-flushing never duplicates; durable.
_APPEND_SQL = f"""CREATE FUNCTION {SCHEMA}.append(heads text[], times text[], known boolean)
RETURNS TABLE (r_seq bigint, r_prev text, r_hash text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    s bigint; s0 bigint; p text; b text; h text;
BEGIN
    PERFORM pg_advisory_xact_lock({LOCK_KEY});
    PERFORM {SCHEMA}._drain();
    SELECT r.seq, r.hash INTO s, p FROM {SCHEMA}.ledger_records r ORDER BY r.seq DESC LIMIT 1;
    IF NOT FOUND THEN s := 0; p := repeat('0', 64); END IF;
    s0 := s;
    FOR i IN 1 .. coalesce(array_length(heads, 1), 0) LOOP
        IF known AND EXISTS (SELECT 1 FROM {SCHEMA}.ledger_records r
                WHERE r.time = times[i] AND r.seq <= s0
                  AND starts_with(r.body, heads[i] || ',"seq":')) THEN
            CONTINUE;
        END IF;
        s := s + 1;
        b := heads[i] || ',"seq":' || s || ',"time":"' || times[i] || '"}}';
        h := encode(sha256(convert_to(p || E'\\n' || b, 'UTF8')), 'hex');
        INSERT INTO {SCHEMA}.ledger_records (seq, prev, hash, body) VALUES (s, p, h, b);
        r_seq := s; r_prev := p; r_hash := h;
        RETURN NEXT;
        p := h;
    END LOOP;
END
$fn$"""

_REFUSE_SQL = f"""CREATE FUNCTION {SCHEMA}.refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION 'the jupyter-dua-guard usage ledger is append-only: % on % refused',
        TG_OP, TG_TABLE_NAME USING ERRCODE = 'insufficient_privilege';
END
$fn$"""

_TRIGGERS = ("ledger_records_append_only", "ledger_records_no_truncate")

# Version 1 of the schema; later versions append their steps to MIGRATIONS.
_BASE_SCHEMA = [
    f"CREATE TABLE {SCHEMA}.ledger_meta (key text PRIMARY KEY, value text NOT NULL)",
    _RECORDS_SQL,
    f"CREATE TABLE {SCHEMA}.ledger_pending (id bigserial PRIMARY KEY, head text NOT NULL, "
    "time text NOT NULL)",
    f"CREATE INDEX ledger_records_time ON {SCHEMA}.ledger_records (time)",
    f"CREATE INDEX ledger_records_kind ON {SCHEMA}.ledger_records (kind, time)",
    _REFUSE_SQL,
    f"CREATE TRIGGER {_TRIGGERS[0]} BEFORE UPDATE OR DELETE ON {SCHEMA}.ledger_records "
    f"FOR EACH ROW EXECUTE FUNCTION {SCHEMA}.refuse_change()",
    f"CREATE TRIGGER {_TRIGGERS[1]} BEFORE TRUNCATE ON {SCHEMA}.ledger_records "
    f"FOR EACH STATEMENT EXECUTE FUNCTION {SCHEMA}.refuse_change()",
    _DRAIN_SQL,
    _CHAIN_SQL,
    _APPEND_SQL,
]

# Version 2: the record columns that reports group and filter by. Version 1 derived ten
# text columns, three of them through CASE expressions over the event kind; PostgreSQL
# plans every generated expression again for each INSERT, which made one record cost about
# 0.4 ms inside the chain lock. Version 2 keeps the seven simple ones and stores the event's
# ``data`` object instead of subject/detail/extra, which reports read out of it. All stay
# GENERATED from the body, so none can change without changing the hashed body.
_RECORDS_V2_SQL = f"""ALTER TABLE {SCHEMA}.ledger_records
    DROP COLUMN pending_id, DROP COLUMN subject, DROP COLUMN detail, DROP COLUMN extra,
    ADD COLUMN data jsonb GENERATED ALWAYS AS ({_J} -> 'data') STORED"""

# What reports group by, read out of the event's ``data`` object (``_aggregate_sql``).
_SUBJECT = """CASE kind
    WHEN 'ai_ml_import' THEN coalesce(data ->> 'distribution', data ->> 'name')
    WHEN 'egress_blocked' THEN data ->> 'host'
    WHEN 'egress_allowed_ai' THEN data ->> 'host'
    WHEN 'model_artifact_written' THEN data ->> 'path'
    WHEN 'data_read' THEN data ->> 'path'
    WHEN 'output_flagged' THEN data ->> 'rule'
    WHEN 'review_signed' THEN data ->> 'reviewer'
    WHEN 'kernel_started' THEN data ->> 'kernel_name' END"""
_DETAIL = """CASE kind
    WHEN 'ai_ml_import' THEN data ->> 'version'
    WHEN 'egress_blocked' THEN data ->> 'port'
    WHEN 'egress_allowed_ai' THEN data ->> 'port'
    WHEN 'model_artifact_written' THEN data ->> 'library'
    WHEN 'data_read' THEN data ->> 'format'
    WHEN 'review_signed' THEN data ->> 'notebook' END"""
_EXTRA = """CASE kind
    WHEN 'ai_ml_import' THEN data ->> 'category'
    WHEN 'egress_blocked' THEN data ->> 'rule'
    WHEN 'egress_allowed_ai' THEN data ->> 'rule'
    WHEN 'model_artifact_written' THEN data ->> 'size'
    WHEN 'review_signed' THEN data ->> 'scope' END"""

# Version 2 appends in one round trip and two transactions, so that the chain lock is never
# held while the disk flushes (version 1 went through a queue table, ``ledger_pending``, and
# a second chaining call — twice the work per event). ``submit``, a procedure so that it may
# commit half-way:
# 1. takes the advisory lock, chains the events after the head and commits *without*
#    waiting for the disk — which releases the lock at once;
# 2. writes one WAL record (a logical-decoding message) in a new transaction and commits it
#    synchronously. That flush covers the first commit, which lies before it in the WAL, and
#    concurrent writers share it (group commit).
# When ``submit`` returns, the events are on disk (or wherever ``synchronous_commit`` says).
# A crash in between loses the first transaction only together with everything after it in
# the WAL, so the chain stays gap-free; the writer, which got an error, spools the events
# and a later flush stores them once (it skips events already stored).
_SUBMIT_SQL = f"""CREATE PROCEDURE {SCHEMA}.submit(heads text[], times text[],
    INOUT seqs bigint[] DEFAULT NULL, INOUT prevs text[] DEFAULT NULL,
    INOUT hashes text[] DEFAULT NULL)
LANGUAGE plpgsql AS $fn$
DECLARE
    s bigint; p text; b text; bodies text[] := '{{}}';
BEGIN
    seqs := '{{}}'; prevs := '{{}}'; hashes := '{{}}';
    PERFORM pg_catalog.pg_advisory_xact_lock({LOCK_KEY});
    PERFORM pg_catalog.set_config('synchronous_commit', 'off', true);
    SELECT r.seq, r.hash INTO s, p FROM {SCHEMA}.ledger_records AS r ORDER BY r.seq DESC LIMIT 1;
    IF NOT FOUND THEN s := 0; p := pg_catalog.repeat('0', 64); END IF;
    FOR i IN 1 .. coalesce(pg_catalog.cardinality(heads), 0) LOOP
        s := s + 1;
        b := heads[i] || ',"seq":' || s || ',"time":"' || times[i] || '"}}';
        seqs[i] := s;
        prevs[i] := p;
        bodies[i] := b;
        p := pg_catalog.encode(pg_catalog.sha256(
            pg_catalog.convert_to(p || E'\\n' || b, 'UTF8')), 'hex');
        hashes[i] := p;
    END LOOP;
    INSERT INTO {SCHEMA}.ledger_records (seq, prev, hash, body)
        SELECT * FROM unnest(seqs, prevs, hashes, bodies);
    COMMIT;
    PERFORM pg_catalog.pg_logical_emit_message(true, 'jupyter-dua-guard', 'flush');
    COMMIT;
END
$fn$"""

# Flushing a spool, as in version 1 but without the queue.
_APPEND_V2_SQL = _APPEND_SQL.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1).replace(
    f"    PERFORM {SCHEMA}._drain();\n", ""
)

# Who may call ``submit``: every role that may call ``append`` (the writer and the owner).
_GRANT_SUBMIT_SQL = f"""DO $do$
DECLARE r text;
BEGIN
    FOR r IN SELECT DISTINCT a.grantee::regrole::text FROM pg_proc p, aclexplode(p.proacl) a
            WHERE p.oid = '{SCHEMA}.append(text[], text[], boolean)'::regprocedure
              AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 LOOP
        EXECUTE format('GRANT EXECUTE ON PROCEDURE {SCHEMA}.submit(text[], text[], bigint[], '
                       'text[], text[]) TO %s', r);
    END LOOP;
END
$do$"""

# Version 3 drops the stored ``data`` object again: an INSERT built it as a second jsonb
# value per record, which halved the records a batched ``submit`` could chain per second
# (pgbench, 8 events per call). Reports read the figures from the hashed bodies instead
# (``survey``); the SQL fallback parses ``data`` out of the body where it needs it.
_DROP_DATA_SQL = f"ALTER TABLE {SCHEMA}.ledger_records DROP COLUMN data"

# Version 4 keeps what filters and indexes read in one generated column, ``fields``: the
# body without its ``data`` object, parsed once per record. Seven generated text columns
# parsed the body seven times; each parse cost about as much as the rest of an insert
# (pgbench, 4 events per call: 7,000-10,300 events/s before, 10,000-12,600 after). It stays
# GENERATED by a built-in expression, so no role can make it disagree with the hashed body
# without altering the table, which ``verify`` notices. Queries read the old column names
# from ``_ROWS``, whose expressions the two indexes match.
_FIELDS_EXPR = "(body::jsonb) - 'data'"
_FIELD = {
    "time": "fields ->> 'time'",
    "kind": "fields ->> 'kind'",
    "username": "fields -> 'context' ->> 'user'",
    "host": "fields -> 'context' ->> 'host'",
    "platform": "fields -> 'context' ->> 'platform'",
    "kernel": "fields -> 'context' ->> 'kernel_id'",
    "notebook": "fields -> 'context' ->> 'notebook'",
}
_ROWS = (
    "(SELECT seq, prev, hash, body, "
    + ", ".join(f"({expr}) AS {name}" for name, expr in _FIELD.items())
    + f" FROM {SCHEMA}.ledger_records) AS rec"
)
_FIELDS_SQL = [
    f"ALTER TABLE {SCHEMA}.ledger_records "
    + ", ".join(f"DROP COLUMN {name}" for name in _FIELD)
    + f", ADD COLUMN fields jsonb GENERATED ALWAYS AS ({_FIELDS_EXPR}) STORED",
    f"CREATE INDEX ledger_records_time ON {SCHEMA}.ledger_records (({_FIELD['time']}))",
    f"CREATE INDEX ledger_records_kind ON {SCHEMA}.ledger_records "
    f"(({_FIELD['kind']}), ({_FIELD['time']}))",
    _APPEND_V2_SQL.replace("WHERE r.time = ", f"WHERE (r.{_FIELD['time']}) = ", 1),
]

# schema version -> statements that bring version - 1 up to it (run as the owner role).
MIGRATIONS: dict[int, list[str]] = {
    2: [
        f"SELECT {SCHEMA}._drain()",  # chain what version 1 left queued (the lock is held)
        f"DROP FUNCTION {SCHEMA}.chain(bigint[])",
        f"DROP FUNCTION {SCHEMA}._drain()",
        f"DROP TABLE {SCHEMA}.ledger_pending",
        _RECORDS_V2_SQL,
        _APPEND_V2_SQL,
        _SUBMIT_SQL,
        f"REVOKE ALL ON PROCEDURE {SCHEMA}.submit(text[], text[], bigint[], text[], text[]) "
        "FROM PUBLIC",
        _GRANT_SUBMIT_SQL,
    ],
    3: [_DROP_DATA_SQL],
    4: _FIELDS_SQL,
}


def _require_psycopg() -> None:
    if psycopg is None:
        raise LedgerError(
            "PostgreSQL ledgers need psycopg 3: pip install 'jupyter_dua_guard[postgresql]'"
        )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else type(exc).__name__
    for line in text[1:]:
        if line.startswith(("FATAL", "ERROR", "DETAIL")):
            msg += "; " + line.strip()
            break
    return redact_url(re.sub(r"password=\S+", "password=***", msg))


def split_url(url: str) -> tuple[str, dict[str, str]]:
    """The libpq connection string (with bounded timeouts added) and our own options."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    own = {k: v for k, v in query if k in _OWN_OPTIONS}
    libpq = [(k, v) for k, v in query if k not in _OWN_OPTIONS]
    present = {k for k, _ in libpq}
    libpq += [(k, v) for k, v in _LIBPQ_DEFAULTS.items() if k not in present]
    # Built by hand: urlunsplit drops the "//" of an empty host (postgresql:///?service=x).
    return f"postgresql://{parts.netloc}{parts.path}?{urlencode(libpq, quote_via=quote)}", own


def spool_key(url: str) -> str:
    """A short name for the database a URL points at (host, port, database, user, service)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0] if len(netloc) == 2 else ""
    service = dict(parse_qsl(parts.query)).get("service", "")
    ident = f"{user}@{netloc[-1]}{parts.path}?service={service}"
    return "db-" + hashlib.sha256(ident.encode()).hexdigest()[:16]


def default_spool_dir() -> Path:
    """``<jupyter data dir>/dua_guard/spool``: local, per user, next to the default ledger."""
    return Path(default_ledger_url()[len("sqlite:///") :]).parent / "spool"


class _Unavailable(Exception):
    """The database cannot take the event now (network, server down, timeouts)."""


class _WrongSchema(_Unavailable):
    """The database answers but holds no ledger of this version (message says what to run)."""


class _RelayLost(_Unavailable):
    """The relay took the events but gave no answer: spool them, and try the database at once
    (a flush stores them once whether or not the relay managed to)."""


def _glob_regex(pattern: str) -> str:
    """A shell glob (``*``, ``?``, ``[...]``) as an anchored POSIX regular expression."""
    out, i = ["^"], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        elif ch == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            out.append(pattern[i : end + 1])
            i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out) + "$"


class PostgresLedger(Ledger):
    """The central ledger in PostgreSQL, with a local spool while the database is away."""

    def __init__(
        self, url: str, *, timeout: float = 30.0, create: bool = True, relay: bool = True
    ) -> None:
        _require_psycopg()
        self.url = redact_url(url)
        self._conninfo, own = split_url(url)
        self.create = create
        try:
            self.retry = float(own.get("retry", 30))
            self.statement_timeout = float(own.get("statement_timeout", min(timeout, 15.0)))
        except ValueError:
            raise LedgerError(
                f"ledger URL {self.url}: retry and statement_timeout must be seconds"
            ) from None
        self.read_timeout = timeout
        # A relay (``ledger_relay``) batches this server's kernels' appends; its own
        # connections (relay=False) go straight to the database.
        self.relay_path = (own.get("relay") or None) if relay else None
        self._relay: Any = None
        self._relay_retry_at = 0.0
        base = Path(own.get("spool") or default_spool_dir()).expanduser().absolute()
        # One sub-directory per database, so that a spool is only ever flushed where it belongs.
        self.spool_dir = base / spool_key(url)
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._conn_obj: Any = None
        self._closed = False
        self._retry_at = 0.0
        self._spool: SQLiteLedger | None = None
        self._spool_owner: int | None = None
        self.last_error: str | None = None
        if self.relay_path and not (create and spool_files(self.spool_dir)):
            # A kernel behind its server's relay connects only when the relay is away, so
            # that a hub holds a few connections per server rather than one per kernel.
            return
        try:
            self._connection()
        except _WrongSchema as exc:
            raise LedgerError(str(exc)) from None
        except _Unavailable as exc:
            if not create:
                raise LedgerError(self._unreachable(str(exc))) from None
            self._note_down(str(exc))
            return
        if create:
            with contextlib.suppress(_Unavailable, LedgerError, OSError):
                self._flush_orphans()

    # -- messages
    def _unreachable(self, why: str) -> str:
        return (
            f"cannot reach the PostgreSQL ledger {self.url} ({why}): start the database or fix "
            "the URL / libpq service file; kernels spool events in "
            f"{self.spool_dir} meanwhile"
        )

    def _note_down(self, why: str, *, retry_now: bool = False) -> None:
        self.last_error = why
        self._retry_at = time.monotonic() + (0.0 if retry_now else self.retry)
        self._drop_connection()

    # -- connection
    def _connection(self) -> Any:
        if self._closed:
            raise LedgerError(f"ledger {self.url} is closed: open it again with open_ledger()")
        if os.getpid() != self._pid:
            # Forked child: the parent's socket must not be used (or closed) from here.
            if self._conn_obj is not None:
                _INHERITED.append(self._conn_obj)
            if self._relay is not None:
                _INHERITED.append(self._relay)
            self._conn_obj = None
            self._relay = None
            self._spool = None
            self._spool_owner = None
            self._pid = os.getpid()
        if self._conn_obj is not None and not self._conn_obj.closed:
            return self._conn_obj
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True)
            conn.execute(_session_setup(self.statement_timeout))
        except psycopg.Error as exc:
            raise _Unavailable(_one_line(exc)) from None
        # Checked on every (re)connection: a database upgraded or replaced meanwhile must
        # not be written to.
        try:
            self._check_schema(conn)
        except LedgerError as exc:
            conn.close()
            raise _WrongSchema(str(exc)) from None
        self._conn_obj = conn
        return conn

    def _connected(self) -> Any:
        """The connection, or a one-line error saying what to fix (readers, ``flush``)."""
        try:
            return self._connection()
        except _WrongSchema as exc:
            raise LedgerError(str(exc)) from None
        except _Unavailable as exc:
            raise LedgerError(self._unreachable(str(exc))) from None

    def _drop_connection(self) -> None:
        conn, self._conn_obj = self._conn_obj, None
        if conn is not None and os.getpid() == self._pid:
            with contextlib.suppress(Exception):
                conn.close()

    def _check_schema(self, conn: Any) -> None:
        try:
            row = conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL", (f"{SCHEMA}.ledger_meta",)
            ).fetchone()
            if not row[0]:
                raise _no_schema_error(self.url)
            meta = dict(conn.execute(_META_SQL).fetchall())
        except psycopg.Error as exc:
            raise _unreadable_schema_error(self.url, _one_line(exc)) from None
        _check_meta(meta, self.url)

    def close(self) -> None:
        with self._lock:
            self._drop_connection()
            if self._relay is not None and os.getpid() == self._pid:
                self._relay.close()
            self._relay = None
            self._close_spool()
            self._closed = True

    # -- writing
    def _store(self, prepared: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with self._lock:
            if self._closed:
                raise LedgerError(f"ledger {self.url} is closed: open it again with open_ledger()")
            if os.getpid() != self._pid:
                self._connection_after_fork()
            if self._spool is not None:
                if time.monotonic() >= self._retry_at:
                    try:
                        self._flush_own()
                    except (_Unavailable, LedgerError) as exc:
                        self._note_down(str(exc))  # keep spooling; the events stay in order
                if self._spool is not None:
                    return self._to_spool(prepared)
            if self._conn_obj is None and time.monotonic() < self._retry_at:
                return self._to_spool(prepared)
            try:
                return self._to_database(prepared)
            except _Unavailable as exc:
                self._note_down(str(exc), retry_now=isinstance(exc, _RelayLost))
                return self._to_spool(prepared)

    def _connection_after_fork(self) -> None:
        with contextlib.suppress(_Unavailable):
            self._connection()
        if os.getpid() != self._pid:  # connection failed before the reset: reset anyway
            self._pid = os.getpid()
            self._conn_obj = None
            self._relay = None
            self._spool = None
            self._spool_owner = None

    def _call_append(
        self, heads: list[str], times: list[str], known: bool
    ) -> list[tuple[int, str, str]]:
        conn = self._connection()
        try:
            rows = conn.execute(
                f"SELECT r_seq, r_prev, r_hash FROM {SCHEMA}.append(%s, %s, %s)",
                (heads, times, known),
            ).fetchall()
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise _Unavailable(_one_line(exc)) from None
        except psycopg.Error as exc:
            self._drop_connection()
            # Schema or permission problems: keep the event (spool) and say what to fix.
            raise _Unavailable(
                f"{_one_line(exc)} — check `jupyter dua-guard db init` and the role's grants"
            ) from None
        return rows

    def _submit(self, heads: list[str], times: list[str]) -> list[tuple[int, str, str]]:
        """``(seq, prev, hash)`` of each event, chained and durable, in one round trip."""
        conn = self._connection()
        # libpq directly: psycopg's adapters cost more than the rest of an append. If anything
        # fails after ``submit``'s first commit may have happened, the caller spools the
        # events all the same: a flush skips events already in the database.
        pgconn = conn.pgconn
        result = pgconn.exec_params(
            _SUBMIT_CALL_PQ,
            [_text_array_bytes([h.encode() for h in heads]),
             _text_array_bytes([t.encode() for t in times])],
        )  # fmt: skip
        rows, error, _ = _parse_submit_result([result])
        if rows is None:
            self._drop_connection()
            raise _Unavailable(error)
        self.last_error = None
        if len(rows) != len(heads):
            raise LedgerError(
                f"ledger {self.url} did not chain {len(heads)} event(s): its submit procedure "
                "was altered; run `jupyter dua-guard verify` and `db upgrade`"
            )
        return rows

    def _via_relay(self, prepared: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """Hand the events to this server's relay: their records, or None when there is none
        to use now."""
        relay_mod = _relay_module or _import_relay()
        if self._relay is None:
            if time.monotonic() < self._relay_retry_at:
                return None
            self._relay = relay_mod.RelayClient(self.relay_path, self.statement_timeout + 5)
        fast = relay_mod._relay_store is not None
        try:
            if fast:
                out = self._relay.store(prepared)
            else:
                rows = self._relay.submit(*_columns(prepared))
        except relay_mod.RelayUnknown as exc:
            if not self._relay.connected:  # the relay itself failed: go direct for a while
                self._relay = None
                self._relay_retry_at = time.monotonic() + self.retry
            raise _RelayLost(str(exc)) from None
        except relay_mod.RelayError:
            self._relay = None
            self._relay_retry_at = time.monotonic() + self.retry
            return None
        if not fast:
            return self._checked(prepared, rows)
        if type(out) is int:
            raise self._hashed_differently(out)
        return out

    def _to_database(self, prepared: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.relay_path and (records := self._via_relay(prepared)) is not None:
            return records
        heads, times = _columns(prepared)
        return self._checked(prepared, self._submit(heads, times))

    def _checked(
        self, prepared: list[dict[str, Any]], rows: list[tuple[int, str, str]]
    ) -> list[dict[str, Any]]:
        """The records, once every hash the database gave is the one this client computes."""
        records = []
        for event, (seq, prev, digest) in zip(prepared, rows, strict=True):
            body = f'{event["head"]},"seq":{seq},"time":"{event["time"]}"}}'
            if record_hash(prev, body) != digest:
                raise self._hashed_differently(seq)
            records.append((seq, prev, digest, body))
        return self._stored(records, prepared)

    def _hashed_differently(self, seq: int) -> LedgerError:
        return LedgerError(
            f"ledger {self.url} hashed record {seq} differently from this client: the "
            "database is not UTF-8 or its chain function was altered; run "
            "`jupyter dua-guard verify`"
        )

    # -- spool
    def _spool_path(self) -> Path:
        host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40]
        return self.spool_dir / f"spool-{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}.sqlite"

    def _open_spool(self) -> SQLiteLedger:
        if self._spool is not None:
            return self._spool
        path = self._spool_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            owner = os.open(f"{path}.owner", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise LedgerError(
                f"the PostgreSQL ledger {self.url} is unreachable ({self.last_error}) and the "
                f"spool directory {path.parent} is not writable ({exc.strerror}): fix one of "
                "them, or add ?spool=/writable/dir to the ledger URL"
            ) from None
        if fcntl is not None:
            fcntl.flock(owner, fcntl.LOCK_EX)
        self._spool_owner = owner
        self._spool = SQLiteLedger(path, timeout=self.read_timeout)
        return self._spool

    def _to_spool(self, prepared: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Keep the events locally, chained in the spool's own SQLite ledger."""
        spool = self._open_spool()
        return spool._store(prepared)

    def _close_spool(self, remove: bool = False) -> None:
        spool, owner = self._spool, self._spool_owner
        self._spool, self._spool_owner = None, None
        if spool is None:
            return
        spool.close()
        if remove:
            _remove_spool(spool.path)
        if owner is not None:
            os.close(owner)

    def _flush_own(self) -> None:
        spool = self._spool
        if spool is None:
            return
        self._flush_file(spool)
        self._close_spool(remove=True)
        with contextlib.suppress(_Unavailable, LedgerError, OSError):
            self._flush_orphans()

    def _flush_file(self, spool: SQLiteLedger) -> int:
        """Copy a spool's events to the database in their order; idempotent."""
        check = spool.verify()
        if not check.ok:
            raise LedgerError(
                f"spool {spool.path} is damaged ({check.problem}): it was kept; inspect it with "
                f"`jupyter dua-guard verify --ledger sqlite:///{spool.path}`"
            )
        batch: list[dict[str, Any]] = []
        stored = 0
        for rec in spool.records():
            head = canonical_json(
                {"context": rec["context"], "data": rec["data"], "kind": rec["kind"]}
            )[:-1]
            batch.append({"head": head, "time": rec["time"]})
            if len(batch) == 500:
                stored += len(self._call_append(*_columns(batch), True))
                batch = []
        if batch:
            stored += len(self._call_append(*_columns(batch), True))
        return stored

    def _flush_orphans(self) -> int:
        """Flush spools left by processes that ended while the database was away."""
        if fcntl is None or not self.spool_dir.is_dir():
            return 0
        own = self._spool.path if self._spool is not None else None
        total = 0
        for path in sorted(self.spool_dir.glob("spool-*.sqlite")):
            if path == own:
                continue
            try:
                owner = os.open(f"{path}.owner", os.O_RDWR | os.O_CREAT, 0o600)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # its process is alive and will flush it itself
                if not path.exists():
                    continue
                spool = SQLiteLedger(path, timeout=self.read_timeout, create=False)
                try:
                    total += self._flush_file(spool)
                finally:
                    spool.close()
                _remove_spool(path)
            finally:
                os.close(owner)
        return total

    def flush(self) -> int:
        """Flush every spool in the spool directory now; returns the events written."""
        with self._lock:
            self._connected()
            n = 0
            if self._spool is not None:
                n = self._flush_file(self._spool)
                self._close_spool(remove=True)
            return n + self._flush_orphans()

    def spooled(self) -> int:
        """Events of this process waiting in its spool."""
        with self._lock:
            return self._spool.count() if self._spool is not None else 0

    # -- reading
    def _read(self, fn: Any) -> Any:
        """Run ``fn(conn)`` in a read-only snapshot; one-line errors."""
        with self._lock:
            conn = self._connected()
            try:
                with conn.transaction():
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    conn.execute(
                        "SELECT set_config('statement_timeout', %s, true)",
                        (f"{int(max(self.read_timeout, 60) * 1000)}",),
                    )
                    return fn(conn)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                self._drop_connection()
                raise LedgerError(self._unreachable(_one_line(exc))) from None
            except psycopg.Error as exc:
                raise self._read_error(exc) from None

    def _read_error(self, exc: BaseException) -> LedgerError:
        return LedgerError(
            f"cannot read the PostgreSQL ledger {self.url} ({_one_line(exc)}): connect as the "
            "ledger's writer or owner role"
        )

    def _where(
        self,
        since: Any,
        until: Any,
        kinds: Iterable[str] | None,
        notebook: str | None,
        user: str | None = None,
        host: str | None = None,
    ) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        start, end, inclusive = _time_bounds(since, until)
        if start:
            clauses.append("time >= %s")
            params.append(start)
        if end is not None:
            clauses.append("time <= %s" if inclusive else "time < %s")
            params.append(end)
        kind_list = self._check_kinds(kinds)
        if kind_list:
            clauses.append("kind = ANY(%s)")
            params.append(kind_list)
        for column, value in (("notebook", notebook), ("username", user), ("host", host)):
            if value:
                if any(ch in value for ch in "*?["):
                    clauses.append(f"{column} ~ %s")
                    params.append(_glob_regex(value))
                else:
                    clauses.append(f"{column} = %s")
                    params.append(value)
        return ("WHERE " + " AND ".join(clauses)) if clauses else "", params

    def records(
        self,
        since: Any = None,
        until: Any = None,
        kinds: Iterable[str] | None = None,
        notebook: str | None = None,
        *,
        offset: int = 0,
        limit: int | None = None,
        descending: bool = False,
        user: str | None = None,
        host: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        where, params = self._where(since, until, kinds, notebook, user, host)
        order = "DESC" if descending else "ASC"
        page = 2000
        remaining = limit
        last: int | None = None
        while remaining is None or remaining > 0:
            size = page if remaining is None else min(page, remaining)
            clause, args = where, list(params)
            if last is not None:
                cmp = "<" if descending else ">"
                clause = (clause + " AND " if clause else "WHERE ") + f"seq {cmp} %s"
                args.append(last)
            query = (
                f"SELECT seq, prev, hash, body FROM {_ROWS} {clause} "
                f"ORDER BY seq {order} LIMIT %s OFFSET %s"
            )
            args += [size, offset if last is None else 0]
            rows = self._read(lambda c, q=query, a=args: c.execute(q, a).fetchall())
            for row in rows:
                yield SQLiteLedger._to_record(*row)
            if len(rows) < size:
                return
            last = rows[-1][0]
            if remaining is not None:
                remaining -= len(rows)

    def count(
        self,
        since: Any = None,
        until: Any = None,
        kinds: Iterable[str] | None = None,
        notebook: str | None = None,
        *,
        user: str | None = None,
        host: str | None = None,
    ) -> int:
        where, params = self._where(since, until, kinds, notebook, user, host)
        query = f"SELECT count(*) FROM {_ROWS} {where}"
        return int(self._read(lambda c: c.execute(query, params).fetchone()[0]))

    def head(self) -> tuple[int, str]:
        row = self._read(
            lambda c: c.execute(
                f"SELECT seq, hash FROM {SCHEMA}.ledger_records ORDER BY seq DESC LIMIT 1"
            ).fetchone()
        )
        return (int(row[0]), str(row[1])) if row else (0, GENESIS)

    def aggregate(
        self,
        since: Any = None,
        until: Any = None,
        *,
        user: str | None = None,
        host: str | None = None,
    ) -> dict[str, Any]:
        where, params = self._where(since, until, None, None, user, host)
        queries = _aggregate_sql(where)
        top = self._read(
            lambda c: c.execute(f"SELECT max(seq) FROM {SCHEMA}.ledger_records").fetchone()[0]
        )
        if top is not None and top >= 100_000:  # worth two more connections
            groups, distinct = self._aggregate_parallel(queries, params)
        else:

            def run(conn: Any) -> tuple[list, list]:
                _tune(conn)
                return tuple(conn.execute(q, params).fetchall() for q in queries)  # type: ignore[return-value]

            groups, distinct = self._read(run)
        n = len(_AGG_COLUMNS)
        per_key: dict[tuple, dict[str, Any]] = {}
        kernels = started = 0
        for g, kind, subject, detail, extra, count_k, count_nb, count_k3, count_st in distinct:
            if g == _G_TOTAL:
                kernels, started = count_k3, count_st
                continue
            item = per_key.setdefault(
                (kind, subject, detail, extra),
                {"kind": kind, "subject": subject, "detail": detail, "extra": extra,
                 "kernels": 0, "notebooks": 0},
            )  # fmt: skip
            if g == _G_KERNELS:
                item["kernels"] = count_k
            else:
                item["notebooks"] = count_nb
        return {
            "groups": [
                {**dict(zip(_AGG_COLUMNS, r[:n], strict=True)),
                 "first": r[n + 1], "last": r[n + 2], "count": r[n + 3]}
                for r in groups if r[-1] == 1
            ],
            "distinct": list(per_key.values()),
            "kernels": kernels,
            "kernels_started": started,
            "notebooks": sorted(r[n] for r in groups if r[-1] == 0 and r[n]),
        }  # fmt: skip

    def _aggregate_parallel(self, queries: tuple[str, str], params: list[Any]) -> tuple:
        """The two aggregation queries side by side on two connections, one snapshot."""
        conns: list[Any] = []
        try:
            conns += [self._reader(), self._reader()]
            first, second = conns
            first.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            snapshot = first.execute("SELECT pg_export_snapshot()").fetchone()[0]
            second.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            second.execute(_sql.SQL("SET TRANSACTION SNAPSHOT {}").format(_sql.Literal(snapshot)))

            def run(conn: Any, query: str) -> list:
                _tune(conn)
                return conn.execute(query, params).fetchall()

            with ThreadPoolExecutor(max_workers=len(conns)) as pool:
                results = list(pool.map(run, conns, queries))
            return tuple(results)
        except psycopg.Error as exc:
            raise self._read_error(exc) from None
        finally:
            for conn in conns:
                conn.close()

    def _reader(self) -> Any:
        """A separate connection for one part of a report, so that parts run in parallel."""
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise LedgerError(self._unreachable(_one_line(exc))) from None
        conn.execute(
            "SELECT set_config('statement_timeout', %s, false)",
            (f"{int(max(self.read_timeout, 60) * 1000)}",),
        )
        return conn

    # -- verification
    def verify(self, head: str | None = None, *, workers: int = 1) -> VerifyResult:
        """Check every link in the database (hashing there), in ``workers`` ranges at once."""
        pin = _parse_pin(head) if head else None

        def summary(conn: Any) -> tuple[int, tuple[int, str], list[str], list[str]]:
            total = conn.execute(f"SELECT count(*) FROM {SCHEMA}.ledger_records").fetchone()[0]
            top, missing = _head_and_guards(conn)
            return int(total), top, missing, _altered_columns(conn)

        total, top, missing, altered = self._read(summary)
        ranges = max(1, min(int(workers), 8)) if top[0] >= 100_000 else 1
        bounds = [top[0] * i // ranges for i in range(ranges + 1)]
        if ranges == 1:
            bad = [self._read(lambda c: _first_bad(c, 0, top[0]))]
        else:
            with ThreadPoolExecutor(max_workers=ranges) as pool:
                bad = list(pool.map(self._check_range, bounds[:-1], bounds[1:]))
        first = min((b for b in bad if b is not None), default=None)
        if first is None and total != top[0]:
            first = top[0]
        if first is not None:
            seq, problem = self._read(lambda c: _diagnose(c, first))
            return VerifyResult(False, total, *top, url=self.url, bad_seq=seq, problem=problem)
        pinned = self._read(lambda c: _check_pin(c, pin, top)) if pin is not None else None
        return self._verdict(total, top, pinned, altered, missing, head)

    def _verdict(
        self,
        total: int,
        top: tuple[int, str],
        pinned: tuple[int | None, str] | None,
        altered: list[str],
        missing: list[str],
        head: str | None,
    ) -> VerifyResult:
        """The result for an intact chain: the pin, then the report columns and triggers."""
        if pinned:
            return VerifyResult(
                False, total, *top, url=self.url, bad_seq=pinned[0], problem=pinned[1]
            )
        if altered:
            return VerifyResult(
                False, total, *top, url=self.url,
                problem=f"the chain is intact but column(s) {', '.join(altered)} of "
                "dua_guard.ledger_records are no longer generated from the hashed record as "
                "`db init` made them: someone with the owner role altered the table, so reports "
                "may not show what the records say; investigate and restore the table from a "
                "backup",
            )  # fmt: skip
        if missing:
            return VerifyResult(
                False, total, *top, url=self.url,
                problem=f"the chain is intact but the append-only trigger(s) {', '.join(missing)} "
                "were disabled or dropped: someone with the owner role switched the database's "
                "protection off; investigate, then ALTER TABLE dua_guard.ledger_records ENABLE "
                "TRIGGER ALL",
            )  # fmt: skip
        return VerifyResult(True, total, *top, url=self.url, pinned=head)

    # -- reports
    # Records per streamed range at least: smaller ledgers are read on one connection.
    _SURVEY_SPLIT = 50_000
    # The server version from which ranges are heap blocks (TID range scans).
    _BLOCK_RANGES_FROM = 140000

    def survey(
        self,
        since: Any = None,
        until: Any = None,
        head: str | None = None,
        *,
        workers: int = 1,
        user: str | None = None,
        host: str | None = None,
    ) -> tuple[VerifyResult, dict[str, Any]]:
        """Verify every record and tally the report's figures in one pass over the ledger.

        Hashing and grouping inside PostgreSQL cost several CPU-seconds per million
        records; streaming them out costs the server little. With the C module each of
        ``workers`` seq ranges is streamed (COPY, binary) on its own connection, all in one
        snapshot, and checked and tallied in C; records whose JSON it cannot read as
        PostgreSQL would are read with the SQL expressions instead. Any failure of the chain
        is named by ``verify``, so the messages are the same. Glob ``user`` / ``host``
        filters are matched by the database against the names in the ledger first. Without
        the module, or where text does not sort bytewise or a report column was altered, the
        figures come from ``aggregate``.
        """
        if _pgsurvey_fast is None:
            return super().survey(since, until, head, workers=workers, user=user, host=host)
        pin = _parse_pin(head) if head else None
        where, params = self._where(since, until, None, None, user, host)
        start, end, inclusive = _time_bounds(since, until)
        timeout = int(max(self.read_timeout, 60) * 1000)
        conn = self._reader()
        try:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
                top, missing, altered, bytewise = _survey_summary(conn)
                tallying = bytewise and not altered
                who = (_covered(conn, "username", user), _covered(conn, "host", host))
                ranges = max(1, min(int(workers), 8, top[0] // self._SURVEY_SPLIT or 1))
                # Ranges of heap blocks where the server can scan them (TID range scans,
                # PostgreSQL 14): cheaper than walking the primary key; links are checked in
                # any order. Otherwise ranges of seq, read in order.
                by_block = conn.info.server_version >= self._BLOCK_RANGES_FROM
                size = top[0]
                if by_block:
                    size = conn.execute(
                        "SELECT pg_relation_size(%s) / current_setting('block_size')::bigint",
                        (f"{SCHEMA}.ledger_records",),
                    ).fetchone()[0]
                bounds = [size * i // ranges for i in range(ranges + 1)]
                with ThreadPoolExecutor(max_workers=1) as pool:
                    # Figures the C tally cannot give exactly come from the database meanwhile.
                    by_sql = (
                        None
                        if tallying
                        else pool.submit(self.aggregate, since, until, user=user, host=host)
                    )
                    intact, total, odd, tally = self._stream(
                        snapshot,
                        (bounds, by_block, top[0]),
                        timeout,
                        (start, end, inclusive, *who),
                        tallying,
                    )
                    usage = (
                        by_sql.result()
                        if by_sql
                        else self._figures(conn, tally, odd, where, params)
                    )
                pinned = _check_pin(conn, pin, top) if pin is not None and intact else None
        except psycopg.Error as exc:
            raise self._read_error(exc) from None
        finally:
            conn.close()
        if not intact or total != top[0]:
            return self.verify(head, workers=workers), usage
        return self._verdict(total, top, pinned, altered, missing, head), usage

    def _stream(
        self, snapshot: str, ranges: tuple, timeout: int, filters: tuple, tallying: bool
    ) -> tuple[bool, int, list[int], Any]:
        """The C pass over the ranges (bounds, whether they are heap blocks, head seq);
        one-line errors."""
        bounds, by_block, top = ranges
        start, end, inclusive, users, hosts = filters
        try:
            return _pgsurvey_fast.survey(
                f"{self._conninfo}&client_encoding=UTF8", snapshot, bounds, by_block, top,
                timeout, start or None, end, inclusive, users, hosts, tallying,
            )  # fmt: skip
        except _pgsurvey_fast.Error as exc:
            stage, message = exc.args
            why = redact_url(re.sub(r"password=\S+", "password=***", str(message)))
            if stage == "connect":
                raise LedgerError(self._unreachable(why)) from None
            raise LedgerError(
                f"reading the PostgreSQL ledger {self.url} failed ({why}): check that the server "
                "is running and retry"
            ) from None

    @staticmethod
    def _figures(conn: Any, tally: Any, odd: list[int], where: str, params: list[Any]) -> dict:
        """The tally's figures, with the odd records read by the SQL expressions added."""
        if odd:
            clause = (where + " AND " if where else "WHERE ") + "seq = ANY(%s)"
            rows = conn.execute(
                f"SELECT time, kind, {_SUBJECT}, {_DETAIL}, {_EXTRA}, host, platform, username, "
                "kernel, notebook FROM (SELECT time, kind, host, platform, username, kernel, "
                f"notebook, {_J} -> 'data' AS data FROM {_ROWS} {clause}) AS d",
                [*params, odd],
            ).fetchall()
            _pgsurvey_fast.tally_add(tally, rows)
        groups, distinct, kernels, started, notebooks = _pgsurvey_fast.tally_result(tally)
        n = len(_AGG_COLUMNS)
        return {
            "groups": [
                {**dict(zip(_AGG_COLUMNS, g[:n], strict=True)),
                 "first": g[n], "last": g[n + 1], "count": g[n + 2]}
                for g in groups
            ],
            "distinct": [
                {"kind": d[0], "subject": d[1], "detail": d[2], "extra": d[3],
                 "kernels": d[4], "notebooks": d[5]}
                for d in distinct
            ],
            "kernels": kernels,
            "kernels_started": started,
            "notebooks": sorted(notebooks),
        }  # fmt: skip

    def _check_range(self, lo: int, hi: int) -> int | None:
        """One worker's range on its own connection, so that ranges hash in parallel."""
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise LedgerError(self._unreachable(_one_line(exc))) from None
        try:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                return _first_bad(conn, lo, hi)
        except psycopg.Error as exc:
            raise LedgerError(f"cannot verify {self.url} ({_one_line(exc)})") from None
        finally:
            conn.close()


def _time_bounds(since: Any, until: Any) -> tuple[str | None, str | None, bool]:
    """A report period as compared with ``time``: start, end, whether the end is included
    (a date as ``until`` means up to the end of the day before)."""
    start = parse_time(since) or None
    if until is None or until == "":
        return start, None, False
    is_date = bool(re.fullmatch(r"\s*\d{4}-\d{2}-\d{2}\s*", str(until))) or (
        hasattr(until, "year") and not hasattr(until, "hour")
    )
    return start, parse_time(until, end=True), not is_date


def _is_glob(value: str) -> bool:
    return any(ch in value for ch in "*?[")


def _covered(conn: Any, column: str, value: str | None) -> list[str] | None:
    """The users or hosts a ``--user`` / ``--host`` filter covers (None: everyone): a glob
    is matched by the database, as ``_where`` does, against the names in the ledger."""
    if not value:
        return None
    if not _is_glob(value):
        return [value]
    rows = conn.execute(
        f"SELECT name FROM (SELECT DISTINCT {column} AS name FROM {_ROWS}) AS d WHERE name ~ %s",
        (_glob_regex(value),),
    ).fetchall()
    return [r[0] for r in rows]


def _head_and_guards(conn: Any) -> tuple[tuple[int, str], list[str]]:
    """``(seq, hash)`` of the head, and the append-only triggers that are disabled or gone."""
    row = conn.execute(
        f"SELECT seq, hash FROM {SCHEMA}.ledger_records ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    guards = conn.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND tgenabled <> 'D'",
        (f"{SCHEMA}.ledger_records",),
    ).fetchall()
    top = (int(row[0]), str(row[1])) if row else (0, GENESIS)
    return top, sorted(set(_TRIGGERS) - {g[0] for g in guards})


def _survey_summary(conn: Any) -> tuple[tuple[int, str], list[str], list[str], bool]:
    """Head, disabled triggers, altered columns, and whether ``time`` sorts bytewise (the
    database's default collation is C) as the C tally compares it."""
    top, missing = _head_and_guards(conn)
    coll = conn.execute(
        "SELECT datcollate, to_jsonb(d) ->> 'datlocprovider' FROM pg_database d "
        "WHERE datname = current_database()"
    ).fetchone()
    bytewise = coll is not None and coll[0] in ("C", "POSIX") and coll[1] in (None, "c")
    return top, missing, _altered_columns(conn), bytewise


# Grouping ids of the second aggregation query (GROUPING(k2, nb2, k3)).
_G_KERNELS, _G_NOTEBOOKS, _G_TOTAL = 3, 5, 6
_REPORT_KINDS = (
    "'ai_ml_import', 'kernel_started', 'egress_blocked', 'egress_allowed_ai', "
    "'output_flagged', 'data_read', 'model_artifact_written', 'review_signed', "
    "'guard_defaults_used'"
)


def _aggregate_sql(where: str) -> tuple[str, str]:
    """The report's two aggregation queries, each one pass over the (filtered) records.

    The first groups by tool/location (and lists the notebooks); the second counts distinct
    kernels and notebooks per tool, service, rule or file, and the kernels overall — with
    hashed grouping sets rather than sorting for every ``count(DISTINCT ...)``.
    """
    cols = ", ".join(c if c != "user" else "username" for c in _AGG_COLUMNS)
    src = (
        f"(SELECT time, kind, {_SUBJECT} AS subject, {_DETAIL} AS detail, {_EXTRA} AS extra, "
        "host, platform, username, kernel, notebook FROM (SELECT time, kind, host, platform, "
        f"username, kernel, notebook, {_J} -> 'data' AS data FROM {_ROWS} "
        f"{where} OFFSET 0) AS d) AS r"  # a fence: each body is parsed once, not once per set
    )
    groups = (
        f"SELECT {cols}, notebook, min(time), max(time), count(*), GROUPING(notebook) "
        f"FROM {src} GROUP BY GROUPING SETS (({cols}), (notebook))"
    )
    per_tool = "kind IN ('ai_ml_import', 'kernel_started')"
    distinct = f"""SELECT g, kind, subject, d2, e2, count(k2), count(nb2), count(k3),
        count(k3) FILTER (WHERE st)
    FROM (SELECT GROUPING(k2, nb2, k3) AS g, kind, subject, d2, e2, k2, nb2, k3,
                 bool_or(st) AS st
          FROM (SELECT kind, subject,
                       CASE WHEN {per_tool} THEN NULL ELSE detail END AS d2,
                       CASE WHEN {per_tool} THEN NULL ELSE extra END AS e2,
                       nullif(kernel, '') AS k2, nullif(notebook, '') AS nb2,
                       CASE WHEN {per_tool} THEN nullif(kernel, '') END AS k3,
                       kind = 'kernel_started' AS st
                FROM {src} WHERE kind IN ({_REPORT_KINDS})) AS i
          GROUP BY GROUPING SETS ((kind, subject, d2, e2, k2), (kind, subject, d2, e2, nb2),
                                  (k3))) AS s
    GROUP BY g, kind, subject, d2, e2"""
    return groups, distinct


def _tune(conn: Any) -> None:
    """Hash the groups in memory (the default 4 MB spills a million rows to disk); no JIT,
    whose compile time exceeds what it saves on these queries."""
    conn.execute("SELECT set_config('work_mem', '256MB', true), set_config('jit', 'off', true)")


_SUBMIT_CALL_PQ = f"CALL {SCHEMA}.submit($1::text[], $2::text[])".encode()


def _text_array_bytes(items: Iterable[bytes]) -> bytes:
    """A text[] literal in UTF-8, for libpq's text parameters."""
    return (
        b"{"
        + b",".join(b'"' + i.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"' for i in items)
        + b"}"
    )


class SubmitResult(NamedTuple):
    """What one ``submit`` call gave: rows, or why not and whether the link itself failed."""

    rows: list[tuple[int, str, str]] | None
    error: str = ""
    link_failed: bool = False


def _parse_submit_result(results: list[Any]) -> SubmitResult:
    """``submit``'s three arrays as rows (sequence numbers and hex digests never need
    quoting in an array's text form), or the one-line reason it failed."""
    from psycopg import pq

    for res in results:
        if res.status == pq.ExecStatus.TUPLES_OK and res.ntuples == 1 and res.nfields == 3:
            seqs, prevs, hashes = (res.get_value(0, i) or b"{}" for i in range(3))
            if seqs == b"{}":
                return SubmitResult([])
            try:
                return SubmitResult(list(zip(
                    (int(x) for x in seqs[1:-1].split(b",")),
                    prevs[1:-1].decode().split(","),
                    hashes[1:-1].decode().split(","),
                    strict=True,
                )))  # fmt: skip
            except ValueError:
                return SubmitResult(None, "the submit procedure answered in an unexpected form")
        if res.status == pq.ExecStatus.FATAL_ERROR:
            return _submit_failure(
                res.error_message.decode(errors="replace"),
                (res.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode(),
            )
    return SubmitResult(None, "the database closed the connection", True)


def _submit_failure(message: str, state: str) -> SubmitResult:
    """An error result of ``submit`` (libpq's message and SQLSTATE), in one line."""
    message = _one_line(Exception(message))
    # connection, operator intervention (shutdown, statement timeout), resources
    if state[:2] in ("08", "57", "53", ""):
        return SubmitResult(None, message, True)
    return SubmitResult(
        None, f"{message} — check `jupyter dua-guard db init` and the role's grants"
    )


_relay_module: Any = None  # ledger_relay once a relayed append needed it


def _import_relay() -> Any:
    """ledger_relay, imported on first use (kernels without a relay never load it) and kept:
    an import statement on every append costs ~2 µs."""
    global _relay_module
    from . import ledger_relay

    _relay_module = ledger_relay
    return ledger_relay


def _columns(batch: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    return [p["head"] for p in batch], [p["time"] for p in batch]


_RANGE_SQL = f"""SELECT min(seq) FROM (
    SELECT seq, prev, hash, body, lag(hash) OVER w AS lh, lag(seq) OVER w AS ls
    FROM {SCHEMA}.ledger_records WHERE seq >= %(lo)s AND seq <= %(hi)s WINDOW w AS (ORDER BY seq)
) t WHERE seq > %(lo)s AND (
    hash IS DISTINCT FROM encode(sha256(convert_to(prev || E'\\n' || body, 'UTF8')), 'hex')
    OR prev IS DISTINCT FROM coalesce(lh, CASE WHEN %(lo)s = 0 THEN %(genesis)s END)
    OR seq <> coalesce(ls, %(lo)s) + 1)"""


def _normal_expr(expr: str) -> str:
    """An expression as written here or as PostgreSQL prints it, in one comparable form."""
    return re.sub(r"[\s()]|::text\b", "", expr)


def _altered_columns(conn: Any) -> list[str]:
    """``fields`` when it is gone, no longer generated, or computed differently.

    It is generated from the body, so the owner cannot change it without changing the
    hashed body — unless the table itself is altered (DROP EXPRESSION, the column replaced
    by one computed another way), which this catches.
    """
    row = conn.execute(
        "SELECT a.attgenerated, pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a "
        "LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
        "WHERE a.attrelid = %s::regclass AND a.attname = 'fields' AND NOT a.attisdropped",
        (f"{SCHEMA}.ledger_records",),
    ).fetchone()
    intact = (
        row is not None
        and row[0] == "s"
        and _normal_expr(row[1] or "") == _normal_expr(_FIELDS_EXPR)
    )
    return [] if intact else ["fields"]


def _first_bad(conn: Any, lo: int, hi: int) -> int | None:
    """The first record in ``lo+1..hi`` whose hash or link is wrong, hashing in the server."""
    row = conn.execute(_RANGE_SQL, {"lo": lo, "hi": hi, "genesis": GENESIS}).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def _diagnose(conn: Any, first: int) -> tuple[int, str]:
    row = conn.execute(
        f"SELECT seq, hash FROM {SCHEMA}.ledger_records WHERE seq < %s ORDER BY seq DESC LIMIT 1",
        (first,),
    ).fetchone()
    start, prev = (int(row[0]), str(row[1])) if row else (0, GENESIS)
    rows = conn.execute(
        f"SELECT seq, prev, hash, body FROM {SCHEMA}.ledger_records WHERE seq > %s "
        "ORDER BY seq LIMIT 100000",
        (start,),
    ).fetchall()
    return diagnose_rows(rows, start, prev)


def _check_pin(
    conn: Any, pin: tuple[int | None, str], top: tuple[int, str]
) -> tuple[int | None, str] | None:
    seq, digest = pin
    last_seq = top[0]
    if seq is not None:
        if seq > last_seq:
            return (
                last_seq + 1,
                f"missing: the ledger ends at record {last_seq} but the pinned head is "
                f"record {seq} — records {last_seq + 1}..{seq} were removed (truncated)",
            )
        row = conn.execute(
            f"SELECT hash FROM {SCHEMA}.ledger_records WHERE seq = %s", (seq,)
        ).fetchone()
        if row is None or not row[0].startswith(digest):
            return (
                seq,
                f"its hash differs from the pinned head {digest[:16]}…: the ledger was "
                "rewritten from this record on",
            )
        return None
    row = conn.execute(
        f"SELECT seq FROM {SCHEMA}.ledger_records WHERE starts_with(hash, %s) LIMIT 1", (digest,)
    ).fetchone()
    if row is None:
        return (
            last_seq + 1,
            f"the pinned head {digest[:16]}… is not in the ledger, which ends at record "
            f"{last_seq}: records after it were removed (truncated) or the chain rewritten",
        )
    return None


def _remove_spool(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", ".lock", ".owner"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")


_META_SQL = f"SELECT key, value FROM {SCHEMA}.ledger_meta"


def _session_setup(seconds: float) -> str:
    """What every writing session sets first (kernels' and the relay's): no statement or
    lock wait longer than ``seconds``, so that a kernel never hangs on the database."""
    ms = int(seconds * 1000)
    return (
        f"SELECT set_config('statement_timeout', '{ms}', false), "
        f"set_config('lock_timeout', '{ms}', false)"
    )


def _no_schema_error(url: str) -> LedgerError:
    return LedgerError(
        f"PostgreSQL database {url} has no jupyter-dua-guard ledger schema: "
        "run `jupyter dua-guard db init --ledger URL` as a database administrator"
    )


def _unreadable_schema_error(url: str, why: str) -> LedgerError:
    return LedgerError(
        f"cannot read the ledger schema in {url} ({why}): connect as the ledger's writer or "
        "owner role"
    )


def _check_meta(meta: dict[str, str], url: str) -> None:
    if meta.get("format") != LEDGER_FORMAT:
        raise LedgerError(
            f"schema {SCHEMA} in {url} is not a jupyter-dua-guard ledger: use another database "
            "or schema"
        )
    version = int(meta.get("schema_version", "0") or 0)
    if version > SCHEMA_VERSION:
        raise LedgerError(
            f"ledger {url} has schema version {version}, this jupyter-dua-guard knows up to "
            f"{SCHEMA_VERSION}: upgrade jupyter-dua-guard"
        )
    if version < SCHEMA_VERSION:
        raise LedgerError(
            f"ledger {url} has schema version {version}, this jupyter-dua-guard needs "
            f"{SCHEMA_VERSION}: run `jupyter dua-guard db upgrade --ledger URL` as the owner "
            "or an administrator"
        )


# --------------------------------------------------------------------------- administration


def _admin_connect(url: str) -> Any:
    _require_psycopg()
    conninfo, _ = split_url(url)
    try:
        return psycopg.connect(conninfo, autocommit=True)
    except psycopg.Error as exc:
        raise LedgerError(
            f"cannot connect to {redact_url(url)} ({_one_line(exc)}): check the URL, the "
            "server and the administrator's credentials"
        ) from None


def _role_exists(conn: Any, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is not None


def _ensure_role(conn: Any, name: str, password: str | None) -> str:
    ident = _sql.Identifier(name)
    verb = "ALTER" if _role_exists(conn, name) else "CREATE"
    if password:
        conn.execute(
            _sql.SQL("{} ROLE {} LOGIN PASSWORD {}").format(
                _sql.SQL(verb), ident, _sql.Literal(password)
            )
        )
    elif verb == "CREATE":
        conn.execute(_sql.SQL("CREATE ROLE {} NOLOGIN").format(ident))
    return "updated" if verb == "ALTER" else "created"


def db_init(
    url: str,
    *,
    owner: str = OWNER_ROLE,
    writer: str = WRITER_ROLE,
    owner_password: str | None = None,
    writer_password: str | None = None,
    members: Iterable[str] = (),
) -> list[str]:
    """Create the roles, the schema at the current version and the grants; idempotent.

    Run as a superuser (or a role that may create roles and is a member of ``owner``).
    Returns what was done, one line each, without any password.
    """
    done: list[str] = []
    conn = _admin_connect(url)
    try:
        enc = conn.execute("SHOW server_encoding").fetchone()[0]
        if enc.upper() not in ("UTF8", "UTF-8"):
            raise LedgerError(
                f"database {redact_url(url)} uses encoding {enc}; the ledger hashes UTF-8 text: "
                "create the database WITH ENCODING 'UTF8'"
            )
        with conn.transaction():
            done.append(f"role {owner}: {_ensure_role(conn, owner, owner_password)}")
            done.append(f"role {writer}: {_ensure_role(conn, writer, writer_password)}")
            for member in members:
                if not _role_exists(conn, member):
                    raise LedgerError(
                        f"role {member!r} does not exist: create the hub users' database roles "
                        "first, or leave it out of --members"
                    )
                conn.execute(
                    _sql.SQL("GRANT {} TO {}").format(
                        _sql.Identifier(writer), _sql.Identifier(member)
                    )
                )
                done.append(f"role {member}: may write as {writer}")
            exists = conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL", (f"{SCHEMA}.ledger_meta",)
            ).fetchone()[0]
            if exists:
                meta = dict(conn.execute(f"SELECT key, value FROM {SCHEMA}.ledger_meta"))
                done.append(
                    f"schema {SCHEMA} already present (version {meta.get('schema_version')}); "
                    "left as it is — use `db upgrade` for newer versions"
                )
            else:
                conn.execute(
                    _sql.SQL("CREATE SCHEMA IF NOT EXISTS {} AUTHORIZATION {}").format(
                        _sql.Identifier(SCHEMA), _sql.Identifier(owner)
                    )
                )
                conn.execute(_sql.SQL("SET LOCAL ROLE {}").format(_sql.Identifier(owner)))
                for stmt in _BASE_SCHEMA:
                    conn.execute(stmt)
                conn.execute(
                    f"INSERT INTO {SCHEMA}.ledger_meta (key, value) VALUES (%s, %s), (%s, %s), "
                    "(%s, %s), (%s, %s), (%s, %s)",
                    (
                        "format", LEDGER_FORMAT,
                        "version", LEDGER_VERSION,
                        "schema_version", "1",
                        "created", events.utc_now(),
                        "hash", "sha256(prev + '\\n' + canonical_json(body))",
                    ),
                )  # fmt: skip
                conn.execute("RESET ROLE")
                done.append(f"schema {SCHEMA} created (version 1), owned by {owner}")
            _grant(conn, owner, writer)
            done.append(
                f"grants: {writer} may SELECT and INSERT only; UPDATE, DELETE and TRUNCATE are "
                "refused by trigger"
            )
        done += db_upgrade(url, _conn=conn)
    except psycopg.Error as exc:
        raise LedgerError(
            f"db init on {redact_url(url)} failed ({_one_line(exc)}): run it as a PostgreSQL "
            "superuser (or a role that may create roles and owns the database)"
        ) from None
    finally:
        conn.close()
    return done


def _grant(conn: Any, owner: str, writer: str) -> None:
    """The writer may read and append, nothing else; grants on the objects of the schema's
    version (``db init`` runs this on version 1 and again on a database already upgraded)."""
    w, o, s = _sql.Identifier(writer), _sql.Identifier(owner), _sql.Identifier(SCHEMA)
    statements = [
        "REVOKE ALL ON SCHEMA {s} FROM PUBLIC",
        "GRANT USAGE ON SCHEMA {s} TO {w}",
        "REVOKE ALL ON ALL TABLES IN SCHEMA {s} FROM PUBLIC, {w}",
        "GRANT SELECT, INSERT ON {s}.ledger_records TO {w}",
        "GRANT SELECT ON {s}.ledger_meta TO {w}",
        "REVOKE ALL ON ALL FUNCTIONS IN SCHEMA {s} FROM PUBLIC",
        "GRANT EXECUTE ON FUNCTION {s}.append(text[], text[], boolean) TO {w}, {o}",
    ]
    exists = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL, to_regprocedure(%s) IS NOT NULL",
        (f"{SCHEMA}.ledger_pending", f"{SCHEMA}.submit(text[], text[], bigint[], text[], text[])"),
    ).fetchone()
    if exists[0]:  # version 1
        statements += [
            "GRANT SELECT, INSERT ON {s}.ledger_pending TO {w}",
            "GRANT USAGE ON SEQUENCE {s}.ledger_pending_id_seq TO {w}",
            "GRANT EXECUTE ON FUNCTION {s}.chain(bigint[]) TO {w}, {o}",
        ]
    if exists[1]:  # version 2 on
        statements += [
            "REVOKE ALL ON PROCEDURE {s}.submit(text[], text[], bigint[], text[], text[]) "
            "FROM PUBLIC",
            "GRANT EXECUTE ON PROCEDURE {s}.submit(text[], text[], bigint[], text[], text[]) "
            "TO {w}, {o}",
        ]
    for stmt in statements:
        conn.execute(_sql.SQL(stmt).format(s=s, w=w, o=o))


def db_status(url: str) -> dict[str, Any]:
    """Schema version and roles as the database reports them."""
    conn = _admin_connect(url)
    try:
        if not conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL", (f"{SCHEMA}.ledger_meta",)
        ).fetchone()[0]:
            return {"schema_version": None, "current": SCHEMA_VERSION}
        meta = dict(conn.execute(f"SELECT key, value FROM {SCHEMA}.ledger_meta").fetchall())
        return {"schema_version": int(meta.get("schema_version", 0)), "current": SCHEMA_VERSION,
                **{k: v for k, v in meta.items() if k != "schema_version"}}  # fmt: skip
    except psycopg.Error as exc:
        raise LedgerError(f"cannot read {redact_url(url)} ({_one_line(exc)})") from None
    finally:
        conn.close()


def db_upgrade(url: str, *, _conn: Any = None) -> list[str]:
    """Apply the migrations from the recorded schema version up to ``SCHEMA_VERSION``."""
    conn = _conn or _admin_connect(url)
    done: list[str] = []
    try:
        if not conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL", (f"{SCHEMA}.ledger_meta",)
        ).fetchone()[0]:
            raise LedgerError(
                f"{redact_url(url)} has no ledger schema to upgrade: run `jupyter dua-guard db "
                "init` first"
            )
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            meta = dict(conn.execute(f"SELECT key, value FROM {SCHEMA}.ledger_meta").fetchall())
            version = int(meta.get("schema_version", "0") or 0)
            if version > SCHEMA_VERSION:
                raise LedgerError(
                    f"ledger schema version {version} is newer than this jupyter-dua-guard "
                    f"({SCHEMA_VERSION}): upgrade jupyter-dua-guard"
                )
            owner = conn.execute(
                "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = %s", (SCHEMA,)
            ).fetchone()[0]
            conn.execute(_sql.SQL("SET LOCAL ROLE {}").format(_sql.Identifier(owner.strip('"'))))
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for stmt in MIGRATIONS.get(target, []):
                    conn.execute(stmt)
                conn.execute(
                    f"UPDATE {SCHEMA}.ledger_meta SET value = %s WHERE key = 'schema_version'",
                    (str(target),),
                )
                done.append(f"schema {SCHEMA} upgraded to version {target}")
            conn.execute("RESET ROLE")
        if not done:
            done.append(f"schema {SCHEMA} is at version {SCHEMA_VERSION}: nothing to upgrade")
    except psycopg.Error as exc:
        raise LedgerError(
            f"db upgrade on {redact_url(url)} failed ({_one_line(exc)}): run it as the owner role "
            "or a superuser"
        ) from None
    finally:
        if _conn is None:
            conn.close()
    return done


def spool_files(spool_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Spools waiting in ``spool_dir`` (default: the per-user spool directory)."""
    folder = Path(spool_dir) if spool_dir else default_spool_dir()
    return sorted(folder.rglob("spool-*.sqlite")) if folder.is_dir() else []
