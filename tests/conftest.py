"""Shared pytest set-up: real Jupyter servers come from pytest-jupyter's fixtures."""

import pytest

pytest_plugins = ["pytest_jupyter.jupyter_server"]


@pytest.fixture
def ledger_url(tmp_path):
    """A fresh usage-ledger location for each test (absolute path, four slashes)."""
    return f"sqlite:///{tmp_path}/ledger/ledger.sqlite"


@pytest.fixture
def ledger_in_env(ledger_url, monkeypatch):
    """Put ``ledger_url`` where processes started by a test (kernels, tools) look for it."""
    monkeypatch.setenv("JUPYTER_DUA_GUARD_LEDGER", ledger_url)
    return ledger_url


@pytest.fixture
def jp_server_config(ledger_url):
    """Load the extension the way an installed copy is loaded: through jpserver_extensions,
    writing its ledger to the test's own file rather than the user's data dir."""
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_dua_guard": True}},
        "DUAGuard": {"ledger_url": ledger_url},
    }


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL server on loopback for the whole session (Debian's `postgresql`)."""
    from pg_server import start_server

    server = start_server()
    if server is None:
        pytest.skip(
            "PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install postgresql, or "
            "run `bash scripts/dev.sh test`, which installs them"
        )
    yield server
    server.destroy()


@pytest.fixture
def pg_ledger(pg_server, tmp_path):
    """A fresh database set up by `db init`: admin, owner and writer URLs, and a spool dir."""
    from types import SimpleNamespace

    from pg_server import OWNER_PASSWORD, WRITER_PASSWORD

    from jupyter_dua_guard.ledger_pg import db_init

    db = pg_server.create_database()
    db_init(pg_server.url(db=db), owner_password=OWNER_PASSWORD, writer_password=WRITER_PASSWORD)
    spool = tmp_path / "spool"
    return SimpleNamespace(
        server=pg_server,
        db=db,
        spool=spool,
        admin=pg_server.url(db=db),
        owner=pg_server.url("dua_guard_owner", OWNER_PASSWORD, db),
        writer=pg_server.url("dua_guard_writer", WRITER_PASSWORD, db, spool=str(spool)),
    )
