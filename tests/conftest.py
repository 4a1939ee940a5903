"""Shared fixtures: a real Jupyter server (pytest-jupyter) writing to a temporary ledger."""

import pytest

pytest_plugins = ["pytest_jupyter.jupyter_server"]


@pytest.fixture
def ledger_url(tmp_path):
    """A fresh ledger location (absolute path, four slashes)."""
    return f"sqlite:///{tmp_path}/ledger/ledger.sqlite"


@pytest.fixture
def jp_server_config(ledger_url):
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_dua_guard": True}},
        "DUAGuard": {"ledger_url": ledger_url},
    }
