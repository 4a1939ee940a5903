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
  audit events too). Where the optional C extension ``_audit_fast`` was built, that
  lookup happens in C and Python is entered only for the events the guard handles.
- Recording never breaks the user's code: a ledger failure is reported once on stderr.

No Jupyter imports here: this runs in every guarded interpreter at start-up.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from .policy import Decision, Policy, load_policy

ENV_POLICY = "JUPYTER_DUA_GUARD_POLICY"
ENV_LEDGER = "JUPYTER_DUA_GUARD_LEDGER"
ENV_KERNEL_ID = "JUPYTER_DUA_GUARD_KERNEL_ID"
ENV_NOTEBOOK = "JUPYTER_DUA_GUARD_NOTEBOOK"
GUARD_ENV_VARS = (ENV_POLICY, ENV_LEDGER, ENV_KERNEL_ID, ENV_NOTEBOOK)

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


class GuardTamperError(GuardError):
    """An attempt to switch the guard off from inside a guarded process."""


# Informational only: the hook itself never reads module globals.
_status: dict[str, Any] = {"installed": False}


def status() -> dict[str, Any]:
    """A copy of what the guard in this process is doing (for display only)."""
    return dict(_status)


def _warn_once_factory() -> Callable[[str], None]:
    warned: list[bool] = []

    def warn(message: str) -> None:
        if not warned:
            warned.append(True)
            try:
                sys.stderr.write(f"jupyter-dua-guard: {message}\n")
            except Exception:
                pass

    return warn


def make_recorder(ledger_url: str | None) -> Callable[[str, Mapping[str, Any]], None]:
    """``record(kind, data)`` writing to the ledger lazily, never raising.

    One ledger connection per process and thread (SQLite connections must not cross
    threads or forks); failures are reported once on stderr and otherwise swallowed,
    because the user's code must not break because recording did.
    """
    import _thread

    warn = _warn_once_factory()
    ledgers: dict[tuple[int, int], Any] = {}

    def record(kind: str, data: Mapping[str, Any]) -> None:
        try:
            key = (os.getpid(), _thread.get_ident())
            ledger = ledgers.get(key)
            if ledger is None:
                from .ledger import open_ledger

                ledger = ledgers[key] = open_ledger(ledger_url)
            ledger.append(kind, dict(data))
        except Exception as e:
            ledgers.pop((os.getpid(), _thread.get_ident()), None)
            warn(
                f"could not record a {kind!r} event in the ledger ({type(e).__name__}: {e}); "
                "the guard keeps enforcing the policy. Tell your administrator."
            )

    return record


def _distribution_version(dists: list[str]) -> tuple[str | None, str | None]:
    from importlib import metadata

    for dist in dists:
        try:
            return dist, metadata.version(dist)
        except Exception:
            continue
    return None, None


def _make_handlers(
    policy: Policy,
    record: Callable[[str, Mapping[str, Any]], None],
    protect_env: bool,
    guard_env: Mapping[str, str],
) -> dict[str, Callable[[tuple], None]]:
    """The event name -> handler table closed over the (immutable) policy."""
    import _thread

    get_ident = _thread.get_ident
    fspath = os.fspath
    abspath = os.path.abspath
    basename = os.path.basename
    stat = os.stat
    modules = sys.modules
    mode = policy.mode
    decide = policy.decide
    model_match = policy.model_regex.match if policy.model_regex is not None else None
    data_match = policy.data_regex.match if policy.data_regex is not None else None
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

    by_top: dict[str, list[tuple[str, list[str], str]]] = {}
    for name, entry in policy.packages.items():
        by_top.setdefault(name.partition(".")[0], []).append(
            (name, list(entry["distributions"]), entry["category"])
        )
    seen_packages: set[str] = set()
    missing_tries: dict[str, int] = {}
    seen_ai: set[tuple[str, Any]] = set()
    seen_files: set[str] = set()
    busy: set[int] = set()
    env_str = dict(guard_env)
    env_bytes = {k.encode(): v.encode() for k, v in guard_env.items()}

    def recording(kind: str, data: Mapping[str, Any]) -> None:
        me = get_ident()
        if me in busy:
            return
        busy.add(me)
        try:
            record(kind, data)
        finally:
            busy.discard(me)

    # ---------------------------------------------------------------- network

    def check(host: Any, port: Any, via: str) -> None:
        decision, name, provider = decide(host, port)
        if decision == Decision.ALLOW:
            return
        if not isinstance(port, (int, type(None))):
            port = port.decode() if isinstance(port, bytes) else str(port)
        if decision == Decision.BLOCK and mode == "block":
            recording(
                "egress_blocked",
                {"host": name, "port": port, "provider": provider, "via": via, "mode": mode},
            )
            raise AIEndpointBlocked(name, port, provider)
        key = (name, port)
        if key in seen_ai:
            return
        seen_ai.add(key)
        data = {"host": name, "port": port, "provider": provider, "via": via}
        if decision == Decision.BLOCK:
            data["policy"] = "record-only mode: an AI host the block-list names was allowed"
        recording("egress_allowed_ai", data)

    def on_getaddrinfo(args: tuple) -> None:
        check(args[0], args[1], "socket.getaddrinfo")

    def on_gethostbyname(args: tuple) -> None:
        check(args[0], None, "socket.gethostbyname")

    def on_gethostbyaddr(args: tuple) -> None:
        check(args[0], None, "socket.gethostbyaddr")

    def address_handler(via: str) -> Callable[[tuple], None]:
        def on_address(args: tuple) -> None:
            address = args[1] if len(args) > 1 else None
            if type(address) is tuple and len(address) >= 2:
                check(address[0], address[1], via)

        return on_address

    def on_urllib_request(args: tuple) -> None:
        url = args[0]
        if isinstance(url, str):
            from urllib.parse import urlsplit

            try:
                parts = urlsplit(url)
                host, port = parts.hostname, parts.port
            except ValueError:
                return
            if host:
                check(host, port or (443 if parts.scheme == "https" else 80), "urllib.Request")

    def on_http_connect(args: tuple) -> None:
        conn = args[0]
        tunnel = getattr(conn, "_tunnel_host", None)
        if tunnel:
            check(tunnel, getattr(conn, "_tunnel_port", None), "http.client.connect")
        check(args[1], args[2], "http.client.connect")

    def on_dlsym(args: tuple) -> None:
        name = args[1] if len(args) > 1 else None
        if isinstance(name, bytes):
            name = name.decode("latin-1")
        if mode == "block" and name in _NETWORK_SYMBOLS:
            raise GuardTamperError(
                f"ctypes access to the C function {name}() is refused by jupyter-dua-guard: it "
                "would open network connections outside the guard's checks (NCCR DUA sec. 22). "
                f"{ADMIN_HINT}"
            )

    # ---------------------------------------------------------------- files & imports

    def on_import(args: tuple) -> None:
        name = args[0]
        if type(name) is not str:
            return
        entries = by_top.get(name.partition(".")[0])
        if entries is None:
            return
        for key, dists, category in entries:
            if key in seen_packages or not (name == key or name.startswith(key + ".")):
                continue
            if get_ident() in busy:
                return
            busy.add(get_ident())
            try:
                dist, version = _distribution_version(dists)
            finally:
                busy.discard(get_ident())
            if dist is None:
                # Not installed (an optional-dependency probe) or no metadata: try again a
                # few times in case it gets installed later in this kernel.
                missing_tries[key] = missing_tries.get(key, 0) + 1
                if missing_tries[key] >= 3:
                    seen_packages.add(key)
                continue
            seen_packages.add(key)
            recording(
                "ai_ml_import",
                {
                    "package": key,
                    "module": name,
                    "distribution": dist,
                    "version": version,
                    "category": category,
                },
            )

    def on_open(args: tuple) -> None:
        path, open_mode, flags = args[0], args[1], args[2]
        if type(path) is int or (model_match is None and data_match is None):
            return
        if open_mode is None:
            writing = isinstance(flags, int) and bool(flags & write_flags)
        elif type(open_mode) is str:
            writing = "w" in open_mode or "a" in open_mode or "x" in open_mode or "+" in open_mode
        else:
            return
        if writing:
            if model_match is None:
                return
        elif data_match is None:
            return
        if busy and get_ident() in busy:
            return
        try:
            path = fspath(path)
            if isinstance(path, bytes):
                path = os.fsdecode(path)
        except TypeError:
            return
        if writing:
            name = basename(path)
            if not model_match(name):
                return
            full = abspath(path)
            if name.endswith(".pth") and "-packages" in full:
                return  # a site-packages start-up file written by pip, not a model
            key = "w:" + full
            if key in seen_files:
                return
            seen_files.add(key)
            recording(
                "model_artifact_written",
                {"path": full, "file_name": name, "open_mode": open_mode or "os.open"},
            )
        else:
            full = abspath(path)
            if not data_match(full):
                return
            key = "r:" + full
            if key in seen_files:
                return
            seen_files.add(key)
            try:
                size = stat(full).st_size
            except OSError:
                size = None
            recording("data_read", {"path": full, "size": size})

    # ---------------------------------------------------------------- tamper protection

    def tamper(what: str) -> GuardTamperError:
        return GuardTamperError(
            f"{what} is refused by jupyter-dua-guard: the guard keeps this kernel within "
            "NCCR DUA sec. 22 and cannot be switched off from inside it. If the policy must "
            "change, an administrator edits c.DUAGuard.* in jupyter_server_config."
        )

    def on_putenv(args: tuple) -> None:
        key, value = args[0], args[1]
        expected = env_bytes.get(key) if isinstance(key, bytes) else env_str.get(key)
        if expected is not None and value != expected:
            raise tamper(f"Changing the environment variable {os.fsdecode(key)}")

    def on_unsetenv(args: tuple) -> None:
        key = args[0]
        if (env_bytes if isinstance(key, bytes) else env_str).get(key) is not None:
            raise tamper(f"Removing the environment variable {os.fsdecode(key)}")

    def inject(env: Any, what: str) -> None:
        if env is None or not hasattr(env, "__setitem__"):
            if env is not None:
                raise tamper(f"Starting {what} with a read-only environment mapping")
            return
        try:
            bytes_keys = any(isinstance(k, bytes) for k in env)
            for k, v in (env_bytes if bytes_keys else env_str).items():
                if env.get(k) != v:
                    env[k] = v
        except TypeError as e:
            raise tamper(f"Starting {what} without the guard's environment") from e

    def on_popen(args: tuple) -> None:
        inject(args[3] if len(args) > 3 else None, "a subprocess")

    def on_exec(args: tuple) -> None:
        inject(args[2] if len(args) > 2 else None, "a program")

    def on_spawn(args: tuple) -> None:
        inject(args[3] if len(args) > 3 else None, "a program")

    def on_gc(args: tuple) -> None:
        raise tamper("Walking the object graph with gc.get_objects/get_referrers/get_referents")

    handlers: dict[str, Callable[[tuple], None]] = {
        "socket.getaddrinfo": on_getaddrinfo,
        "socket.gethostbyname": on_gethostbyname,
        "socket.gethostbyaddr": on_gethostbyaddr,
        "socket.connect": address_handler("socket.connect"),
        "socket.sendto": address_handler("socket.sendto"),
        "socket.sendmsg": address_handler("socket.sendmsg"),
        "urllib.Request": on_urllib_request,
        "http.client.connect": on_http_connect,
        "ctypes.dlsym": on_dlsym,
        "import": on_import,
        "open": on_open,
    }
    if protect_env:
        handlers.update(
            {
                "os.putenv": on_putenv,
                "os.unsetenv": on_unsetenv,
                "subprocess.Popen": on_popen,
                "os.exec": on_exec,
                "os.posix_spawn": on_exec,
                "os.spawn": on_spawn,
                "gc.get_objects": on_gc,
                "gc.get_referrers": on_gc,
                "gc.get_referents": on_gc,
            }
        )

    # Catalogued packages loaded before the hook existed (server process, late install).
    for name in list(modules):
        if name.partition(".")[0] in by_top:
            on_import((name,))
    return handlers


def _add_hook(handlers: dict[str, Callable[[tuple], None]]) -> str:
    """Register the audit hook; C fast path when the extension was built."""
    get = handlers.get

    def dispatch(event: str, args: tuple) -> None:
        handler = get(event)
        if handler is not None:
            handler(args)

    try:
        from . import _audit_fast  # type: ignore[attr-defined]
    except ImportError:
        _audit_fast = None
    if _audit_fast is not None:
        try:
            _audit_fast.install(dispatch, tuple(handlers))
            return "c"
        except RuntimeError:
            pass  # already installed by this process: add a Python hook on top

    def hook(event: str, args: tuple) -> None:
        handler = get(event)
        if handler is not None:
            handler(args)

    sys.addaudithook(hook)
    return "python"


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
    if record is None:
        record = make_recorder(ledger_url)
    guard_env = (
        {k: os.environ[k] for k in GUARD_ENV_VARS if os.environ.get(k)} if protect_env else {}
    )
    handlers = _make_handlers(policy, record, protect_env, guard_env)
    hook_kind = _add_hook(handlers)
    if policy.defaults_reason:
        record(
            "guard_defaults_used",
            {"reason": policy.defaults_reason, "mode": policy.mode},
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
            sys.stderr.write(
                f"jupyter-dua-guard: guard start-up failed ({type(e).__name__}: {e}); "
                "enforcing the built-in AI endpoint catalogue only.\n"
            )
            install(load_policy(None), ledger_url=environ.get(ENV_LEDGER) or None)
        except Exception:
            pass
        return True
