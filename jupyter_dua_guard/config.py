"""The one place where every jupyter-dua-guard setting lives.

``DUAGuard`` is a plain traitlets ``Configurable`` so that the server extension, the
``jupyter dua-guard`` command line and (later) the kernel-side guard read the same
``c.DUAGuard.*`` settings from ``jupyter_server_config.py/json`` or ``--DUAGuard.x=...``
without importing the Jupyter server.
"""

from traitlets import Bool
from traitlets.config import Configurable


class DUAGuard(Configurable):
    """Settings of the NCCR / SEER Data Use Agreement guard."""

    enabled = Bool(
        True,
        help=(
            "Whether the guard is active. Turning it off stops the guard and is reported as "
            "'DUA guard: off' in JupyterLab; the Data Use Agreement still applies."
        ),
    ).tag(config=True)
