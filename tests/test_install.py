"""What a research-computing admin sees after ``pip install``: both parts enabled and OK."""

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jupyter_dua_guard import __version__

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _jupyter(*args: str) -> str:
    result = subprocess.run(
        ["jupyter", *args], capture_output=True, text=True, timeout=180, check=True
    )
    return ANSI.sub("", result.stdout + result.stderr)


def test_server_extension_enabled_and_ok():
    output = _jupyter("server", "extension", "list")
    assert re.search(r"jupyter_dua_guard\s+enabled", output), output
    assert re.search(rf"jupyter_dua_guard {re.escape(__version__)} OK", output), output


def test_lab_extension_enabled_and_ok():
    output = _jupyter("labextension", "list")
    assert re.search(rf"jupyter-dua-guard v{re.escape(__version__)} enabled\s+OK", output), output


def test_prebuilt_extension_shipped_with_the_package():
    target = Path(sys.prefix, "share", "jupyter", "labextensions", "jupyter-dua-guard")
    package = json.loads((target / "package.json").read_text())
    assert package["name"] == "jupyter-dua-guard"
    assert package["version"] == __version__
    assert list((target / "static").glob("remoteEntry.*.js"))


def test_npm_and_python_versions_agree():
    root = Path(__file__).resolve().parents[1]
    package = json.loads((root / "package.json").read_text())
    assert package["version"] == __version__


@pytest.mark.skipif(
    not os.environ.get("CI") or bool(os.environ.get("JUPYTER_DUA_GUARD_NO_C")),
    reason="only CI's own install (scripts/dev.sh brings the compiler and headers) must have them",
)
@pytest.mark.parametrize("module", ["_audit_fast", "_chain_fast", "_pgsurvey_fast", "_relay_fast"])
def test_c_modules_built_by_the_install(module):
    """A silent fallback to the Python paths would cost the speed the benchmarks promise."""
    importlib.import_module(f"jupyter_dua_guard.{module}")
