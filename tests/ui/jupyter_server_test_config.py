"""Server used by the browser tests: Galata's test settings, runnable as root (CI is root)."""

from tempfile import mkdtemp

from jupyterlab.galata import configure_jupyter_server

configure_jupyter_server(c)  # noqa: F821 - `c` is injected by Jupyter's config loader
c.ServerApp.allow_root = True  # noqa: F821
c.ServerApp.ip = "127.0.0.1"  # noqa: F821
# Each run writes its own ledger, never the user's.
c.DUAGuard.ledger_url = f"sqlite:///{mkdtemp(prefix='dua-guard-ui-')}/ledger.sqlite"  # noqa: F821
