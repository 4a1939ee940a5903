"""The Jupyter server extension: loads the ``DUAGuard`` settings and serves the API."""

from jupyter_server.extension.application import ExtensionApp
from traitlets import Instance

from ._version import __version__
from .config import DUAGuard
from .handlers import StatusHandler

API_PREFIX = "/dua-guard/api"


class DUAGuardExtension(ExtensionApp):
    """Server side of jupyter-dua-guard, auto-enabled by ``jupyter-config/``."""

    name = "jupyter_dua_guard"
    version = __version__
    load_other_extensions = True

    guard = Instance(DUAGuard, help="The active DUA guard settings.")

    def initialize_settings(self) -> None:
        self.guard = DUAGuard(parent=self)
        state = "active" if self.guard.enabled else "OFF (DUAGuard.enabled=False)"
        self.log.info("jupyter-dua-guard %s: guard %s", __version__, state)

    def initialize_handlers(self) -> None:
        self.handlers.extend([(f"{API_PREFIX}/status", StatusHandler)])
