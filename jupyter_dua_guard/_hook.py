"""Hot path of the guard's audit hook; loaded as a *private copy* by ``guard.install``.

``guard.install`` executes this file into a fresh module object that is not in
``sys.modules`` and has its own snapshot of builtins, and hands it a private copy of
``policy`` too. Patching or reloading the public ``jupyter_dua_guard.*`` modules, or
rebinding builtins, therefore does not change what a running hook does. Nothing here
imports the package; everything the handlers need is bound into closures at install.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: typing costs more than the guard at start-up
    from collections.abc import Callable, Mapping
    from typing import Any


def _warn_once_factory() -> Callable[[str], None]:
    warned: list[bool] = []

    def warn(message: str) -> None:
        if not warned:
            warned.append(True)
            try:  # noqa: SIM105 - contextlib costs start-up time in every guarded process
                sys.stderr.write(f"jupyter-dua-guard: {message}\n")
            except Exception:
                pass

    return warn


def make_recorder(
    open_ledger: Callable[[str | None], Any], ledger_url: str | None, wait: float = 10.0
) -> Callable[[str, Mapping[str, Any]], None]:
    """``record(kind, data)``: write to the ledger, never raising, never hanging.

    A writer thread per process (started on first use, again after a fork) owns the
    ledger; ``record`` hands it the event and waits at most ``wait`` seconds for the
    write, so a ledger locked by a stuck process delays the kernel but cannot hang it.
    Failures are reported once on stderr and otherwise swallowed: the user's code must
    not break because recording did.
    """
    import _queue
    import _thread

    # Imported here, at install time in the main thread: a first import of threading in
    # another thread makes that thread "main" and the interpreter then waits for it at exit.
    import threading

    warn = _warn_once_factory()
    state: dict[str, Any] = {"pid": None, "queue": None, "writer": None}
    start_lock = _thread.allocate_lock()

    def writer(queue: Any) -> None:
        state["writer"] = _thread.get_ident()
        ledger = None
        while True:
            kind, data, done = queue.get()
            try:
                if ledger is None:
                    ledger = open_ledger(ledger_url)
                ledger.append(kind, data)
            except Exception as e:
                ledger = None
                warn(
                    f"could not record a {kind!r} event in the ledger ({type(e).__name__}: "
                    f"{e}); the guard keeps enforcing the policy. Tell your administrator."
                )
            finally:
                done.release()

    def record(kind: str, data: Mapping[str, Any]) -> None:
        try:
            if _thread.get_ident() == state["writer"]:
                return  # the writer's own file and import activity
            pid = os.getpid()
            with start_lock:
                if state["pid"] != pid:  # first use, or a forked child without the thread
                    state["pid"], state["queue"], state["writer"] = pid, _queue.SimpleQueue(), None
                    threading.Thread(
                        target=writer,
                        args=(state["queue"],),
                        name="jupyter-dua-guard-ledger",
                        daemon=True,
                    ).start()
            done = _thread.allocate_lock()
            done.acquire()
            state["queue"].put((kind, dict(data), done))
            if not done.acquire(True, wait):
                warn(
                    f"the ledger did not take a {kind!r} event within {wait:g} s (locked by "
                    "another process?); it is written when the ledger frees up. The guard "
                    "keeps enforcing the policy."
                )
        except Exception as e:
            warn(f"could not record a {kind!r} event ({type(e).__name__}: {e})")

    return record


def _distribution_version(dists: list[str]) -> tuple[str | None, str | None]:
    from importlib import metadata

    for dist in dists:
        try:
            return dist, metadata.version(dist)
        except Exception:
            continue
    return None, None


def make_handlers(
    policy: Any,
    decisions: Any,
    record: Callable[[str, Mapping[str, Any]], None],
    protect_env: bool,
    guard_env: Mapping[str, str],
    errors: Mapping[str, Any],
) -> dict[str, Callable[[tuple], None]]:
    """The event name -> handler table, closed over a private policy copy."""
    import _thread

    AIEndpointBlocked = errors["AIEndpointBlocked"]
    GuardTamperError = errors["GuardTamperError"]
    network_symbols = errors["network_symbols"]
    admin_hint = errors["admin_hint"]
    ALLOW = decisions.ALLOW
    BLOCK = decisions.BLOCK
    fsdecode = os.fsdecode

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
    refused_top: dict[str, list[tuple[str, str]]] = {}
    for name, reason in getattr(policy, "refused", {}).items():
        refused_top.setdefault(name.partition(".")[0], []).append((name, reason))
    PackageRefused = errors.get("PackageRefused", ImportError)
    seen_packages: set[str] = set()
    missing_tries: dict[str, int] = {}
    seen_ai: set[tuple[str, Any]] = set()
    seen_files: set[str] = set()
    busy: set[int] = set()
    # Threads running code the user may control (``__fspath__``, mapping methods, ...)
    # from inside a handler; frame introspection is refused there so that the handler's
    # locals cannot be reached and edited.
    inside: set[int] = set()
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
        if decision == ALLOW:
            return
        if not isinstance(port, (int, type(None))):
            port = port.decode() if isinstance(port, bytes) else str(port)
        if decision == BLOCK and mode == "block":
            recording(
                "egress_blocked",
                {
                    "host": name,
                    "port": port,
                    "rule": "DUAGuard.blocked_hosts"
                    if provider == "site block-list"
                    else f"AI endpoint catalogue: {provider}",
                    "provider": provider,
                    "via": via,
                },
            )
            raise AIEndpointBlocked(name, port, provider)
        key = (name, port)
        if key in seen_ai:
            return
        seen_ai.add(key)
        data = {"host": name, "port": port, "provider": provider, "via": via}
        if decision == BLOCK:
            data["rule"] = f"record-only mode (DUAGuard.mode='record'): {provider}"
        elif "allow-listed" in provider:
            data["rule"] = "DUAGuard.allowed_hosts"
        else:
            data["rule"] = f"local or approved model server: {provider}"
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

            url = str.__str__(url)  # a str subclass must not run its own methods here

            try:
                parts = urlsplit(url)
                host, port = parts.hostname, parts.port
            except ValueError:
                return
            if host:
                check(host, port or (443 if parts.scheme == "https" else 80), "urllib.Request")

    def on_http_connect(args: tuple) -> None:
        conn = args[0]
        me = get_ident()
        inside.add(me)
        try:
            tunnel = getattr(conn, "_tunnel_host", None)
            tunnel_port = getattr(conn, "_tunnel_port", None)
        finally:
            inside.discard(me)
        if tunnel:
            check(tunnel, tunnel_port, "http.client.connect")
        check(args[1], args[2], "http.client.connect")

    def on_dlsym(args: tuple) -> None:
        name = args[1] if len(args) > 1 else None
        if isinstance(name, bytes):
            name = name.decode("latin-1")
        if mode == "block" and name in network_symbols:
            raise GuardTamperError(
                f"ctypes access to the C function {name}() is refused by jupyter-dua-guard: it "
                "would open network connections outside the guard's checks (NCCR DUA sec. 22). "
                f"{admin_hint}"
            )

    # ---------------------------------------------------------------- files & imports

    def on_import(args: tuple, refuse: bool = True) -> None:
        name = args[0]
        if type(name) is not str:
            return
        top = name.partition(".")[0]
        if refuse and top in refused_top:
            for key, reason in refused_top[top]:
                if name == key or name.startswith(key + "."):
                    recording(
                        "egress_blocked",
                        {"host": "", "port": None, "rule": f"import {key} refused: {reason}"},
                    )
                    raise PackageRefused(
                        f"jupyter-dua-guard: import of {key!r} refused: {reason} "
                        "(NCCR DUA sec. 22). The refusal was recorded. An administrator "
                        "can allow it by removing it from c.DUAGuard.refused_packages.",
                        name=name,
                    )
        entries = by_top.get(top)
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
                    "name": key,
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
        if type(path) is not str:
            me = get_ident()
            inside.add(me)
            try:
                path = fspath(path)
                path = fsdecode(path) if isinstance(path, bytes) else str.__str__(path)
            except TypeError:
                return
            finally:
                inside.discard(me)
        if writing:
            name = basename(path)
            if not model_match(name):
                return
            full = abspath(path)
            if name.endswith(".pth") and "-packages" in full:
                return  # a site-packages start-up file written by pip, not a model
            if name.lower().endswith((".pkl", ".pickle")) and "/.cache/" in full:
                return  # tool caches (parso, joblib.Memory), not models
            key = "w:" + full
            if key in seen_files:
                return
            seen_files.add(key)
            recording(
                "model_artifact_written",
                {
                    "path": full,
                    "size": None,
                    "format": name.rpartition(".")[2].lower() if "." in name else "",
                    "open_mode": open_mode or "os.open",
                },
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
            base = basename(full)
            recording(
                "data_read",
                {
                    "path": full,
                    "size": size,
                    "format": base.rpartition(".")[2].lower() if "." in base else "",
                },
            )

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
            raise tamper(f"Changing the environment variable {fsdecode(key)}")

    def on_unsetenv(args: tuple) -> None:
        key = args[0]
        if (env_bytes if isinstance(key, bytes) else env_str).get(key) is not None:
            raise tamper(f"Removing the environment variable {fsdecode(key)}")

    def inject(env: Any, what: str) -> None:
        if env is None:
            return
        me = get_ident()
        inside.add(me)
        failed = False
        try:
            bytes_keys = any(isinstance(k, bytes) for k in env)
            for k, v in (env_bytes if bytes_keys else env_str).items():
                if env.get(k) != v:
                    env[k] = v
        except Exception:
            failed = True
        finally:
            inside.discard(me)
        if failed:
            raise tamper(f"Starting {what} with an environment the guard cannot add itself to")

    def on_frames(args: tuple) -> None:
        if inside and get_ident() in inside:
            raise tamper("Inspecting the guard's frames")

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
                "sys._getframe": on_frames,
                "sys._current_frames": on_frames,
            }
        )

    # Catalogued packages loaded before the hook existed (server process, late install).
    for name in list(modules):
        if name.partition(".")[0] in by_top:
            on_import((name,), False)
    return handlers


def add_hook(handlers: dict[str, Callable[[tuple], None]], audit_fast: Any) -> str:
    """Register the audit hook; C fast path when the extension was built.

    The C hook matches the event name itself and calls the handler directly, so Python
    is entered only for the events in ``handlers``. An extension built from an older
    source (no ``install_handlers``) is not used: the Python hook behaves the same.
    """
    get = handlers.get
    install_c = getattr(audit_fast, "install_handlers", None)
    if install_c is not None:
        try:
            install_c(tuple(handlers.values()), tuple(handlers))
            return "c"
        except RuntimeError:
            pass  # already installed by this process: add a Python hook on top

    def hook(event: str, args: tuple) -> None:
        handler = get(event)
        if handler is not None:
            handler(args)

    sys.addaudithook(hook)
    return "python"
