"""Shared pytest set-up: jupyter_server fixtures (jp_fetch, jp_serverapp, ...)."""

pytest_plugins = ["pytest_jupyter.jupyter_server"]
