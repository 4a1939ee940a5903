"""The Jupyter server extension: loads the ``DUAGuard`` settings and serves the API."""

from __future__ import annotations

import os
from typing import Any

from jupyter_server.extension.application import ExtensionApp
from traitlets import Instance, TraitError

from ._version import __version__
from .config import DUAGuard
from .handlers import StatusHandler

API_PREFIX = "/dua-guard/api"

# The server process can only be guarded once: audit hooks cannot be removed.
_server_guard: dict[str, Any] = {}


class DUAGuardExtension(ExtensionApp):
    """Server side of jupyter-dua-guard, auto-enabled by ``jupyter-config/``."""

    name = "jupyter_dua_guard"
    version = __version__
    load_other_extensions = True

    guard = Instance(DUAGuard, allow_none=True, help="The active DUA guard settings.")

    def initialize_settings(self) -> None:
        try:
            self.guard = DUAGuard(parent=self)
        except TraitError as e:
            # Fail closed: a bad setting must not leave kernels unguarded.
            self.log.error(
                "jupyter-dua-guard: %s. Fix it in jupyter_server_config; until then the "
                "guard runs on its built-in defaults.",
                e,
            )
            self.guard = DUAGuard()
        state = "active" if self.guard.enabled else "OFF (DUAGuard.enabled=False)"
        self.log.info("jupyter-dua-guard %s: guard %s", __version__, state)
        if self.guard.enabled:
            self._start_kernel_guard()

    def initialize_handlers(self) -> None:
        self.handlers.extend([(f"{API_PREFIX}/status", StatusHandler)])

    # ------------------------------------------------------------------ kernel guard

    def ledger_url(self) -> str | None:
        """The ledger kernels write to (None: the ledger's own default location)."""
        return self.guard.ledger_url or os.environ.get("JUPYTER_DUA_GUARD_LEDGER") or None

    def _start_kernel_guard(self) -> None:
        """Write the kernels' policy, make the guard provisioner the default, guard us."""
        from jupyter_client.provisioning.factory import KernelProvisionerFactory

        from . import guard as kernel_guard
        from .policy import Policy, PolicyError, build_policy, load_policy, write_policy
        from .provisioner import PROVISIONER_NAME, register_server_settings

        g = self.guard
        try:
            policy_doc = build_policy(
                blocked_hosts=g.blocked_hosts,
                allowed_hosts=g.allowed_hosts,
                model_servers=g.model_servers,
                packages=g.ai_packages,
                data_paths=g.data_paths,
                mode=g.mode,
                model_artifact_patterns=g.model_artifact_patterns,
                base_dir=os.path.abspath(os.path.expanduser(self.serverapp.root_dir)),
            )
            policy = Policy(policy_doc)
        except (PolicyError, OSError, ValueError) as e:
            self.log.error(
                "jupyter-dua-guard: DUAGuard settings unusable (%s); kernels run on the "
                "built-in AI catalogue until the setting is fixed.",
                e,
            )
            policy = load_policy(None)
            policy_doc = policy.raw
        runtime_dir = self.serverapp.runtime_dir
        path = write_policy(
            policy_doc, os.path.join(runtime_dir, f"jupyter_dua_guard_policy-{os.getpid()}.json")
        )
        ledger_url = self.ledger_url()
        register_server_settings(
            self.serverapp,
            {
                "policy_path": path,
                "ledger_url": ledger_url,
                "mode": policy.mode,
                "recorder": self._make_server_recorder(ledger_url),
            },
        )
        factory = KernelProvisionerFactory.instance(parent=self.serverapp)
        if factory.default_provisioner_name in ("local-provisioner", PROVISIONER_NAME):
            factory.default_provisioner_name = PROVISIONER_NAME
        else:
            self.log.warning(
                "jupyter-dua-guard: KernelProvisionerFactory.default_provisioner_name is %r; "
                "kernels it starts are not guarded. Set it to %r.",
                factory.default_provisioner_name,
                PROVISIONER_NAME,
            )
        self.log.info("jupyter-dua-guard: kernels guarded (mode %s, policy %s)", policy.mode, path)
        if not _server_guard:
            _server_guard.update(
                kernel_guard.install(policy, ledger_url=ledger_url, protect_env=False)
            )
            self.log.info("jupyter-dua-guard: server process guarded (%s hook)", _server_guard)

    def _make_server_recorder(self, ledger_url: str | None) -> Any:
        """``record(kind, data, kernel_id=, notebook=)`` for events the server sees."""
        log = self.log

        def record(
            kind: str,
            data: dict[str, Any],
            kernel_id: str | None = None,
            notebook: str | None = None,
        ) -> None:
            try:
                from .events import current_context
                from .ledger import open_ledger

                context = current_context()
                context["kernel_id"] = kernel_id
                context["notebook"] = notebook
                ledger = open_ledger(ledger_url)
                try:
                    ledger.append(kind, data, context)
                finally:
                    ledger.close()
            except Exception as e:
                log.warning("jupyter-dua-guard: could not record %s: %s", kind, e)

        return record
