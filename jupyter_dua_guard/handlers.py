"""REST handlers of the server extension, all behind Jupyter's authentication."""

import json
import platform
import sys

import tornado
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin

from ._version import __version__


class StatusHandler(ExtensionHandlerMixin, APIHandler):
    """``GET /dua-guard/api/status``: what the page shows in its status item."""

    @tornado.web.authenticated
    def get(self) -> None:
        guard = self.extensionapp.guard
        self.finish(
            json.dumps(
                {
                    "version": __version__,
                    "active": guard.enabled,
                    "python": platform.python_version(),
                    "platform": sys.platform,
                }
            )
        )
