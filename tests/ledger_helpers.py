"""Test helpers: synthetic events and direct SQLite tampering with a ledger file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from jupyter_dua_guard.ledger import open_ledger, record_hash

TOOLS = [
    ("sklearn", "scikit-learn", "1.5.2", "ml"),
    ("torch", "torch", "2.4.1", "deep-learning"),
    ("xgboost", "xgboost", "2.1.1", "ml"),
    ("openai", "openai", "1.51.0", "llm-client"),
]


def make_ledger(path: Path, n: int = 20) -> list[dict]:
    """A ledger of ``n`` synthetic events; returns the stored records."""
    out = []
    with open_ledger(f"sqlite:///{path}") as ledger:
        for i in range(n):
            name, dist, version, cat = TOOLS[i % len(TOOLS)]
            out.append(
                ledger.append(
                    "ai_ml_import",
                    {"name": name, "distribution": dist, "version": version, "category": cat},
                    {"kernel_id": f"k-{i % 3}", "notebook": f"nb/study-{i % 2}.ipynb"},
                )
            )
    return out


def db(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(str(path), isolation_level=None)


def row(conn: sqlite3.Connection, seq: int) -> tuple[str, str, str]:
    return conn.execute(
        "SELECT prev, hash, body FROM ledger_records WHERE seq = ?", (seq,)
    ).fetchone()


def set_row(conn: sqlite3.Connection, seq: int, prev: str, digest: str, body: str) -> None:
    conn.execute(
        "UPDATE ledger_records SET prev = ?, hash = ?, body = ? WHERE seq = ?",
        (prev, digest, body, seq),
    )


def rehash(prev: str, body: str) -> str:
    return record_hash(prev, body)


def check_writers_once_in_order(url: str, writers: int, n: int) -> None:
    """Writer ``w`` appended versions ``"w.0"``..``"w.(n-1)"``: every one is stored exactly
    once, each writer's in its own order, the chain gap-free and intact."""
    with open_ledger(url) as ledger:
        rows = list(ledger.records())
        versions = [r["data"]["version"] for r in rows]
        assert len(versions) == len(set(versions)) == writers * n  # none lost, none twice
        for wid in range(writers):
            mine = [int(v.split(".")[1]) for v in versions if v.startswith(f"{wid}.")]
            assert mine == list(range(n))  # each writer's order kept
        assert [r["seq"] for r in rows] == list(range(1, writers * n + 1))
        assert ledger.verify().ok
