"""Kernel side of the guard: a PEP 578 audit hook in every guarded Python process.

The hook refuses connections to external AI services (NCCR DUA sec. 22), records AI/ML
imports with their versions, model artefacts written and Data files read. It is installed
by the ``.pth`` start-up file when the process environment carries the guard's variables
(kernels started by the server, and every Python child of theirs), and by the server
extension for the server process itself.

Why it is built this way:
- An audit hook cannot be removed, and socket/import/open events are raised in C, so
  reloading ``socket`` or replacing Python functions does not get around it.
- All state lives in closures of the hook; this module exposes no switch to turn it off
  and calling :func:`install` again only adds another hook.
- The hot path is one dict lookup on the event name (``builtins.id`` and friends are
  audit events too). Where the optional C extension ``_audit_fast`` was built, the
  filter runs in C (one table load on the name's first byte rejects nearly every
  event) and Python is entered only for the events the guard handles, straight into
  their handler.
- Recording never breaks the user's code: a ledger failure is reported once on stderr.

No Jupyter imports here: this runs in every guarded interpreter at start-up.
"""

from __future__ import annotations

import os
import sys

from .policy import Policy, load_policy

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: typing costs more than the guard at start-up
    from collections.abc import Callable, Mapping
    from typing import Any

ENV_POLICY = "JUPYTER_DUA_GUARD_POLICY"
ENV_LEDGER = "JUPYTER_DUA_GUARD_LEDGER"
ENV_KERNEL_ID = "JUPYTER_DUA_GUARD_KERNEL_ID"
ENV_NOTEBOOK = "JUPYTER_DUA_GUARD_NOTEBOOK"
GUARD_ENV_VARS = (ENV_POLICY, ENV_LEDGER, ENV_KERNEL_ID, ENV_NOTEBOOK)

LEDGER_TIMEOUT = 10.0

ADMIN_HINT = (
    "An administrator can approve a host with c.DUAGuard.allowed_hosts in "
    "jupyter_server_config (then restart the kernel)."
)

#: ctypes symbols that would reach the network behind the audit hook's back.
_NETWORK_SYMBOLS = frozenset(
    {
        "connect",
        "getaddrinfo",
        "getaddrinfo_a",
        "gethostbyname",
        "gethostbyname2",
        "gethostbyname_r",
        "gethostbyname2_r",
        "sendto",
        "sendmsg",
        "sendmmsg",
        "res_query",
        "res_search",
        "res_nquery",
        "res_nsearch",
        "curl_easy_perform",
        "curl_multi_perform",
    }
)


class GuardError(PermissionError):
    """Base class of every refusal by jupyter-dua-guard."""


class AIEndpointBlocked(GuardError):
    """A connection to an external AI service was refused (NCCR DUA sec. 22)."""

    def __reduce__(self) -> tuple[Any, ...]:
        # picklable with its own arguments: multiprocessing sends it back from children
        return (type(self), (self.host, self.port, self.provider))

    def __init__(self, host: str, port: Any, provider: str) -> None:
        where = f"{host}:{port}" if port not in (None, 0, "") else host
        super().__init__(
            f"Connection to {where} blocked by jupyter-dua-guard: {host} is an external AI "
            f"service ({provider}), and NCCR DUA sec. 22 forbids sending case-level data to "
            f"AI services outside the secure environment. {ADMIN_HINT}"
        )
        self.host = host
        self.port = port
        self.provider = provider


class PackageRefused(ImportError):
    """Import of a package whose traffic escapes the socket checks (e.g. gRPC AI SDKs)."""


class GuardTamperError(GuardError):
    """An attempt to switch the guard off from inside a guarded process."""


# Informational only: the hook itself never reads module globals.
_status: dict[str, Any] = {"installed": False}


def status() -> dict[str, Any]:
    """A copy of what the guard in this process is doing (for display only)."""
    return dict(_status)


def _private_module(name: str) -> Any:
    """A fresh copy of one of our modules, not in ``sys.modules``, with its own builtins.

    The hook runs on these copies so that user code patching, reloading or deleting the
    public modules (or rebinding builtins) cannot change a running guard.
    """
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot find {name}")
    return _exec_private(spec)


def _exec_private(spec: Any) -> Any:
    import builtins
    import importlib.util

    module = importlib.util.module_from_spec(spec)
    module.__dict__["__builtins__"] = dict(builtins.__dict__)
    # Registered under a private name only while it executes: dataclasses and typing look
    # the defining module up in sys.modules.
    private_name = f"_jupyter_dua_guard_private_{spec.name.rpartition('.')[2]}_{id(module)}"
    code = spec.loader.get_code(spec.name)
    module.__name__ = private_name
    sys.modules[private_name] = module
    try:
        exec(code, module.__dict__)
    finally:
        sys.modules.pop(private_name, None)
    return module


def _ledger_opener() -> Callable[[str | None], Any]:
    """``open_ledger`` of a private ledger copy, loaded on first use (spec found now)."""
    import importlib.util

    spec = importlib.util.find_spec("jupyter_dua_guard.ledger")
    loaded: list[Any] = []

    def open_ledger(url: str | None) -> Any:
        if not loaded:
            if spec is None or spec.loader is None:
                raise ImportError("jupyter_dua_guard.ledger is not installed")
            loaded.append(_exec_private(spec).open_ledger)
        return loaded[0](url, timeout=LEDGER_TIMEOUT)

    return open_ledger


def install(
    policy: Policy | None = None,
    *,
    ledger_url: str | None = None,
    protect_env: bool = True,
    record: Callable[[str, Mapping[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Install the guard's audit hook in this process and return :func:`status`.

    Hooks cannot be removed: a second call adds a second hook (each can only refuse more),
    so there is no way to weaken a running guard through this function.
    """
    if policy is None:
        policy = load_policy(os.environ.get(ENV_POLICY))
    hook_mod = _private_module("jupyter_dua_guard._hook")
    policy_mod = _private_module("jupyter_dua_guard.policy")
    private_policy = policy_mod.Policy(policy.raw, policy.defaults_reason)
    if record is None:
        record = hook_mod.make_recorder(_ledger_opener(), ledger_url, LEDGER_TIMEOUT)
    guard_env = (
        {k: os.environ[k] for k in GUARD_ENV_VARS if os.environ.get(k)} if protect_env else {}
    )
    handlers = hook_mod.make_handlers(
        private_policy,
        policy_mod.Decision,
        record,
        protect_env,
        guard_env,
        {
            "AIEndpointBlocked": AIEndpointBlocked,
            "GuardTamperError": GuardTamperError,
            "PackageRefused": PackageRefused,
            "network_symbols": _NETWORK_SYMBOLS,
            "admin_hint": ADMIN_HINT,
        },
    )
    try:
        from . import _audit_fast  # type: ignore[attr-defined]
    except ImportError:
        _audit_fast = None
    hook_kind = hook_mod.add_hook(handlers, _audit_fast)
    if policy.defaults_reason:
        record(
            "guard_defaults_used",
            {
                "settings": ["policy"],
                "detail": f"{policy.defaults_reason}: the built-in AI catalogue is enforced, "
                "site settings (allowed hosts, data paths, extra packages) are not",
                "mode": policy.mode,
            },
        )
    _status.update(
        {
            "installed": True,
            "hooks": _status.get("hooks", 0) + 1,
            "hook": hook_kind,
            "mode": policy.mode,
            "defaults_reason": policy.defaults_reason,
            "protect_env": protect_env,
        }
    )
    return status()


def activate_from_environ() -> bool:
    """Called by the ``.pth`` start-up file: guard this process if its env says so.

    Never raises (a failing ``.pth`` line would print a traceback into every process);
    if the normal path fails, the built-in catalogue is enforced as a last resort.
    """
    environ = os.environ
    if not (environ.get(ENV_POLICY) or environ.get(ENV_KERNEL_ID)):
        return False
    if _status.get("installed"):
        return True
    try:
        install(ledger_url=environ.get(ENV_LEDGER) or None, protect_env=True)
        return True
    except Exception as e:
        try:
            _last_resort_hook()
            sys.stderr.write(
                f"jupyter-dua-guard: guard start-up failed ({type(e).__name__}: {e}); only the "
                "built-in AI endpoint catalogue is enforced and nothing is recorded.\n"
            )
        except Exception:
            pass
        return True


def _last_resort_hook() -> None:
    """Fail closed when the normal guard cannot start: refuse catalogued AI hosts, or, if
    even the catalogue cannot be read, every non-loopback destination."""
    try:
        decide = load_policy(None).decide
    except Exception:
        decide = None
    from .policy import is_loopback, normalize_host

    def refuse(host: Any, port: Any) -> None:
        if decide is not None:
            decision, name, provider = decide(host, port)
            if decision == "block":
                raise AIEndpointBlocked(name, port, provider)
            return
        name = normalize_host(host)
        if name and not is_loopback(name):
            raise AIEndpointBlocked(name, port, "guard failed closed: catalogue unavailable")

    def hook(event: str, args: tuple) -> None:
        if event == "socket.getaddrinfo":
            refuse(args[0], args[1])
        elif event == "socket.gethostbyname":
            refuse(args[0], None)
        elif event in ("socket.connect", "socket.sendto") and type(args[1]) is tuple:
            refuse(args[1][0], args[1][1])

    sys.addaudithook(hook)
    _status.update({"installed": True, "hook": "last-resort", "mode": "block"})
