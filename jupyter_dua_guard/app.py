"""The Jupyter server extension: loads the ``DUAGuard`` settings and serves the API."""

from jupyter_server.extension.application import ExtensionApp

from ._version import __version__
from .config import DUAGuard, SettingsError
from .handlers import StatusHandler

API_PREFIX = "/dua-guard/api"


class DUAGuardExtension(ExtensionApp):
    """Server side of jupyter-dua-guard, auto-enabled by ``jupyter-config/``."""

    name = "jupyter_dua_guard"
    version = __version__
    load_other_extensions = True

    guard: DUAGuard

    def initialize_settings(self) -> None:
        try:
            self.guard = DUAGuard.load(self)
        except SettingsError as error:
            # Fail closed: a server whose guard settings cannot be read must not start unguarded.
            self.log.critical(str(error))
            raise SystemExit(str(error)) from None
        state = "active" if self.guard.enabled else "OFF (DUAGuard.enabled=False)"
        self.log.info("jupyter-dua-guard %s: guard %s", __version__, state)

    def initialize_handlers(self) -> None:
        self.handlers.extend([(f"{API_PREFIX}/status", StatusHandler)])
