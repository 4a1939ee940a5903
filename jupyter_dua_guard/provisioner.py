"""Kernel provisioner that starts every kernel guarded.

``DUAGuardProvisioner`` is a ``LocalProvisioner`` that adds the guard's environment
variables (policy file, ledger, kernel id, notebook path) to the kernel's environment;
the ``.pth`` start-up file then installs the audit hook before the kernel runs any user
code. The server extension makes it the default provisioner, so users need no special
kernelspec.
"""

from __future__ import annotations

import os
from typing import Any

from jupyter_client.provisioning import LocalProvisioner

from .guard import ENV_KERNEL_ID, ENV_LEDGER, ENV_NOTEBOOK, ENV_POLICY

PROVISIONER_NAME = "dua-guard-provisioner"

#: Attribute the server extension sets on its ServerApp: the guard settings for kernels.
SERVER_ATTRIBUTE = "_dua_guard_kernel_settings"

# The most recently loaded server's settings, for a provisioner whose parent chain does
# not lead to a ServerApp (e.g. a kernel manager created outside the server).
_last_settings: dict[str, Any] = {}


def register_server_settings(serverapp: Any, settings: dict[str, Any]) -> None:
    """Called by the server extension: which policy/ledger its kernels get."""
    setattr(serverapp, SERVER_ATTRIBUTE, dict(settings))
    _last_settings.clear()
    _last_settings.update(settings)


def find_server_settings(obj: Any) -> dict[str, Any]:
    """The guard settings of the server that (indirectly) owns ``obj``."""
    seen = 0
    while obj is not None and seen < 10:
        settings = getattr(obj, SERVER_ATTRIBUTE, None)
        if settings:
            return dict(settings)
        obj = getattr(obj, "parent", None)
        seen += 1
    return dict(_last_settings)


def notebook_path(session_name: str | None, root_dir: str | None) -> str | None:
    """The notebook's API path (relative to the server root), as the ledger's records use.

    Sessions pass the notebook as ``JPY_SESSION_NAME``, an OS path under the root.
    """
    if not session_name:
        return None
    if root_dir and os.path.isabs(session_name):
        rel = os.path.relpath(session_name, root_dir)
        if not rel.startswith(".."):
            return rel.replace(os.sep, "/")
    return session_name


def kernel_guard_env(
    settings: dict[str, Any], kernel_id: str | None, notebook: str | None
) -> dict[str, str]:
    """The environment variables that make a kernel (and its children) guarded."""
    env = {ENV_KERNEL_ID: kernel_id or ""}
    if settings.get("policy_path"):
        env[ENV_POLICY] = str(settings["policy_path"])
    if settings.get("ledger_url"):
        env[ENV_LEDGER] = str(settings["ledger_url"])
    if notebook:
        env[ENV_NOTEBOOK] = notebook
    proxy = settings.get("proxy")
    if proxy and kernel_id:
        from .proxy import proxy_env, proxy_url

        secret = bytes.fromhex(proxy["secret"]) if proxy.get("secret") else None
        env.update(proxy_env(proxy_url(proxy["host"], int(proxy["port"]), kernel_id, secret)))
    return {k: v for k, v in env.items() if v}


#: Loads the output detector in IPython kernels, next to the user's own extensions.
DISPLAY_EXTENSION_ARG = "--InteractiveShellApp.extra_extensions=jupyter_dua_guard.display"


def with_output_check(cmd: list[str]) -> list[str]:
    """An IPython kernel command that also checks every displayed output (DUA sec. 17).

    Only ipykernel understands the option; other kernels' outputs are checked by the
    server's detector when the page shows them.
    """
    if any("ipykernel" in part for part in cmd) and DISPLAY_EXTENSION_ARG not in cmd:
        return [*cmd, DISPLAY_EXTENSION_ARG]
    return cmd


def guard_kernelspecs(factory: Any, mode: str, log: Any) -> None:
    """Make a kernelspec that names another provisioner start guarded, or refuse it.

    ``mode`` is ``"guard"`` (use this provisioner anyway, with a warning) or ``"refuse"``.
    """
    factory._dua_guard_kernelspec_mode = mode  # the latest server's setting wins
    if getattr(factory.create_provisioner_instance, "_dua_guard_wrapped", False):
        return
    original = factory.create_provisioner_instance

    def create_provisioner_instance(kernel_id: str, kernel_spec: Any, parent: Any) -> Any:
        metadata = dict(getattr(kernel_spec, "metadata", None) or {})
        named = (metadata.get("kernel_provisioner") or {}).get("provisioner_name")
        if named and named != PROVISIONER_NAME:
            spec_name = getattr(kernel_spec, "display_name", "") or "this kernel"
            if getattr(factory, "_dua_guard_kernelspec_mode", mode) == "refuse":
                from tornado.web import HTTPError

                # an HTTPError so that the kernels/sessions API shows the message to the user
                raise HTTPError(
                    403,
                    f"jupyter-dua-guard: kernelspec {spec_name!r} asks for provisioner "
                    f"{named!r}, which would run outside the DUA guard; it is refused "
                    "(DUAGuard.kernelspec_provisioners='refuse'). Ask your administrator to "
                    f"remove 'kernel_provisioner' from the kernelspec or use {PROVISIONER_NAME!r}.",
                )
            log.warning(
                "jupyter-dua-guard: kernelspec %r names provisioner %r; starting it with %r "
                "so that it is guarded.",
                spec_name,
                named,
                PROVISIONER_NAME,
            )
            metadata["kernel_provisioner"] = {"provisioner_name": PROVISIONER_NAME}
            kernel_spec.metadata = metadata
        return original(kernel_id, kernel_spec, parent)

    create_provisioner_instance._dua_guard_wrapped = True  # type: ignore[attr-defined]
    factory.create_provisioner_instance = create_provisioner_instance


class DUAGuardProvisioner(LocalProvisioner):  # type: ignore[misc]
    """Local kernels with the DUA guard's environment (see module docstring)."""

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        kwargs = await super().pre_launch(**kwargs)
        env = kwargs.setdefault("env", dict(os.environ))
        settings = find_server_settings(self.parent)
        notebook = notebook_path(env.get("JPY_SESSION_NAME"), settings.get("root_dir"))
        for name in (ENV_POLICY, ENV_NOTEBOOK):
            env.pop(name, None)  # never inherit another kernel's or the server's values
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
            env.pop(name, None)
            env.pop(name.lower(), None)
        env.update(kernel_guard_env(settings, self.kernel_id, notebook))
        kwargs["cmd"] = with_output_check(list(kwargs.get("cmd") or []))
        register = settings.get("proxy_register")
        if register is not None and self.kernel_id:
            register(self.kernel_id, notebook)
        if not settings.get("policy_path"):
            self.log.warning(
                "jupyter-dua-guard: no policy file for kernel %s; it runs on the built-in "
                "AI catalogue (enable the jupyter_dua_guard server extension).",
                self.kernel_id,
            )
        return kwargs
