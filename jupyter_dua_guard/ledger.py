"""The usage ledger: an append-only, hash-chained record of the guard's events.

DUA sec. 22 requires records of every AI/ML tool used with the data, to be handed to NIH on
request; those records are only worth something if an auditor can tell whether they were
changed. Every record therefore stores ``hash = sha256(prev + "\\n" + body)`` where ``prev``
is the previous record's hash and ``body`` the canonical JSON of the event (which includes
its sequence number). Editing, deleting, inserting or reordering records breaks the chain;
truncating the tail is detected against a head hash pinned elsewhere (a report, a note).

Storage sits behind the small ``Ledger`` interface so that a PostgreSQL backend can follow
for multi-user hubs; the embedded backend is one SQLite file in WAL mode. This module is
stdlib only: every guarded kernel imports it.
"""

from __future__ import annotations

import abc
import contextlib
import datetime as _dt
import hashlib
import json
import os
import queue
import re
import sqlite3
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from . import events

try:  # optional C walk of the chain, built with the wheel where a compiler was found
    from . import _chain_fast  # type: ignore[attr-defined]
except ImportError:
    _chain_fast = None

try:  # POSIX: serialise writers in the kernel instead of SQLite's sleeping busy handler.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "GENESIS",
    "Ledger",
    "LedgerError",
    "SQLiteLedger",
    "VerifyResult",
    "canonical_json",
    "default_ledger_url",
    "open_ledger",
    "record_hash",
    "redact_url",
]

LEDGER_FORMAT = "jupyter-dua-guard-ledger"
LEDGER_VERSION = "1"
GENESIS = "0" * 64
SQLITE_MAGIC = b"SQLite format 3\x00"
_CANON_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")


_INHERITED: list[Any] = []


class LedgerError(Exception):
    """A ledger problem, as one line naming what is wrong and how to fix it."""


# Built once: json.dumps with these options would build an encoder for every event.
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str
)


# The C encoder that _CANONICAL.encode builds anew on every call (with the same arguments),
# called directly: ~1.4 of an append's ~7 µs of Python.
_C_ENCODER = getattr(json.encoder, "c_make_encoder", None)
_C_STRING = getattr(json.encoder, "c_encode_basestring", None)


def canonical_json(value: Any) -> str:
    """The one JSON text of a value that every writer and verifier agrees on."""
    try:
        if _C_ENCODER is not None and _C_STRING is not None:
            encode = _C_ENCODER({}, str, _C_STRING, None, ":", ",", True, False, False)
            return "".join(encode(value, 0))
        return _CANONICAL.encode(value)
    except (TypeError, ValueError) as exc:
        raise LedgerError(f"event is not JSON-serialisable ({exc}): pass plain values") from None


_context_cache: tuple[tuple, str, dict[str, Any]] = ((), "", {})


# os.environ keeps its raw entries in ``_data`` (bytes on POSIX): looking the two variables up
# there, once per event, costs a tenth of os.environ.get's encoding round trip.
_ENV_RAW = getattr(os.environ, "_data", None)
_ENV_KEYS = tuple(
    os.environ.encodekey(k) if hasattr(os.environ, "encodekey") else k  # type: ignore[attr-defined]
    for k in (events.ENV_KERNEL_ID, events.ENV_NOTEBOOK)
)


def _own_context() -> tuple[str, dict[str, Any]]:
    """This process's context without the time, as canonical JSON and as read back."""
    global _context_cache
    if isinstance(_ENV_RAW, dict):
        key = (os.getpid(), _ENV_RAW.get(_ENV_KEYS[0]), _ENV_RAW.get(_ENV_KEYS[1]))
    else:
        key = (
            os.getpid(), os.environ.get(events.ENV_KERNEL_ID), os.environ.get(events.ENV_NOTEBOOK)
        )  # fmt: skip
    cached = _context_cache
    if cached[0] != key:
        ctx = events.current_context()
        del ctx["time"]
        text = canonical_json(ctx)
        cached = _context_cache = (key, text, json.loads(text))
    return cached[1], cached[2]


def record_hash(prev: str, body: str) -> str:
    """SHA-256 of a record's canonical JSON together with the previous record's hash."""
    return hashlib.sha256(f"{prev}\n{body}".encode()).hexdigest()


def default_ledger_url() -> str:
    """``sqlite:///<jupyter data dir>/dua_guard/ledger.sqlite`` (absolute path, four slashes)."""
    try:
        from jupyter_core.paths import jupyter_data_dir

        data_dir = jupyter_data_dir()
    except ImportError:  # a bare Python process: follow jupyter_core's own rule
        data_dir = os.environ.get("JUPYTER_DATA_DIR") or os.path.join(
            os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "jupyter"
        )
    return "sqlite:///" + os.path.abspath(os.path.join(data_dir, "dua_guard", "ledger.sqlite"))


_PASSWORD_IN_QUERY = re.compile(r"(?i)((?:^|[?&\s])password\s*=\s*)('[^']*'|[^&\s]*)")


def redact_url(url: str | None) -> str:
    """``url`` with any password replaced by ``***``: the only form that may be logged."""
    if not url:
        return ""
    text = str(url)
    if "://" in text:
        scheme, rest = text.split("://", 1)
        authority, sep, tail = rest.partition("/")
        if "@" in authority:
            userinfo, host = authority.rsplit("@", 1)
            if ":" in userinfo:
                userinfo = userinfo.split(":", 1)[0] + ":***"
            authority = f"{userinfo}@{host}"
        text = f"{scheme}://{authority}{sep}{tail}"
    return _PASSWORD_IN_QUERY.sub(lambda m: m.group(1) + "***", text)


# --------------------------------------------------------------------------- time filters


def parse_time(value: str | _dt.datetime | _dt.date | None, *, end: bool = False) -> str | None:
    """Normalise a --since/--until value to the ledger's UTC text form.

    A date alone means the whole day: as ``end`` it is the first instant of the next day
    (used as an exclusive bound), so ``--until 2026-03-31`` includes all of March 31st.
    Times without a zone are UTC.
    """
    if value is None or value == "":
        return None
    date_only = False
    if isinstance(value, _dt.datetime):
        moment = value
    elif isinstance(value, _dt.date):
        moment, date_only = _dt.datetime(value.year, value.month, value.day), True
    else:
        text = str(value).strip()
        try:
            if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
                moment, date_only = _dt.datetime.fromisoformat(text), True
            else:
                moment = _dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace(" ", "T"))
        except ValueError:
            raise LedgerError(
                f"cannot read the time {text!r}: use ISO 8601, e.g. 2026-03-31 or "
                "2026-03-31T14:00:00Z"
            ) from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(_dt.timezone.utc).replace(tzinfo=None)
    if date_only and end:
        moment += _dt.timedelta(days=1)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of walking the chain; ``bad_seq`` names the first bad record."""

    ok: bool
    records: int
    head_seq: int
    head_hash: str
    url: str = ""
    bad_seq: int | None = None
    problem: str | None = None
    pinned: str | None = None

    @property
    def head(self) -> str:
        """The head as ``seq:hash``, the form ``verify --head`` accepts."""
        return f"{self.head_seq}:{self.head_hash}"

    @property
    def first_bad(self) -> int | None:
        """Sequence number of the first bad record (``None`` when intact)."""
        return self.bad_seq

    @property
    def message(self) -> str:
        """The one-line summary, as ``verify`` prints it."""
        return self.summary()

    def __bool__(self) -> bool:
        return self.ok

    def summary(self) -> str:
        """One line for people: intact with the head, or the first bad record and why."""
        if self.ok:
            pin = f"; pinned head {self.pinned} present" if self.pinned else ""
            return f"ledger intact: {self.records} records, head {self.head}{pin} ({self.url})"
        where = f"record {self.bad_seq}: " if self.bad_seq is not None else ""
        return f"ledger NOT intact: {where}{self.problem} ({self.url})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "head": self.head,
            "head_seq": self.head_seq,
            "head_hash": self.head_hash,
            "bad_record": self.bad_seq,
            "problem": self.problem,
            "pinned": self.pinned,
            "ledger": self.url,
            "summary": self.summary(),
        }


# --------------------------------------------------------------------------- interface


class Ledger(abc.ABC):
    """Storage interface of the usage ledger (SQLite today, PostgreSQL for hubs later).

    Backends implement ``_store`` (chain prepared events after the current head in one
    transaction), ``records``/``count``/``head``/``aggregate``/``verify``/``close``; event
    preparation and chaining live here so that every backend hashes alike.
    """

    url: str

    # -- writing
    def append(
        self, kind: str, data: Mapping[str, Any], context: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Record one event durably and return the stored record (with seq and hash)."""
        return self._store([self._prepare(kind, data, context)])[0]  # append_many, one event

    def append_many(
        self,
        items: Iterable[tuple[str, Mapping[str, Any], Mapping[str, Any] | None]],
    ) -> list[dict[str, Any]]:
        """Record several events in one transaction: for bursts (imports at kernel start)."""
        prepared = [self._prepare(kind, data, context) for kind, data, context in items]
        if not prepared:
            return []
        return self._store(prepared)

    @staticmethod
    def _prepare(
        kind: str, data: Mapping[str, Any], context: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        if kind not in events.EVENT_KINDS:
            raise LedgerError(
                f"unknown event kind {kind!r}: use one of {', '.join(events.EVENT_KINDS)}"
            )
        if not isinstance(data, Mapping):
            raise LedgerError(f"event data for {kind} must be a mapping, not {type(data).__name__}")
        # Serialise before taking the write lock: sorted keys put context, data, kind first,
        # so only ',"seq":N,"time":"..."}' is left to add once the sequence number is known.
        if not context:  # the usual case: this process's own context, serialised once
            data_json = canonical_json(dict(data))
            ctx_json, ctx = _own_context()
            head = f'{{"context":{ctx_json},"data":{data_json},"kind":"{kind}"'
            # what _stored needs to give the record back without parsing the whole body
            parts = (ctx, data_json, kind)
            return {"head": head, "time": events.utc_now(), "parts": parts}
        ctx = events.current_context()
        ctx.update(context)
        time = ctx.pop("time", None)
        if not (isinstance(time, str) and _CANON_TIME.fullmatch(time)):
            time = parse_time(time) or events.utc_now()
        head = canonical_json({"context": ctx, "data": dict(data), "kind": kind})[:-1]
        return {"head": head, "time": time}

    @staticmethod
    def _chain(prepared: list[dict[str, Any]], seq: int, prev: str) -> list[tuple]:
        """Give prepared events seq/prev/hash after the head (seq, prev): cheap, under lock."""
        rows = []
        for event in prepared:
            seq += 1
            body = f'{event["head"]},"seq":{seq},"time":"{event["time"]}"}}'
            digest = record_hash(prev, body)
            rows.append((seq, prev, digest, body))
            prev = digest
        return rows

    @staticmethod
    def _stored(
        rows: list[tuple], prepared: list[dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        """The records exactly as readers will see them (JSON types, str() of odd values).

        With the ``prepared`` events, records of this process's own context are rebuilt
        from their parts instead of parsing each body again.
        """
        out = []
        for i, (seq, prev, h, body) in enumerate(rows):
            parts = prepared[i].get("parts") if prepared else None
            if parts:
                ctx, data_json, kind = parts
                time = prepared[i]["time"]  # type: ignore[index]
                record = {"context": dict(ctx), "data": json.loads(data_json), "kind": kind,
                          "seq": seq, "time": time, "prev": prev, "hash": h}  # fmt: skip
            else:
                record = {**json.loads(body), "prev": prev, "hash": h}
            out.append(record)
        return out

    @abc.abstractmethod
    def _store(self, prepared: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Chain ``prepared`` after the current head atomically; return the stored records."""

    # -- reading
    @abc.abstractmethod
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
        """Records matching the filters, oldest first (``descending`` for newest first)."""

    @abc.abstractmethod
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
        """How many records match the filters."""

    @abc.abstractmethod
    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the newest record, ``(0, GENESIS)`` when empty."""

    @abc.abstractmethod
    def aggregate(
        self,
        since: Any = None,
        until: Any = None,
        *,
        user: str | None = None,
        host: str | None = None,
    ) -> dict[str, Any]:
        """Usage for reports, aggregated by the backend so that reports stay fast.

        ``groups``: kind, subject, detail, extra, host, platform, user, first, last, count;
        ``distinct``: kind, subject, detail, extra, kernels, notebooks (AI/ML tools per
        subject, other kinds per subject/detail/extra); ``kernels``: distinct kernels started
        or importing AI/ML tools; ``notebooks``: distinct notebook paths seen.
        """

    @abc.abstractmethod
    def verify(self, head: str | None = None, *, workers: int = 1) -> VerifyResult:
        """Walk the chain; ``head`` (``seq:hash`` or a hash) also detects truncation."""

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
        """What a report needs from the store: the chain check and the usage figures.

        Both read the whole ledger, so they run side by side (SQLite, PostgreSQL and the C
        walk all release the GIL while they read).
        """
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self.verify, head, workers=workers)
            try:
                usage = self.aggregate(since, until, user=user, host=host)
            finally:
                verification = pending.result()
        return verification, usage

    @abc.abstractmethod
    def close(self) -> None:
        """Release the storage connection."""

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- shared helpers
    @staticmethod
    def _check_kinds(kinds: Iterable[str] | None) -> list[str] | None:
        if kinds is None:
            return None
        out: list[str] = []
        for item in kinds:
            for kind in str(item).split(","):
                kind = kind.strip()
                if not kind:
                    continue
                if kind not in events.EVENT_KINDS:
                    raise LedgerError(
                        f"unknown event kind {kind!r}: use one of {', '.join(events.EVENT_KINDS)}"
                    )
                out.append(kind)
        return out or None


def _parse_pin(pin: str) -> tuple[int | None, str]:
    text = pin.strip().lower()
    seq: int | None = None
    if ":" in text:
        left, text = text.split(":", 1)
        if not left.isdigit():
            raise LedgerError(f"cannot read the pinned head {pin!r}: use SEQ:HASH as verify prints")
        seq = int(left)
    if not re.fullmatch(r"[0-9a-f]{12,64}", text):
        raise LedgerError(
            f"cannot read the pinned head {pin!r}: use SEQ:HASH (64 hex digits) as verify prints"
        )
    return seq, text


# --------------------------------------------------------------------------- SQLite

_RECORDS_SQL = """CREATE TABLE ledger_records (
    seq INTEGER PRIMARY KEY,
    prev TEXT NOT NULL,
    hash TEXT NOT NULL,
    body TEXT NOT NULL,
    time TEXT GENERATED ALWAYS AS (json_extract(body, '$.time')) STORED,
    kind TEXT GENERATED ALWAYS AS (json_extract(body, '$.kind')) STORED,
    user TEXT GENERATED ALWAYS AS (json_extract(body, '$.context.user')) STORED,
    host TEXT GENERATED ALWAYS AS (json_extract(body, '$.context.host')) STORED,
    platform TEXT GENERATED ALWAYS AS (json_extract(body, '$.context.platform')) STORED,
    kernel TEXT GENERATED ALWAYS AS (json_extract(body, '$.context.kernel_id')) STORED,
    notebook TEXT GENERATED ALWAYS AS (json_extract(body, '$.context.notebook')) STORED,
    subject TEXT GENERATED ALWAYS AS (CASE kind
        WHEN 'ai_ml_import' THEN coalesce(json_extract(body, '$.data.distribution'),
                                          json_extract(body, '$.data.name'))
        WHEN 'egress_blocked' THEN json_extract(body, '$.data.host')
        WHEN 'egress_allowed_ai' THEN json_extract(body, '$.data.host')
        WHEN 'model_artifact_written' THEN json_extract(body, '$.data.path')
        WHEN 'data_read' THEN json_extract(body, '$.data.path')
        WHEN 'output_flagged' THEN json_extract(body, '$.data.rule')
        WHEN 'review_signed' THEN json_extract(body, '$.data.reviewer')
        WHEN 'kernel_started' THEN json_extract(body, '$.data.kernel_name')
        END) STORED,
    detail TEXT GENERATED ALWAYS AS (CASE kind
        WHEN 'ai_ml_import' THEN json_extract(body, '$.data.version')
        WHEN 'egress_blocked' THEN json_extract(body, '$.data.port')
        WHEN 'egress_allowed_ai' THEN json_extract(body, '$.data.port')
        WHEN 'model_artifact_written' THEN json_extract(body, '$.data.library')
        WHEN 'data_read' THEN json_extract(body, '$.data.format')
        WHEN 'review_signed' THEN json_extract(body, '$.data.notebook')
        END) STORED,
    extra TEXT GENERATED ALWAYS AS (CASE kind
        WHEN 'ai_ml_import' THEN json_extract(body, '$.data.category')
        WHEN 'egress_blocked' THEN json_extract(body, '$.data.rule')
        WHEN 'egress_allowed_ai' THEN json_extract(body, '$.data.rule')
        WHEN 'model_artifact_written' THEN json_extract(body, '$.data.size')
        WHEN 'review_signed' THEN json_extract(body, '$.data.scope')
        END) STORED
)"""

# One index only: every index costs each append about one more page written to the WAL
# (measured: two more indexes cut 8-writer throughput by a fifth). The report index leads
# with kind and covers every column the report and the kind filters read.
_SCHEMA = [
    "CREATE TABLE ledger_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    _RECORDS_SQL,
    "CREATE INDEX ledger_records_report ON ledger_records "
    "(kind, subject, detail, extra, host, platform, user, kernel, notebook, time)",
]

# WAL frames after which a writer checkpoints (SQLite's own default). SQLite would do it
# inside the commit, while the other writers wait on the lock file for it to write the pages
# back and sync; writers do it after releasing the lock instead (PASSIVE: it never blocks
# anyone), reading from the wal-index (the -shm file, https://www.sqlite.org/walformat.html)
# how many frames the WAL holds (mxFrame, a native-order u32 at byte 16) and how many of them
# are already copied back (nBackfill, at byte 96). Until the next write restarts the WAL,
# mxFrame stays high after a checkpoint: without nBackfill every writer would checkpoint
# (and sync) again after each of its appends.
_CHECKPOINT_FRAMES = 1000

_INSERT_SQL = "INSERT INTO ledger_records (seq, prev, hash, body) VALUES (?, ?, ?, ?)"
_SHM_FRAMES = struct.Struct("=16xI76xI")  # mxFrame, nBackfill

_RARE = 20_000  # below this many matches, a kind filter reads through the index

_AGG_COLUMNS = ("kind", "subject", "detail", "extra", "host", "platform", "user")


def _usage(
    groups: list[tuple],
    distinct: list[dict[str, Any]],
    kernels: int,
    started: int,
    notebooks: Iterable[Any],
) -> dict[str, Any]:
    """The shape ``Ledger.aggregate`` returns, from grouped rows and distinct counts."""
    n = len(_AGG_COLUMNS)
    return {
        "groups": [
            {**dict(zip(_AGG_COLUMNS, r[:n], strict=True)),
             "first": r[n], "last": r[n + 1], "count": r[n + 2]}
            for r in groups
        ],
        "distinct": distinct,
        "kernels": kernels,
        "kernels_started": started,
        "notebooks": sorted(notebooks, key=lambda v: (not isinstance(v, str), str(v))),
    }  # fmt: skip


def _is_glob(value: str) -> bool:
    return any(ch in value for ch in "*?[")


def _norm_sql(sql: str | None) -> str:
    return re.sub(r"\s+", " ", sql or "").strip()


class SQLiteLedger(Ledger):
    """One SQLite file in WAL mode; writers serialise with ``BEGIN IMMEDIATE``.

    On POSIX an advisory lock on ``<file>.lock`` queues writers in the kernel, so that many
    kernels appending at once wait in line instead of sleeping in SQLite's busy handler;
    the busy timeout stays as the backstop. ``synchronous=NORMAL`` (the default) makes every
    committed append survive a crash of the writing process (SIGKILL included);
    ``?synchronous=full`` in the URL also survives power loss at the cost of one fsync each.
    """

    CHUNK = 20000

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        url: str | None = None,
        timeout: float = 30.0,
        synchronous: str = "normal",
        create: bool = True,
    ) -> None:
        self.path = Path(path).expanduser().absolute()
        self.url = url or f"sqlite:///{self.path}"
        self.timeout = timeout
        if synchronous.lower() not in ("off", "normal", "full", "extra"):
            raise LedgerError(
                f"unknown synchronous={synchronous!r} in ledger URL {self.url}: use normal or full"
            )
        self.synchronous = synchronous.upper()
        self.create = create
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._lockfile: int | None = None
        self._shm: int | None = None  # the wal-index file, read to time checkpoints
        self._appender: Any = None  # _chain_fast.Appender, opened on the first append
        self._appender_pid = 0
        self._conn_obj: sqlite3.Connection | None = None
        self._connect()

    # -- connection
    def _fail(self, exc: BaseException, doing: str) -> LedgerError:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, sqlite3.DatabaseError) and (
            "malformed" in msg or "not a database" in msg or "encrypted" in msg
        ):
            return LedgerError(
                f"ledger {self.path} is corrupt ({msg}): keep the file as evidence and restore "
                "the ledger from a backup, or point --ledger / DUAGuard.ledger_url elsewhere"
            )
        if "readonly" in msg or "unable to open" in msg or isinstance(exc, PermissionError):
            return LedgerError(
                f"cannot {doing} ledger {self.path} ({msg}): make {self.path.parent} writable "
                "or point --ledger / DUAGuard.ledger_url at a writable location"
            )
        if "locked" in msg or "busy" in msg:
            return LedgerError(
                f"ledger {self.path} stayed locked for {self.timeout:g} s ({msg}): "
                "another process holds it; retry, or raise the timeout"
            )
        return LedgerError(f"cannot {doing} ledger {self.path}: {msg}")

    def _connect(self) -> None:
        path = self.path
        if path.is_dir():
            raise LedgerError(
                f"ledger path {path} is a directory: point --ledger / DUAGuard.ledger_url at a "
                "file such as sqlite:///" + str(path / "ledger.sqlite")
            )
        exists = path.exists() and path.stat().st_size > 0
        if exists:
            try:
                with open(path, "rb") as fh:
                    magic = fh.read(len(SQLITE_MAGIC))
            except OSError as exc:
                raise self._fail(exc, "read") from None
            if magic != SQLITE_MAGIC:
                raise LedgerError(
                    f"{path} is not a jupyter-dua-guard ledger (not an SQLite database); it was "
                    "left untouched: point --ledger / DUAGuard.ledger_url at a ledger file or a "
                    "new path"
                )
        elif not self.create:
            what = "an empty file" if path.exists() else "no ledger"
            raise LedgerError(
                f"{what} at {path}: check --ledger / DUAGuard.ledger_url (the server creates "
                "the ledger when it starts)"
            )
        else:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise LedgerError(
                    f"cannot create the ledger directory {path.parent} ({exc.strerror}): point "
                    "--ledger / DUAGuard.ledger_url at a writable location"
                ) from None
            if not os.access(path.parent, os.W_OK):
                raise LedgerError(
                    f"cannot create ledger {path}: directory {path.parent} is not writable; make "
                    "it writable or point --ledger / DUAGuard.ledger_url at a writable location"
                )
        # A new ledger is made under the append lock. Until its first checkpoint its pages
        # are only in the WAL and the database file is empty, and a second process opening
        # it then would find no ledger (SQLite even discards the WAL of an empty database
        # file): several kernels starting on a fresh path once failed that way.
        creating = None if exists else self._creation_lock()
        try:
            conn = self._open(path)
        finally:
            if creating is not None:
                os.close(creating)
        self._conn_obj = conn
        self._pid = os.getpid()
        self._lockfile = None
        if fcntl is not None:
            try:
                self._lockfile = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                self._lockfile = None  # read-only place: SQLite's busy timeout still serialises
        self._shm = None
        if self._lockfile is not None:
            try:
                self._shm = os.open(f"{path}-shm", os.O_RDONLY)
                conn.execute("PRAGMA wal_autocheckpoint = 0")
            except (OSError, sqlite3.Error):
                self._shm = None  # SQLite checkpoints inside commits, as it does by default

    def _open(self, path: Path) -> sqlite3.Connection:
        """A connection in WAL mode to a ledger file (made here when new)."""
        try:
            conn = sqlite3.connect(
                str(path), timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise self._fail(exc, "open") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            if tables and "ledger_meta" not in tables:
                raise LedgerError(
                    f"{path} is an SQLite database but not a jupyter-dua-guard ledger; it was "
                    "left untouched: point --ledger / DUAGuard.ledger_url at a ledger file or a "
                    "new path"
                )
            if not tables:
                self._create(conn)
            else:
                self._check_meta(conn)
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            if mode.lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        except LedgerError:
            conn.close()
            raise
        except (sqlite3.Error, OSError) as exc:
            conn.close()
            raise self._fail(exc, "open") from None
        return conn

    def _create(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                for stmt in _SCHEMA:
                    conn.execute(stmt)
                conn.executemany(
                    "INSERT INTO ledger_meta (key, value) VALUES (?, ?)",
                    [
                        ("format", LEDGER_FORMAT),
                        ("version", LEDGER_VERSION),
                        ("created", events.utc_now()),
                        ("hash", "sha256(prev + '\\n' + canonical_json(body))"),
                    ],
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the file holds the ledger from now on
        self._check_meta(conn)

    def _creation_lock(self) -> int | None:
        """The append lock, held while a new ledger is made (see ``_connect``)."""
        if fcntl is None:
            return None
        try:
            fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return None  # read-only place: nothing is created here anyway
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            return None
        return fd

    def _check_meta(self, conn: sqlite3.Connection) -> None:
        try:
            meta = dict(conn.execute("SELECT key, value FROM ledger_meta"))
        except sqlite3.DatabaseError as exc:
            raise self._fail(exc, "read") from None
        if meta.get("format") != LEDGER_FORMAT:
            raise LedgerError(
                f"{self.path} is an SQLite database but not a jupyter-dua-guard ledger; it was "
                "left untouched: point --ledger / DUAGuard.ledger_url elsewhere"
            )
        if meta.get("version") != LEDGER_VERSION:
            raise LedgerError(
                f"ledger {self.path} has format version {meta.get('version')}, this "
                f"jupyter-dua-guard reads version {LEDGER_VERSION}: upgrade jupyter-dua-guard"
            )

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._conn_obj is None:
            raise LedgerError(f"ledger {self.path} is closed: open it again with open_ledger()")
        if os.getpid() != self._pid:
            # Forked child: SQLite handles must not cross fork. Keep the inherited handle
            # referenced for good, so that it is never closed (or checkpointed) from here.
            _INHERITED.append(self._conn_obj)
            self._connect()
        assert self._conn_obj is not None
        return self._conn_obj

    def close(self) -> None:
        with self._lock:
            if self._appender is not None and os.getpid() == self._appender_pid:
                self._appender.close()
            self._appender = None
            if self._conn_obj is not None and os.getpid() == self._pid:
                self._conn_obj.close()
            self._conn_obj = None
            for fd in (self._lockfile, self._shm):
                if fd is not None and os.getpid() == self._pid:
                    os.close(fd)
            self._lockfile = self._shm = None

    # -- writing
    def _store(self, prepared: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with self._lock:
            conn = self._conn
            appender = self._fast_appender()  # only where the lock file and wal-index are open
            try:
                if appender is not None:
                    events_ = [(e["head"], e["time"]) for e in prepared]
                    chained = appender.append(self._lockfile, events_)
                else:
                    chained = self._append_locked(conn, prepared)
            except sqlite3.Error as exc:
                raise self._fail(exc, "write to") from None
            if self._shm is not None:
                self._checkpoint_if_due(conn)
        return self._stored(chained, prepared)

    def _append_locked(self, conn: sqlite3.Connection, prepared: list[dict[str, Any]]) -> list:
        """The locked part of an append in Python: what ``_chain_fast.Appender`` does in C."""
        locked = False
        try:
            if self._lockfile is not None:
                fcntl.flock(self._lockfile, fcntl.LOCK_EX)
                locked = True
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(
                    "SELECT seq, hash FROM ledger_records ORDER BY seq DESC LIMIT 1"
                ).fetchone()
                seq, prev = row if row else (0, GENESIS)
                chained = self._chain(prepared, seq, prev)
                if len(chained) == 1:  # the usual single event: execute is cheaper
                    conn.execute(_INSERT_SQL, chained[0])
                else:
                    conn.executemany(_INSERT_SQL, chained)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        finally:
            if locked:
                fcntl.flock(self._lockfile, fcntl.LOCK_UN)
        return chained

    def _fast_appender(self) -> Any:
        """The C appender on its own connection (``None``: the Python path appends)."""
        if _chain_fast is None or not hasattr(_chain_fast, "Appender") or self._shm is None:
            return None
        appender = self._appender
        if appender is not None and self._appender_pid == os.getpid():
            return appender
        if appender is not None:
            _INHERITED.append(appender)  # a forked child never closes its parent's handle
        try:
            self._appender = _chain_fast.Appender(
                str(self.path), int(self.timeout * 1000), self.synchronous
            )
        except sqlite3.Error:
            self._appender = None  # e.g. a read-only file: the Python path reports it
        self._appender_pid = os.getpid()
        return self._appender

    def _checkpoint_if_due(self, conn: sqlite3.Connection) -> None:
        """Copy the WAL back into the database once it is long, outside the writers' lock."""
        try:
            header = os.pread(self._shm, _SHM_FRAMES.size, 0)  # type: ignore[arg-type]
            if len(header) == _SHM_FRAMES.size:
                frames, copied = _SHM_FRAMES.unpack(header)
                if frames - copied >= _CHECKPOINT_FRAMES:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except (OSError, sqlite3.Error):
            pass  # a checkpoint is housekeeping: the next writer tries again

    # -- reading
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
        start = parse_time(since)
        if start:
            clauses.append("time >= ?")
            params.append(start)
        if until is not None and until != "":
            is_date = isinstance(until, _dt.date) and not isinstance(until, _dt.datetime)
            is_date = is_date or bool(re.fullmatch(r"\s*\d{4}-\d{2}-\d{2}\s*", str(until)))
            clauses.append("time < ?" if is_date else "time <= ?")
            params.append(parse_time(until, end=True))
        kind_list = self._check_kinds(kinds)
        if kind_list:
            clauses.append(f"kind IN ({', '.join('?' * len(kind_list))})")
            params.extend(kind_list)
        if notebook:
            if any(ch in notebook for ch in "*?["):
                clauses.append("notebook GLOB ?")
            else:
                clauses.append("notebook = ?")
            params.append(notebook)
        for column, value in (("user", user), ("host", host)):
            if value:
                clauses.append(f"{column} GLOB ?" if _is_glob(value) else f"{column} = ?")
                params.append(value)
        return ("WHERE " + " AND ".join(clauses)) if clauses else "", params

    @staticmethod
    def _to_record(seq: int, prev: str, digest: str, body: str) -> dict[str, Any]:
        try:
            event = json.loads(body)
            return {
                "seq": seq,
                "time": event["time"],
                "kind": event["kind"],
                "context": event["context"],
                "data": event["data"],
                "prev": prev,
                "hash": digest,
            }
        except (ValueError, KeyError, TypeError):
            raise LedgerError(
                f"record {seq} is not a readable ledger event (tampered or corrupt): run "
                "`jupyter dua-guard verify` for details"
            ) from None

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
        sort_key = "seq"
        if kinds:
            # SQLite's planner cannot see that a kind is rare and walks the whole table in seq
            # order; when few records match, read them through the index and sort instead.
            probe = f"SELECT count(*) FROM (SELECT 1 FROM ledger_records {where} LIMIT {_RARE})"
            with self._lock:
                try:
                    if self._conn.execute(probe, params).fetchone()[0] < _RARE:
                        sort_key = "+seq"
                except sqlite3.Error as exc:
                    raise self._fail(exc, "read") from None
        page = 1000
        remaining = limit
        last: int | None = None
        while remaining is None or remaining > 0:
            size = page if remaining is None else min(page, remaining)
            clause, args = where, list(params)
            if last is not None:
                cmp = "<" if descending else ">"
                clause = (clause + " AND " if clause else "WHERE ") + f"seq {cmp} ?"
                args.append(last)
            sql = (
                f"SELECT seq, prev, hash, body FROM ledger_records {clause} "
                f"ORDER BY {sort_key} {order} LIMIT ? OFFSET ?"
            )
            args += [size, offset if last is None else 0]
            with self._lock:
                try:
                    rows = self._conn.execute(sql, args).fetchall()
                except sqlite3.Error as exc:
                    raise self._fail(exc, "read") from None
            for row in rows:
                yield self._to_record(*row)
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
        with self._lock:
            try:
                return int(
                    self._conn.execute(
                        f"SELECT count(*) FROM ledger_records {where}", params
                    ).fetchone()[0]
                )
            except sqlite3.Error as exc:
                raise self._fail(exc, "read") from None

    def head(self) -> tuple[int, str]:
        with self._lock:
            try:
                row = self._conn.execute(
                    "SELECT seq, hash FROM ledger_records ORDER BY seq DESC LIMIT 1"
                ).fetchone()
            except sqlite3.Error as exc:
                raise self._fail(exc, "read") from None
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
        if _chain_fast is not None and hasattr(_chain_fast, "tally"):
            return self._tally(where, params)
        # Every section reads up to one head seq (the ledger is append-only, so that is one
        # consistent view) and runs on its own connection: SQLite releases the GIL, so the
        # three grouped passes share the cores with each other and with verification.
        top = self.head()[0]
        where = (where + " AND" if where else "WHERE") + " seq <= ?"
        params = [*params, top]
        cols = ", ".join(_AGG_COLUMNS)
        sets = (
            "group_concat(DISTINCT json_quote(kernel)), "
            "group_concat(DISTINCT json_quote(notebook)) FROM ledger_records"
        )
        queries = {
            # streams along the report index: no sort, one row per group
            "groups": (
                f"SELECT {cols}, min(time), max(time), count(*) FROM ledger_records {where} "
                f"GROUP BY {cols}"
            ),
            # kernels and notebooks per tool / per egress rule / per file, as JSON lists
            "tools": (
                f"SELECT kind, subject, NULL, NULL, {sets} {where} AND kind IN "
                "('ai_ml_import', 'kernel_started') GROUP BY kind, subject"
            ),
            "others": (
                f"SELECT kind, subject, detail, extra, {sets} {where} AND kind IN "
                "('egress_blocked', 'egress_allowed_ai', 'output_flagged', 'data_read', "
                "'model_artifact_written', 'review_signed', 'guard_defaults_used') "
                "GROUP BY kind, subject, detail, extra"
            ),
        }

        def run(sql: str) -> list[tuple]:
            conn = self._reader()
            try:
                return conn.execute(sql, params).fetchall()
            finally:
                conn.close()

        def values(text: str | None) -> set[str]:
            found = set(json.loads(f"[{text}]")) if text else set()
            found.discard(None)
            found.discard("")
            return found

        from concurrent.futures import ThreadPoolExecutor, as_completed

        distinct = []
        kernels: set[str] = set()
        started: set[str] = set()
        notebooks: set[str] = set()
        rows: dict[str, list[tuple]] = {}
        try:
            with ThreadPoolExecutor(max_workers=len(queries)) as pool:
                futures = {pool.submit(run, q): k for k, q in queries.items()}
                for done in as_completed(futures):  # sets are merged while the rest run
                    key = futures[done]
                    rows[key] = done.result()
                    if key == "groups":
                        continue
                    for kind, subject, detail, extra, kernel_list, notebook_list in rows[key]:
                        ks, ns = values(kernel_list), values(notebook_list)
                        notebooks |= ns
                        if kind in ("ai_ml_import", "kernel_started"):
                            kernels |= ks
                        if kind == "kernel_started":
                            started |= ks
                        distinct.append(
                            {"kind": kind, "subject": subject, "detail": detail,
                             "extra": extra, "kernels": len(ks), "notebooks": len(ns)}
                        )  # fmt: skip
        except sqlite3.Error as exc:
            raise self._fail(exc, "read") from None
        return _usage(rows["groups"], distinct, len(kernels), len(started), notebooks)

    def _tally(self, where: str, params: list[Any]) -> dict[str, Any]:
        """``aggregate`` along the report index, counted by the C module in two threads.

        Rows come in index order, so a group or a tool's distinct set never straddles the
        split: AI/ML imports (most of a ledger) on one thread, every other kind on the other.
        """
        from concurrent.futures import ThreadPoolExecutor

        top = self.head()[0]
        where = (where + " AND" if where else "WHERE") + " +seq <= ?"  # +: keep the index
        cols = ", ".join(_AGG_COLUMNS)
        sql = f"SELECT {cols}, kernel, notebook, time FROM ledger_records {where} AND "
        order = f" ORDER BY {cols}"
        imports = [*params, top, events.AI_ML_IMPORT]
        # each a range of the index, taken in index order: NULL kinds sort first
        parts = [
            [(sql + "kind = ?" + order, imports)],
            [
                (sql + "kind IS NULL" + order, [*params, top]),
                (sql + "kind < ?" + order, imports),
                (sql + "kind > ?" + order, imports),
            ],
        ]
        timeout = int(self.timeout * 1000)

        def run(part: list[tuple[str, list[Any]]]) -> tuple:
            return _chain_fast.tally(str(self.path), part, timeout)

        try:
            with ThreadPoolExecutor(max_workers=len(parts)) as pool:
                done = list(pool.map(run, parts))
        except sqlite3.Error as exc:
            raise self._fail(exc, "read") from None
        names = ("kind", "subject", "detail", "extra", "kernels", "notebooks")
        kernels: set[Any] = set()
        started: set[Any] = set()
        notebooks: set[Any] = set()
        for _, _, k, s, n in done:
            kernels.update(k)
            started.update(s)
            notebooks.update(n)
        return _usage(
            [g for part in done for g in part[0]],
            [dict(zip(names, row, strict=True)) for part in done for row in part[1]],
            len(kernels), len(started), notebooks,
        )  # fmt: skip

    # -- verification
    def _reader(self) -> sqlite3.Connection:
        """A separate read connection, so that verification runs beside other work."""
        conn = sqlite3.connect(
            str(self.path), timeout=self.timeout, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        return conn

    def verify(self, head: str | None = None, *, workers: int = 1) -> VerifyResult:
        """Walk the chain; ``workers`` > 1 checks large ledgers in that many processes."""
        pin = _parse_pin(head) if head else None
        self._conn  # noqa: B018 - raises if closed
        try:
            conn = self._reader()
        except sqlite3.Error as exc:
            raise self._fail(exc, "verify") from None
        try:
            return self._verify(conn, pin, head, workers)
        except sqlite3.Error as exc:
            raise self._fail(exc, "verify") from None
        finally:
            conn.close()

    def _result(self, ok: bool, records: int, head: tuple[int, str], **kw: Any) -> VerifyResult:
        if not ok:
            conn = self._reader()
            try:
                records = conn.execute("SELECT count(*) FROM ledger_records").fetchone()[0]
            finally:
                conn.close()
        return VerifyResult(ok, records, head[0], head[1], url=self.url, **kw)

    def _chunks(self, top: int, out: queue.Queue, stop: threading.Event) -> None:
        """Producer: read the chain in chunks (SQLite works without the GIL meanwhile)."""
        try:
            conn = self._reader()
        except sqlite3.Error as exc:
            out.put(exc)
            return
        try:
            last = 0
            while not stop.is_set():
                row = conn.execute(_CHUNK_SQL, (last, top, self.CHUNK)).fetchone()
                out.put(row)
                if not row[3]:
                    return
                last = row[5]
        except sqlite3.Error as exc:
            out.put(exc)
        finally:
            conn.close()

    def _verify(
        self,
        conn: sqlite3.Connection,
        pin: tuple[int | None, str] | None,
        pin_text: str | None,
        workers: int = 1,
    ) -> VerifyResult:
        conn.execute("BEGIN")  # one consistent view of schema, count and head
        try:
            sql = conn.execute(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'ledger_records'"
            ).fetchone()
            if sql is None or _norm_sql(sql[0]) != _norm_sql(_RECORDS_SQL):
                return VerifyResult(
                    False, 0, 0, GENESIS, url=self.url,
                    problem="the records table was removed or altered (its schema is not the "
                    "ledger's)",
                )  # fmt: skip
            # A walk that passes has seen every seq from 1 to the head, so only records
            # below 1 can add to the count (counting all would read the whole report index;
            # a failed walk recounts in _result).
            low = conn.execute("SELECT count(*) FROM ledger_records WHERE seq < 1").fetchone()[0]
            row = conn.execute(
                "SELECT seq, hash FROM ledger_records ORDER BY seq DESC LIMIT 1"
            ).fetchone()
        finally:
            conn.execute("COMMIT")
        head = (int(row[0]), str(row[1])) if row else (0, GENESIS)
        total = head[0] + (low or 0)
        if _chain_fast is not None or (workers > 1 and head[0] >= PARALLEL_MIN):
            return self._verify_parallel(conn, pin, pin_text, total, head, workers)
        chunks: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()
        producer = threading.Thread(target=self._chunks, args=(head[0], chunks, stop), daemon=True)
        producer.start()
        last_seq, last_hash = 0, GENESIS
        try:
            while True:
                item = chunks.get()
                if isinstance(item, Exception):
                    raise item
                if not item[3]:
                    break
                if not _chunk_ok(item, last_seq, last_hash):
                    bad, problem = self._diagnose(conn, last_seq, last_hash)
                    return self._result(False, total, head, bad_seq=bad, problem=problem)
                last_seq, last_hash = item[5], item[1][-64:]
        finally:
            stop.set()
            while producer.is_alive():
                with contextlib.suppress(queue.Empty):
                    chunks.get(timeout=0.05)
        return self._finish(conn, pin, pin_text, total, head, last_seq, last_hash)

    def _finish(
        self,
        conn: sqlite3.Connection,
        pin: tuple[int | None, str] | None,
        pin_text: str | None,
        total: int,
        head: tuple[int, str],
        last_seq: int,
        last_hash: str,
    ) -> VerifyResult:
        if last_seq != head[0] or total != head[0]:
            bad, problem = self._diagnose(conn, last_seq, last_hash)
            return self._result(False, total, head, bad_seq=bad, problem=problem)
        if pin is not None:
            problem = self._check_pin(conn, pin, last_seq, last_hash)
            if problem:
                return self._result(False, total, head, bad_seq=problem[0], problem=problem[1])
        return self._result(True, total, head, pinned=pin_text)

    def _verify_parallel(
        self,
        conn: sqlite3.Connection,
        pin: tuple[int | None, str] | None,
        pin_text: str | None,
        total: int,
        head: tuple[int, str],
        workers: int,
    ) -> VerifyResult:
        """Split the chain into contiguous ranges checked side by side.

        Each range starts from the stored hash of the record before it, which the previous
        range checks, so every link is still verified once. The C walk releases the GIL and
        runs in threads; the Python walk needs worker processes.
        """
        import multiprocessing
        from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

        if head[0] < PARALLEL_MIN:
            workers = 1
        bounds = [head[0] * i // workers for i in range(workers + 1)]
        pool: Executor
        if _chain_fast is not None:
            scan, pool = _scan_range_fast, ThreadPoolExecutor(max_workers=workers)
        else:
            ctx = multiprocessing.get_context("spawn")
            scan, pool = _scan_range, ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        with pool:
            results = list(
                pool.map(
                    scan,
                    [str(self.path)] * workers,
                    [self.timeout] * workers,
                    bounds[:-1],
                    bounds[1:],
                )
            )
        last_seq, last_hash = 0, GENESIS
        for ok, seq, digest in results:
            if not ok:
                if digest:
                    last_seq, last_hash = seq, digest
                bad, problem = self._diagnose(conn, last_seq, last_hash)
                return self._result(False, total, head, bad_seq=bad, problem=problem)
            last_seq, last_hash = seq, digest
        return self._finish(conn, pin, pin_text, total, head, last_seq, last_hash)

    def _check_pin(
        self, conn: sqlite3.Connection, pin: tuple[int | None, str], last_seq: int, last_hash: str
    ) -> tuple[int | None, str] | None:
        seq, digest = pin
        if seq is not None:
            if seq > last_seq:
                return (
                    last_seq + 1,
                    f"missing: the ledger ends at record {last_seq} but the pinned head is "
                    f"record {seq} — records {last_seq + 1}..{seq} were removed (truncated)",
                )
            row = conn.execute("SELECT hash FROM ledger_records WHERE seq = ?", (seq,)).fetchone()
            if row is None or not row[0].startswith(digest):
                return (
                    seq,
                    f"its hash differs from the pinned head {digest[:16]}…: the ledger was "
                    "rewritten from this record on",
                )
            return None
        row = conn.execute(
            "SELECT seq FROM ledger_records WHERE hash >= ? AND hash < ? LIMIT 1",
            (digest, digest + "g"),
        ).fetchone()
        if row is None:
            return (
                last_seq + 1,
                f"the pinned head {digest[:16]}… is not in the ledger, which ends at record "
                f"{last_seq}: records after it were removed (truncated) or the chain rewritten",
            )
        return None

    def _diagnose(self, conn: sqlite3.Connection, start: int, prev_hash: str) -> tuple[int, str]:
        """Name the first bad record after ``start`` and say what is wrong with it (slow path)."""
        rows = conn.execute(
            "SELECT seq, prev, hash, body FROM ledger_records WHERE seq > ? ORDER BY seq",
            (start,),
        ).fetchall()
        return diagnose_rows(rows, start, prev_hash)


def diagnose_rows(rows: list[tuple], start: int, prev_hash: str) -> tuple[int, str]:
    """Name the first bad record among ``(seq, prev, hash, body)`` rows after ``start``.

    Shared by every backend so that a tampered ledger is described alike wherever it lives.
    """

    def body_seq(body: str) -> int | None:
        try:
            value = json.loads(body).get("seq")
        except (ValueError, AttributeError):
            return None
        return value if isinstance(value, int) else None

    expected, last_hash = start + 1, prev_hash
    for i, (seq, prev, digest, body) in enumerate(rows):
        if not isinstance(body, str) or not isinstance(prev, str):
            return seq, "its content is not text (the record was edited)"
        bseq = body_seq(body)
        if record_hash(prev, body) != digest or bseq is None:
            if bseq is not None and bseq != expected:
                return (
                    expected,
                    f"holds the content of record {bseq}, which does not match its stored "
                    "hash: rows were swapped or their contents moved",
                )
            return (
                expected,
                "its content does not match its stored hash (the record was edited or forged)",
            )
        if bseq != expected:
            later = [r[0] for r in rows[i + 1 :] if body_seq(r[3]) == expected]
            if bseq > expected and later:
                return (
                    expected,
                    f"found record {bseq} in its place and record {expected} further on "
                    f"(at position {later[0]}): rows were swapped or reordered",
                )
            if bseq > expected:
                gone = f"{expected}" if bseq == expected + 1 else f"{expected}..{bseq - 1}"
                return (
                    expected,
                    f"missing: after record {expected - 1} comes record {bseq} — record "
                    f"{gone} was deleted",
                )
            if prev == (rows[i - 2][2] if i >= 2 else None) or bseq == expected - 1:
                return (
                    expected - 1,
                    f"was inserted: the original record {bseq} follows it and links to the "
                    f"record before it",
                )
            return (
                bseq,
                f"appears again at position {expected}: rows were reordered or copied",
            )
        if prev != last_hash:
            if expected == 1:
                return 1, "does not start the chain (its prev is not the genesis hash)"
            return (
                expected - 1,
                f"its hash is not the one record {expected} links to: record {expected - 1} "
                "was edited and re-hashed, or replaced by an inserted row",
            )
        if seq != expected:
            return expected, f"is stored under number {seq} (rows were renumbered)"
        expected, last_hash = expected + 1, digest
    return expected, "the chain breaks here (unexpected layout): inspect the ledger"


PARALLEL_MIN = 200_000

_CHUNK_SQL = (
    "SELECT group_concat(m, char(30)), group_concat(hash, ''), group_concat(prev, ''), "
    "count(*), min(seq), max(seq), total(odd) FROM (SELECT prev || char(10) || body AS m, "
    "hash, prev, seq, typeof(prev) != 'text' OR typeof(hash) != 'text' "
    "OR typeof(body) != 'text' AS odd "
    "FROM ledger_records WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?)"
)


def _chunk_ok(item: tuple, last_seq: int, last_hash: str) -> bool:
    """Does a chunk of records (see ``_CHUNK_SQL``) continue the chain after ``last_seq``?"""
    messages, hashes, prevs, n, lo, hi, odd = item
    if not (
        not odd
        and lo == last_seq + 1
        and hi == lo + n - 1
        and len(hashes) == 64 * n
        and prevs == last_hash + hashes[:-64]
    ):
        return False
    parts = messages.encode().split(b"\x1e")
    sha = hashlib.sha256
    return len(parts) == n and "".join([sha(p).hexdigest() for p in parts]) == hashes


def _scan_range(path: str, timeout: float, after: int, top: int) -> tuple[bool, int, str]:
    """Worker: check records ``after+1..top``; ``(ok, last good seq, its hash)``.

    The hash is ``""`` when even the starting record could not be read.
    """
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    try:
        last_hash = _start_hash(conn, after)
        if last_hash is None:
            return False, after, ""
        last_seq = after
        while last_seq < top:
            item = conn.execute(_CHUNK_SQL, (last_seq, top, SQLiteLedger.CHUNK)).fetchone()
            if not item[3] or not _chunk_ok(item, last_seq, last_hash):
                return False, last_seq, last_hash
            last_seq, last_hash = item[5], item[1][-64:]
        return True, last_seq, last_hash
    finally:
        conn.close()


def _start_hash(conn: sqlite3.Connection, after: int) -> str | None:
    """The stored hash a range after ``after`` links to (``None``: that record is gone)."""
    if after == 0:
        return GENESIS
    row = conn.execute("SELECT hash FROM ledger_records WHERE seq = ?", (after,)).fetchone()
    if row is None or not isinstance(row[0], str) or len(row[0]) != 64:
        return None
    return row[0]


def _scan_range_fast(path: str, timeout: float, after: int, top: int) -> tuple[bool, int, str]:
    """``_scan_range`` through the C walk (same answers, a fraction of the time)."""
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    try:
        start = _start_hash(conn, after)
    finally:
        conn.close()
    if start is None:
        return False, after, ""
    return _chain_fast.scan(path, after, top, start, int(timeout * 1000))


# --------------------------------------------------------------------------- opening


def open_ledger(url: str | None = None, *, timeout: float = 30.0, create: bool = True) -> Ledger:
    """Open (creating if new) the ledger at ``url``.

    ``None`` uses ``$JUPYTER_DUA_GUARD_LEDGER``, else the default under the Jupyter data dir.
    Accepted: ``sqlite:////abs/path.sqlite``, ``sqlite:///relative/path.sqlite``, a plain
    file path; ``?synchronous=full`` trades speed for power-loss durability. ``create=False``
    (readers such as ``verify``) refuses to make a new empty ledger at a mistyped path.
    """
    if url is None or url == "":
        url = os.environ.get(events.ENV_LEDGER) or default_ledger_url()
    url = str(url).strip()
    if "://" not in url:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:[^\\/]", url) and not re.match(r"^[A-Za-z]:", url):
            raise LedgerError(
                f"unknown ledger URL {url!r}: use sqlite:////absolute/path/ledger.sqlite"
            )
        return SQLiteLedger(os.path.expanduser(url), url=url, timeout=timeout, create=create)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("postgres", "postgresql"):
        from .ledger_pg import PostgresLedger  # psycopg is only needed for hub ledgers

        return PostgresLedger(url, timeout=timeout, create=create)
    if scheme != "sqlite":
        raise LedgerError(
            f"unknown ledger URL scheme {parts.scheme!r} in {redact_url(url)!r}: use "
            "sqlite:////absolute/path/ledger.sqlite or postgresql://user@host/dbname"
        )
    if parts.netloc not in ("", "localhost"):
        raise LedgerError(
            f"ledger URL {url!r} names a host; SQLite ledgers are local files: use "
            "sqlite:////absolute/path/ledger.sqlite"
        )
    raw = unquote(parts.path)
    if not raw or raw == "/":
        raise LedgerError(f"ledger URL {url!r} has no file path: use sqlite:////abs/ledger.sqlite")
    # sqlite:///rel -> path "/rel" (relative); sqlite:////abs -> "//abs" (absolute)
    path = raw[1:] if raw.startswith("/") else raw
    query = parse_qs(parts.query)
    unknown = set(query) - {"synchronous", "timeout"}
    if unknown:
        raise LedgerError(
            f"unknown ledger URL option(s) {', '.join(sorted(unknown))} in {url!r}: "
            "use synchronous=normal|full or timeout=SECONDS"
        )
    synchronous = query.get("synchronous", ["normal"])[0]
    try:
        timeout = float(query.get("timeout", [timeout])[0])
    except ValueError:
        raise LedgerError(f"ledger URL {url!r}: timeout must be a number of seconds") from None
    return SQLiteLedger(
        os.path.expanduser(path), url=url, timeout=timeout, synchronous=synchronous, create=create
    )
