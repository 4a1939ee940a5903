"""The Jupyter server extension: loads the ``DUAGuard`` settings and serves the API."""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
from typing import Any

from jupyter_server.extension.application import ExtensionApp

from . import export_guard
from ._version import __version__
from .ai_extensions import find_ai_extensions
from .config import DUAGuard, SettingsError
from .csp import CSPReportHandler
from .events import KERNEL_STARTED, SCHEMA_ID, SCHEMA_PATH
from .handlers import (
    DecisionsHandler,
    DetectHandler,
    EventsHandler,
    ReportHandler,
    ReviewsHandler,
    StatusHandler,
)
from .ledger import Ledger, LedgerError, open_ledger, redact_url

API_PREFIX = "/dua-guard/api"

# The server process can only be guarded once: audit hooks cannot be removed.
_server_guard: dict[str, Any] = {}


class DUAGuardExtension(ExtensionApp):
    """Server side of jupyter-dua-guard, auto-enabled by ``jupyter-config/``."""

    name = "jupyter_dua_guard"
    version = __version__
    load_other_extensions = True

    guard: DUAGuard
    ai_extensions: list[dict[str, Any]]

    _ledger: Ledger | None = None
    _ledger_lock = threading.Lock()
    proxy: Any = None
    relay: Any = None
    ai_extension_report: list[dict[str, Any]] = []
    defence: dict[str, Any] = {}

    def _link_jupyter_server_extension(self, serverapp: Any) -> None:
        """Linking runs for every extension before any is loaded: the moment to turn off
        AI assistant server extensions (DUA sec. 22) before they start."""
        super()._link_jupyter_server_extension(serverapp)
        try:
            guard = DUAGuard(parent=self)
        except Exception:
            return  # reported as a settings error by initialize_settings
        if guard.enabled:
            self._disable_ai_extensions(serverapp, guard)

    def _disable_ai_extensions(self, serverapp: Any, guard: DUAGuard) -> None:
        from .ai_disable import disable_server_extensions, plan

        found = find_ai_extensions(dict(serverapp.jpserver_extensions))
        report = plan(found, guard.allow_ai_extensions)
        for entry in report:
            disable_server_extensions(serverapp, entry["disabled_server_extensions"], self.log)
        self.ai_extension_report = report

    def initialize_settings(self) -> None:
        self.defence = {}
        try:
            self.guard = DUAGuard.load(self)
        except SettingsError as error:
            # Fail closed: a server whose guard settings cannot be read must not start unguarded.
            self.log.critical(str(error))
            raise SystemExit(str(error)) from None
        state = "active" if self.guard.enabled else "OFF (DUAGuard.enabled=False)"
        self.log.info("jupyter-dua-guard %s: guard %s", __version__, state)
        try:
            ledger = self.ledger()
            self.log.info(
                "jupyter-dua-guard: usage ledger at %s", redact_url(self.guard.ledger_url)
            )
            if getattr(ledger, "last_error", None):
                self.log.warning(
                    "jupyter-dua-guard: ledger database unreachable (%s); events are spooled "
                    "in %s and sent when it returns",
                    ledger.last_error,
                    getattr(ledger, "spool_dir", "the spool directory"),
                )
        except LedgerError as exc:
            self.log.error("jupyter-dua-guard: usage ledger unavailable: %s", exc)
        self._register_event_schema()
        self._watch_kernel_starts()
        self.ai_extensions = self._ai_extensions_now()
        for found in self.ai_extensions:
            if not found["disabled"]:
                self.log.warning(
                    "jupyter-dua-guard: AI assistant %s is installed and active (%s); it runs "
                    "outside the kernel guard (NCCR DUA sec. 22)",
                    found["name"],
                    ", ".join(found["active_server_extensions"] + found["active_lab_extensions"]),
                )
        if self.guard.enabled:
            self._start_kernel_guard()
            self._apply_browser_policy()

    def _ai_extensions_now(self) -> list[dict[str, Any]]:
        """The AI assistants present, after the guard switched off what was not approved."""
        actions = {entry["name"]: entry for entry in self.ai_extension_report}
        disabled_lab = {x for e in self.ai_extension_report for x in e["disabled_lab_extensions"]}
        found = find_ai_extensions(self.serverapp.jpserver_extensions)
        for entry in found:
            entry["active_lab_extensions"] = [
                x for x in entry["active_lab_extensions"] if x not in disabled_lab
            ]
            entry["disabled"] = not (
                entry["active_server_extensions"] or entry["active_lab_extensions"]
            )
            entry["action"] = actions.get(entry["name"], {}).get("action", "none")
        return found

    def _apply_browser_policy(self) -> None:
        """CSP on every page and the page-config hook that disables AI lab plugins."""
        from .ai_disable import page_config_hook
        from .csp import build_csp

        settings = self.serverapp.web_app.settings
        if self.guard.csp_enabled:
            headers = settings.setdefault("headers", {})
            if "Content-Security-Policy" in headers:
                self.log.warning(
                    "jupyter-dua-guard: replacing the site's Content-Security-Policy header "
                    "(set DUAGuard.csp_enabled=False to keep it)"
                )
            headers["Content-Security-Policy"] = build_csp(
                settings.get("base_url", "/"), self.guard.csp_connect_src
            )
            self.defence["csp"] = headers["Content-Security-Policy"]
        lab = [x for e in self.ai_extension_report for x in e["disabled_lab_extensions"]]
        if lab:
            settings["page_config_hook"] = page_config_hook(lab, settings.get("page_config_hook"))

    def _start_proxy(self, policy: Any) -> dict[str, Any] | None:
        """The egress proxy kernels are pointed at (ours, or the site's)."""
        from urllib.parse import urlsplit

        from .proxy import EgressProxy, ledger_recorder, new_secret

        g = self.guard
        if not g.proxy_enabled:
            return None
        secret = None
        if g.proxy_secret_file:
            try:
                with open(os.path.expanduser(g.proxy_secret_file), "rb") as f:
                    secret = f.read().strip()
            except OSError as e:
                raise SystemExit(
                    f"jupyter-dua-guard: cannot read DUAGuard.proxy_secret_file ({e}); fix the "
                    "path or permissions."
                ) from None
        if g.proxy_url:
            parts = urlsplit(g.proxy_url)
            info = {"host": parts.hostname, "port": parts.port or 3128, "external": True}
            if secret:
                info["secret"] = secret.hex()
            return info
        secret = secret or new_secret()
        self.proxy = EgressProxy(
            policy,
            record=ledger_recorder(g.ledger_url or None),
            secret=secret,
            egress_mode=g.egress_mode,
            egress_allowed_hosts=g.egress_allowed_hosts,
            resolve=g.proxy_resolve,
        )
        try:
            port = self.proxy.listen_loopback(g.proxy_port)
        except OSError as e:
            message = (
                f"jupyter-dua-guard: cannot start the egress proxy on 127.0.0.1:{g.proxy_port} "
                f"({e.strerror or e}); set DUAGuard.proxy_port to a free port or 0."
            )
            self.log.critical(message)
            raise SystemExit(message) from None
        self.log.info("jupyter-dua-guard: egress proxy on 127.0.0.1:%d (%s)", port, g.egress_mode)
        return {"host": "127.0.0.1", "port": port, "secret": secret.hex()}

    def _start_kernel_guard(self) -> None:
        """Write the kernels' policy, make the guard provisioner the default, guard us."""
        from jupyter_client.provisioning.factory import KernelProvisionerFactory

        from . import guard as kernel_guard
        from .policy import Policy, PolicyError, build_policy, load_policy, write_policy
        from .provisioner import PROVISIONER_NAME, guard_kernelspecs, register_server_settings

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
                refused_packages=g.refused_packages,
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
        ledger_url = self._start_relay(self.guard.ledger_url or None)
        proxy_info = self._start_proxy(policy)
        register_server_settings(
            self.serverapp,
            {
                "policy_path": path,
                "ledger_url": ledger_url,
                "mode": policy.mode,
                "root_dir": os.path.abspath(os.path.expanduser(self.serverapp.root_dir)),
                "proxy": proxy_info,
                "proxy_register": self.proxy.register_kernel if self.proxy else None,
            },
        )
        self.defence["proxy"] = (
            None
            if proxy_info is None
            else {
                "host": proxy_info["host"],
                "port": proxy_info["port"],
                "external": bool(proxy_info.get("external")),
                "egress_mode": g.egress_mode,
            }
        )
        self.defence["refused_packages"] = sorted(policy.refused)
        self.defence["kernelspec_provisioners"] = g.kernelspec_provisioners
        factory = KernelProvisionerFactory.instance(parent=self.serverapp)
        guard_kernelspecs(factory, g.kernelspec_provisioners, self.log)
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
        self.defence["server_process_guarded"] = bool(_server_guard.get("installed"))

    def _start_relay(self, ledger_url: str | None) -> str | None:
        """Start the append relay for a PostgreSQL ledger; the URL kernels should use."""
        if not ledger_url or not self.guard.ledger_relay:
            return ledger_url
        from urllib.parse import urlsplit

        if urlsplit(ledger_url).scheme.lower() not in ("postgres", "postgresql"):
            return ledger_url
        from .ledger_relay import LedgerRelay, relay_url

        name = f"jupyter_dua_guard_relay-{os.getpid()}.sock"
        path = os.path.join(self.serverapp.runtime_dir, name)
        if len(path.encode()) > 100:  # beyond what a Unix socket address can hold
            import tempfile

            path = os.path.join(tempfile.mkdtemp(prefix="dua-guard-relay-"), name)
        try:
            self.relay = LedgerRelay(
                ledger_url, path, self.guard.ledger_relay_connections, log=self.log
            )
        except (LedgerError, OSError) as exc:
            self.log.warning(
                "jupyter-dua-guard: append relay not started (%s); kernels write to the ledger "
                "database directly",
                exc,
            )
            return ledger_url
        self.defence["ledger_relay"] = path
        self.log.info("jupyter-dua-guard: kernels append to the ledger through %s", path)
        return relay_url(ledger_url, path)

    def _register_event_schema(self) -> None:
        """Let jupyter_events listeners see the ledger's records as they are written."""
        logger = getattr(self.serverapp, "event_logger", None)
        if logger is None:
            return
        try:
            logger.register_event_schema(SCHEMA_PATH)
        except Exception as exc:  # a listener is a nicety; the ledger is the record
            self.log.warning("jupyter-dua-guard: event schema not registered: %s", exc)

    def initialize_handlers(self) -> None:
        self.handlers.extend(
            [
                (f"{API_PREFIX}/status", StatusHandler),
                (f"{API_PREFIX}/events", EventsHandler),
                (f"{API_PREFIX}/report", ReportHandler),
                (f"{API_PREFIX}/reviews", ReviewsHandler),
                (f"{API_PREFIX}/decisions", DecisionsHandler),
                (f"{API_PREFIX}/detect", DetectHandler),
                (f"{API_PREFIX}/csp-report", CSPReportHandler),
            ]
        )
        export_guard.install(self)

    def ledger(self) -> Ledger:
        """The server's ledger connection, opened on first use (raises ``LedgerError``)."""
        with self._ledger_lock:
            if self._ledger is None:
                self._ledger = open_ledger(self.guard.ledger_url)
            return self._ledger

    async def record(
        self, kind: str, data: dict[str, Any], context: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Append one event without blocking the server's event loop (raises ``LedgerError``)."""
        ledger = self.ledger()
        return await asyncio.get_running_loop().run_in_executor(
            None, ledger.append, kind, data, context
        )

    async def stop_extension(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        with self._ledger_lock:
            if self._ledger is not None:
                self._ledger.close()
                self._ledger = None

    # -- kernel_started
    def _watch_kernel_starts(self) -> None:
        """Record every new kernel, however it is started (kernels API, sessions API).

        The kernel manager's ``start_kernel`` is the one place that sees both the new kernel
        id and the notebook path, so it is wrapped on this server's instance; the kernel-side
        guard records what happens inside the kernel.
        """
        km = getattr(self.serverapp, "kernel_manager", None)
        if km is None or getattr(km.start_kernel, "_dua_guard_wrapped", False):
            return
        original = km.start_kernel
        extension = self

        async def start_kernel(*args: Any, **kwargs: Any) -> str:
            requested = kwargs.get("kernel_id")
            is_new = requested is None or requested not in km
            result = original(*args, **kwargs)
            kernel_id = await result if inspect.isawaitable(result) else result
            if is_new:
                await extension._record_kernel_started(km, kernel_id, kwargs)
            return kernel_id

        start_kernel._dua_guard_wrapped = True  # type: ignore[attr-defined]
        km.start_kernel = start_kernel

    @staticmethod
    def _notebook_path(km: Any, kwargs: dict) -> str | None:
        """The notebook's API path: sessions pass its directory as ``path`` and the notebook
        itself as ``JPY_SESSION_NAME`` (an OS path under the server root)."""
        env = kwargs.get("env") or {}
        name = env.get("JPY_SESSION_NAME") or kwargs.get("path") or None
        if name and os.path.isabs(name):
            root = os.path.abspath(getattr(km, "root_dir", "") or os.getcwd())
            rel = os.path.relpath(name, root)
            if not rel.startswith(".."):
                name = rel.replace(os.sep, "/")
        return name

    async def _record_kernel_started(self, km: Any, kernel_id: str, kwargs: dict) -> None:
        if not self.guard.enabled:
            return
        notebook = self._notebook_path(km, kwargs)
        try:
            kernel_name = km.get_kernel(kernel_id).kernel_name
        except Exception:
            kernel_name = kwargs.get("kernel_name")
        data = {"kernel_id": kernel_id, "kernel_name": kernel_name, "notebook": notebook}
        context = {"kernel_id": kernel_id, "notebook": notebook}
        try:
            record = await self.record(KERNEL_STARTED, data, context)
        except LedgerError as exc:
            self.log.error("jupyter-dua-guard: could not record kernel %s: %s", kernel_id, exc)
            return
        logger = getattr(self.serverapp, "event_logger", None)
        if logger is not None and SCHEMA_ID in logger.schemas.schema_ids:
            try:
                logger.emit(schema_id=SCHEMA_ID, data=record)
            except Exception as exc:
                self.log.warning("jupyter-dua-guard: event not emitted: %s", exc)
