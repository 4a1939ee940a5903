"""A throw-away PostgreSQL server on loopback for the hub-ledger tests and benchmark.

Debian's ``postgresql`` package provides the binaries (``scripts/dev.sh test`` installs it).
PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres`` user;
otherwise it runs as the current user. Passwords here are synthetic test values.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

ADMIN_PASSWORD = "admin-Secret-1"
WRITER_PASSWORD = "writer-Secret-2"
OWNER_PASSWORD = "owner-Secret-3"


def find_bin() -> Path | None:
    """The directory holding initdb/pg_ctl, or None when PostgreSQL is not installed."""
    env = os.environ.get("DUA_GUARD_PG_BIN")
    candidates = [env] if env else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    found = shutil.which("pg_ctl")
    if found:
        candidates.append(str(Path(found).parent))
    for cand in candidates:
        if cand and (Path(cand) / "initdb").is_file() and (Path(cand) / "pg_ctl").is_file():
            return Path(cand)
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PgServer:
    """initdb + pg_ctl in a temporary directory; scram passwords on 127.0.0.1 only."""

    def __init__(self, bindir: Path, *, fsync: bool = True) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="dua-pg-"))
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.log = self.root / "server.log"
        self.port = free_port()
        self.fsync = fsync
        self._as_postgres = hasattr(os, "geteuid") and os.geteuid() == 0

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)

    def init(self) -> None:
        self.sock.mkdir()
        pwfile = self.root / "pw"
        pwfile.write_text(ADMIN_PASSWORD + "\n")
        if self._as_postgres:
            shutil.chown(self.root, "postgres")
            for item in (self.sock, pwfile):
                shutil.chown(item, "postgres")
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=scram-sha-256",
            f"--pwfile={pwfile}", "-E", "UTF8", "--no-locale", "--no-sync",
        )  # fmt: skip
        pwfile.unlink()
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.sock}'\nmax_connections = 120\n"
                f"fsync = {'on' if self.fsync else 'off'}\n"
            )

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, user: str = "postgres", password: str = ADMIN_PASSWORD, db: str = "postgres",
            **options: str) -> str:  # fmt: skip
        query = "&".join(f"{k}={v}" for k, v in options.items())
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{db}" + (
            "?" + query if query else ""
        )

    def create_database(self) -> str:
        import psycopg

        name = f"ledger_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE \"{name}\" ENCODING 'UTF8' TEMPLATE template0")
        return name


def start_server(fsync: bool = True) -> PgServer | None:
    bindir = find_bin()
    if bindir is None:
        return None
    server = PgServer(bindir, fsync=fsync)
    server.init()
    server.start()
    return server
