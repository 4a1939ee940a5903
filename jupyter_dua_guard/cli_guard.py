"""``jupyter dua-guard check-host``: what the kernel guard would do with a destination.

Admins use it to check an allow-list or block-list change before restarting kernels; it
builds the policy from the same ``c.DUAGuard.*`` settings as the server.
"""

from __future__ import annotations

import json
import sys

from jupyter_core.application import JupyterApp
from traitlets import Bool, TraitError

from ._version import __version__
from .config import DUAGuard
from .policy import Decision, PolicyError

_OUTCOME = {
    Decision.BLOCK: "blocked",
    Decision.ALLOW_AI: "allowed, recorded as AI use",
    Decision.ALLOW: "allowed",
}


class CheckHostApp(JupyterApp):
    """Print the guard's decision for each HOST[:PORT] given."""

    name = "jupyter-dua-guard-check-host"
    description = (
        "Show what guarded kernels do with a destination: blocked, allowed and recorded as "
        "AI use, or allowed. Usage: jupyter dua-guard check-host HOST[:PORT] ..."
    )
    version = __version__
    config_file_name = "jupyter_server_config"
    classes = [DUAGuard]
    as_json = Bool(False, help="Print one JSON object per destination.").tag(config=True)
    flags = {"json": ({"CheckHostApp": {"as_json": True}}, "Print JSON lines.")}

    def start(self) -> None:
        if not self.extra_args:
            print(
                "jupyter dua-guard check-host: error: give at least one HOST[:PORT]",
                file=sys.stderr,
            )
            self.exit(2)
        try:
            g = DUAGuard(parent=self)
            policy = g.egress_policy()
        except (PolicyError, TraitError) as e:
            print(f"jupyter dua-guard check-host: error: {e}", file=sys.stderr)
            self.exit(2)
        blocked_any = False
        for target in self.extra_args:
            host, port = _split(target)
            decision, name, reason = policy.decide(host, port)
            blocked_any |= decision == Decision.BLOCK and policy.mode == "block"
            if self.as_json:
                print(
                    json.dumps({"host": name, "port": port, "decision": decision, "reason": reason})
                )
            else:
                outcome = _OUTCOME[decision]
                if decision == Decision.BLOCK and policy.mode == "record":
                    outcome = "allowed and recorded (DUAGuard.mode = 'record')"
                where = f"{name}:{port}" if port is not None else name
                print(f"{where}: {outcome}" + (f" ({reason})" if reason else ""))
        self.exit(1 if blocked_any else 0)


def _split(target: str) -> tuple[str, int | None]:
    if target.startswith("["):  # [IPv6]:port
        host, _, rest = target[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if target.count(":") == 1:
        host, _, port = target.partition(":")
        if port.isdigit():
            return host, int(port)
    return target, None


SUBCOMMANDS: dict[str, tuple[type[JupyterApp], str]] = {
    "check-host": (CheckHostApp, "Show what guarded kernels do with a host (blocked/allowed)."),
}
