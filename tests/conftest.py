"""Shared pytest set-up: real Jupyter servers come from pytest-jupyter's fixtures."""

import pytest

pytest_plugins = ["pytest_jupyter.jupyter_server"]


@pytest.fixture
def jp_server_config():
    """Load the extension the way an installed copy is loaded: through jpserver_extensions."""
    return {"ServerApp": {"jpserver_extensions": {"jupyter_dua_guard": True}}}
