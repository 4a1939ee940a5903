"""``jupyter dua-guard``: the command line of the guard, in Jupyter's subcommand style."""

import sys

from jupyter_core.application import JupyterApp

from ._version import __version__
from .cli_db import SUBCOMMANDS as DB_SUBCOMMANDS
from .cli_guard import SUBCOMMANDS as GUARD_SUBCOMMANDS
from .cli_ledger import SUBCOMMANDS as LEDGER_SUBCOMMANDS
from .cli_network import SUBCOMMANDS as NETWORK_SUBCOMMANDS
from .config import DUAGuard, SettingsError


class DUAGuardApp(JupyterApp):
    """Review, verify and report the DUA guard's records."""

    name = "jupyter-dua-guard"
    version = __version__
    description = (
        "jupyter-dua-guard keeps work on NCI SEER / NCCR controlled-access data inside the "
        "Data Use Agreement: it refuses external AI services (sec. 22), records AI/ML use and "
        "flags individual-level outputs (sec. 17/8).\n\n"
        "Settings come from the same jupyter_server_config.py/json files as the server "
        "(c.DUAGuard.*) and from --DUAGuard.<setting>=... on the command line."
    )
    classes = [DUAGuard]
    subcommands: dict = {
        **LEDGER_SUBCOMMANDS,
        **DB_SUBCOMMANDS,
        **GUARD_SUBCOMMANDS,
        **NETWORK_SUBCOMMANDS,
        "scan": (
            "jupyter_dua_guard.scan.ScanApp",
            "Scan notebooks for individual-level outputs and small cells (exit 1 if flagged).",
        ),
        "review": (
            "jupyter_dua_guard.review.ReviewApp",
            "Sign the human review of a notebook's outputs (DUA sec. 22) in the ledger.",
        ),
    }
    guard: DUAGuard

    # Read the server's configuration files so that the command line sees the same settings.
    config_file_name = "jupyter_server_config"

    def initialize(self, argv: list[str] | None = None) -> None:
        super().initialize(argv)
        try:
            self.guard = DUAGuard.load(self)
        except SettingsError as error:
            self.exit_with_error(str(error))

    def exit_with_error(self, message: str, code: int = 2) -> None:
        """Stop with one line on stderr: the problem and its fix, never a traceback."""
        print(message, file=sys.stderr)
        self.exit(code)

    def start(self) -> None:
        if self.subapp is not None:
            self.subapp.start()
            return
        self.print_help()
        if self.subcommands:
            print("Subcommands: " + ", ".join(sorted(self.subcommands)))


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``jupyter-dua-guard``."""
    DUAGuardApp.launch_instance(argv=argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
