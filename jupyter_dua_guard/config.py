"""The one place where every jupyter-dua-guard setting lives.

``DUAGuard`` is a plain traitlets ``Configurable`` so that the server extension, the
``jupyter dua-guard`` command line and the kernel-side guard read the same ``c.DUAGuard.*``
settings from ``jupyter_server_config.py/json`` or ``--DUAGuard.x=...`` without importing
the Jupyter server.
"""

import os

from traitlets import Bool, TraitError, Unicode, default
from traitlets.config import Configurable


class SettingsError(ValueError):
    """A ``DUAGuard`` setting that cannot be used; the message names it and the fix."""


class DUAGuard(Configurable):
    """Settings of the NCCR / SEER Data Use Agreement guard."""

    enabled = Bool(
        True,
        help=(
            "Whether the guard is active. Turning it off stops the guard and is reported as "
            "'DUA guard: off' in JupyterLab; the Data Use Agreement still applies."
        ),
    ).tag(config=True)

    ledger_url = Unicode(
        help=(
            "Where the usage ledger (DUA sec. 22 records of AI/ML use) is kept: "
            "sqlite:////absolute/path/ledger.sqlite, or a central PostgreSQL ledger for a hub: "
            "postgresql://writer@dbhost/ledger (password from the URL, ~/.pgpass, PGPASSWORD or "
            "a libpq service file via ?service=NAME; never logged; set it up with `jupyter "
            "dua-guard db init`; ?spool=DIR is where events wait while the database is "
            "unreachable). Defaults to $JUPYTER_DUA_GUARD_LEDGER, else "
            "dua_guard/ledger.sqlite under the Jupyter data dir. `jupyter dua-guard` commands "
            "take --ledger URL to override it."
        ),
    ).tag(config=True)

    @default("ledger_url")
    def _default_ledger_url(self) -> str:
        from .events import ENV_LEDGER
        from .ledger import default_ledger_url

        return os.environ.get(ENV_LEDGER) or default_ledger_url()

    @classmethod
    def load(cls, parent: Configurable) -> "DUAGuard":
        """Read the settings from ``parent``'s configuration, or raise ``SettingsError``."""
        try:
            return cls(parent=parent)
        except TraitError as error:
            raise SettingsError(
                f"jupyter-dua-guard: invalid DUAGuard setting: {error} Fix it in "
                "jupyter_server_config.py/json or on the command line "
                "(`jupyter dua-guard --help-all` lists every setting)."
            ) from None
