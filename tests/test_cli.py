"""``jupyter dua-guard`` follows Jupyter's subcommand conventions."""

import subprocess
import sys

from jupyter_dua_guard import __version__
from jupyter_dua_guard.config import DUAGuard


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["jupyter", "dua-guard", *args], capture_output=True, text=True, timeout=120
    )


def test_version():
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == __version__


def test_help_describes_the_tool():
    result = run("--help")
    assert result.returncode == 0
    assert "Data Use Agreement" in result.stdout


def test_help_all_documents_every_setting():
    result = run("--help-all")
    assert result.returncode == 0
    settings = DUAGuard.class_traits(config=True)
    assert settings, "DUAGuard has no configurable settings"
    for name in settings:
        assert f"--DUAGuard.{name}=" in result.stdout, name


def test_every_setting_has_a_help_string():
    for name, trait in DUAGuard.class_traits(config=True).items():
        assert trait.help and len(trait.help.split()) >= 4, f"DUAGuard.{name} lacks help"


def test_module_entry_point_matches_console_script():
    result = subprocess.run(
        [sys.executable, "-m", "jupyter_dua_guard.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.strip() == __version__


def test_unknown_option_is_reported_without_traceback():
    result = run("--DUAGuard.enabled=maybe")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "invalid DUAGuard setting" in result.stderr
    assert "enabled" in result.stderr
