"""``jupyter dua-guard db init | upgrade | status | flush``: the central PostgreSQL ledger.

``init`` and ``upgrade`` run once per database as an administrator (``--ledger`` names the
administrator's connection; passwords for the new roles come from environment variables so
that they never show in ``ps`` or shell history). ``flush`` sends spooled events now.
"""

from __future__ import annotations

import os
import sys

from jupyter_core.application import JupyterApp
from traitlets import List, Unicode

from ._version import __version__
from .cli_ledger import _COMMON_ALIASES, LedgerCommand
from .config import DUAGuard, SettingsError
from .ledger import LedgerError, redact_url

ENV_OWNER_PASSWORD = "JUPYTER_DUA_GUARD_OWNER_PASSWORD"
ENV_WRITER_PASSWORD = "JUPYTER_DUA_GUARD_WRITER_PASSWORD"


class _DbCommand(LedgerCommand):
    def url(self) -> str:
        try:
            guard = DUAGuard.load(self)
        except SettingsError as error:
            raise LedgerError(str(error)) from None
        url = guard.ledger_url or ""
        if not url.lower().startswith(("postgresql://", "postgres://")):
            raise LedgerError(
                f"`jupyter dua-guard db {self.command}` manages PostgreSQL ledgers, but the ledger "
                f"is {redact_url(url) or 'not set'}: pass --ledger postgresql://admin@host/dbname "
                "(SQLite ledgers need no set-up)"
            )
        return url


class DbInitApp(_DbCommand):
    """Create the ledger schema, the owner and writer roles, grants and the trigger."""

    name = "jupyter-dua-guard-db-init"
    command = "init"
    description = (
        "Create schema dua_guard in the PostgreSQL database named by --ledger (connect as a "
        "superuser), an owner role and a writer role that may only INSERT and SELECT, and a "
        "trigger refusing UPDATE, DELETE and TRUNCATE. Passwords for the roles (LOGIN) come "
        f"from ${ENV_OWNER_PASSWORD} and ${ENV_WRITER_PASSWORD}; without them the roles are "
        "NOLOGIN groups that hub users' own roles join through --members. Safe to re-run."
    )
    owner_role = Unicode("dua_guard_owner", help="Name of the owner role.").tag(config=True)
    writer_role = Unicode("dua_guard_writer", help="Name of the writer role.").tag(config=True)
    members = List(Unicode(), help="Existing roles (e.g. hub users) granted the writer role.").tag(
        config=True
    )
    aliases = {
        **_COMMON_ALIASES,
        "owner-role": "DbInitApp.owner_role",
        "writer-role": "DbInitApp.writer_role",
        "members": "DbInitApp.members",
    }

    def run(self) -> int:
        from .ledger_pg import db_init

        members = [m.strip() for item in self.members for m in item.split(",") if m.strip()]
        for line in db_init(
            self.url(),
            owner=self.owner_role,
            writer=self.writer_role,
            owner_password=os.environ.get(ENV_OWNER_PASSWORD) or None,
            writer_password=os.environ.get(ENV_WRITER_PASSWORD) or None,
            members=members,
        ):
            print(line)
        return 0


class DbUpgradeApp(_DbCommand):
    """Bring the ledger schema up to this version of jupyter-dua-guard."""

    name = "jupyter-dua-guard-db-upgrade"
    command = "upgrade"
    description = "Upgrade schema dua_guard to the version this jupyter-dua-guard needs."

    def run(self) -> int:
        from .ledger_pg import db_upgrade

        for line in db_upgrade(self.url()):
            print(line)
        return 0


class DbStatusApp(_DbCommand):
    """Schema version and spooled events waiting on this machine."""

    name = "jupyter-dua-guard-db-status"
    command = "status"
    description = "Show the ledger schema version and the spool files waiting on this machine."
    spool = Unicode("", help="Spool directory (default: the one in the URL, else per user).").tag(
        config=True
    )
    aliases = {**_COMMON_ALIASES, "spool": "DbStatusApp.spool"}

    def run(self) -> int:
        from .ledger_pg import db_status, split_url, spool_files

        url = self.url()
        status = db_status(url)
        version = status["schema_version"]
        shown = version if version else "none (run db init)"
        print(
            f"ledger {redact_url(url)}: schema version {shown}, this jupyter-dua-guard needs "
            f"{status['current']}"
        )
        files = spool_files(self.spool or split_url(url)[1].get("spool"))
        print(f"{len(files)} spool file(s) waiting" + "".join(f"\n  {f}" for f in files))
        return 0 if version == status["current"] else 1


class DbFlushApp(_DbCommand):
    """Send spooled events to the database now, in order."""

    name = "jupyter-dua-guard-db-flush"
    command = "flush"
    description = (
        "Send events spooled on this machine while the database was unreachable, in order, "
        "skipping any already stored. Kernels do this themselves when the database returns; "
        "this is for spools of processes that have ended."
    )

    def run(self) -> int:
        from .ledger_pg import PostgresLedger

        ledger = PostgresLedger(self.url(), create=False)
        try:
            n = ledger.flush()
        finally:
            ledger.close()
        print(f"{n} spooled event(s) written to {ledger.url}")
        return 0


class DbApp(JupyterApp):
    """Set up and upgrade the central PostgreSQL ledger."""

    name = "jupyter-dua-guard-db"
    version = __version__
    description = "Set up (init), upgrade, inspect (status) and flush the PostgreSQL ledger."
    subcommands = {
        "init": (DbInitApp, DbInitApp.description.split(". ")[0] + "."),
        "upgrade": (DbUpgradeApp, DbUpgradeApp.description),
        "status": (DbStatusApp, DbStatusApp.description),
        "flush": (DbFlushApp, DbFlushApp.description.split(". ")[0] + "."),
    }

    def start(self) -> None:
        if self.subapp is not None:
            self.subapp.start()
            return
        print("usage: jupyter dua-guard db init|upgrade|status|flush --ledger URL", file=sys.stderr)
        self.exit(2)


SUBCOMMANDS = {"db": (DbApp, DbApp.description)}
