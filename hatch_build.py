"""Hatch build hook: compile the optional C accelerators in ``jupyter_dua_guard/``.

``_audit_fast.c`` is the kernel guard's audit hook; ``_chain_fast.c`` walks a SQLite ledger's
hash chain (it links the system's libsqlite3 and libcrypto, which Python's own sqlite3 and
hashlib use); ``_pgsurvey_fast.c`` streams a PostgreSQL ledger for a report (libpq);
``_relay_fast.c`` runs the server's append relay loop (libpq, a pthread around epoll). Each
one that fails to build (no compiler, no headers, or ``JUPYTER_DUA_GUARD_NO_C=1``) is left
out and its pure-Python equivalent is used instead.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sysconfig
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

# module name -> (extra compiler and linker arguments, what is used without it)
EXTENSIONS = {
    "_audit_fast": ([], "the pure-Python audit hook"),
    "_chain_fast": (["-lsqlite3", "-lcrypto"], "the Python chain walk"),
    "_pgsurvey_fast": (
        ["-pthread", "-lpq", "-lcrypto"],
        "verification and grouping inside PostgreSQL for reports",
    ),
    "_relay_fast": (["-pthread", "-lpq"], "the append relay's Python loop"),
}
_WITH_LIBPQ = {"_pgsurvey_fast", "_relay_fast"}


def _libpq_include() -> list[str]:
    """libpq's header directory (``pg_config --includedir``; Debian's libpq-dev path)."""
    try:
        out = subprocess.run(
            ["pg_config", "--includedir"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    return [f"-I{out or '/usr/include/postgresql'}"]


class AuditFastBuildHook(BuildHookInterface):
    """Build the C modules in place; mark the wheel platform-specific when one worked."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or os.environ.get("JUPYTER_DUA_GUARD_NO_C"):
            return
        package = os.path.join(self.root, "jupyter_dua_guard")
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        for name, (libs, fallback) in EXTENSIONS.items():
            target = os.path.join(package, name + suffix)
            if name in _WITH_LIBPQ:
                libs = [*_libpq_include(), *libs]
            error = self._compile(os.path.join(package, name + ".c"), target, libs)
            if error:
                self.app.display_warning(
                    f"jupyter-dua-guard: C module {name} not built ({error}); {fallback} "
                    "will be used."
                )
                continue
            if version != "editable":
                build_data["force_include"][target] = f"jupyter_dua_guard/{name}{suffix}"
                build_data["pure_python"] = False
                build_data["infer_tag"] = True

    @staticmethod
    def _compile(source: str, target: str, libs: list[str]) -> str | None:
        if os.name == "nt":
            return "no MSVC build recipe"
        ldshared = sysconfig.get_config_var("LDSHARED") or "cc -shared"
        cmd = [
            *shlex.split(ldshared),
            "-O2",
            "-fPIC",
            f"-I{sysconfig.get_paths()['include']}",
            source,
            "-o",
            target,
            *libs,
        ]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            return str(e)
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            return lines[-1] if lines else "compiler failed"
        return None
