"""Shared pytest set-up: real Jupyter servers come from pytest-jupyter's fixtures."""

import pytest

pytest_plugins = ["pytest_jupyter.jupyter_server"]


@pytest.fixture
def ledger_url(tmp_path):
    """A fresh usage-ledger location for each test (absolute path, four slashes)."""
    return f"sqlite:///{tmp_path}/ledger/ledger.sqlite"


@pytest.fixture
def jp_server_config(ledger_url):
    """Load the extension the way an installed copy is loaded: through jpserver_extensions,
    writing its ledger to the test's own file rather than the user's data dir."""
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_dua_guard": True}},
        "DUAGuard": {"ledger_url": ledger_url},
    }
