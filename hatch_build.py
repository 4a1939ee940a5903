"""Hatch build hook: compile the optional C audit hook (``jupyter_dua_guard/_audit_fast.c``).

Without a working C compiler (or with ``JUPYTER_DUA_GUARD_NO_C=1``) the build goes on as a
pure-Python wheel and the guard uses its Python audit hook instead.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sysconfig
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class AuditFastBuildHook(BuildHookInterface):
    """Build ``_audit_fast`` in place; mark the wheel platform-specific when it worked."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or os.environ.get("JUPYTER_DUA_GUARD_NO_C"):
            return
        package = os.path.join(self.root, "jupyter_dua_guard")
        source = os.path.join(package, "_audit_fast.c")
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        target = os.path.join(package, "_audit_fast" + suffix)
        error = self._compile(source, target)
        if error:
            self.app.display_warning(
                f"jupyter-dua-guard: C audit hook not built ({error}); "
                "the pure-Python hook will be used."
            )
            return
        if version != "editable":
            build_data["force_include"][target] = f"jupyter_dua_guard/_audit_fast{suffix}"
            build_data["pure_python"] = False
            build_data["infer_tag"] = True

    @staticmethod
    def _compile(source: str, target: str) -> str | None:
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
        ]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            return str(e)
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            return lines[-1] if lines else "compiler failed"
        return None
