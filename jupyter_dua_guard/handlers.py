"""REST handlers of the server extension, all behind Jupyter's authentication."""

import asyncio
import json
import platform
import sys

import tornado
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin

from ._version import __version__
from .ledger import Ledger, LedgerError, parse_time

MAX_PAGE = 1000


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
                    "defence": self.extensionapp.defence,
                    "ai_extensions_actions": self.extensionapp.ai_extension_report,
                }
            )
        )


class EventsHandler(ExtensionHandlerMixin, APIHandler):
    """``GET /dua-guard/api/events``: the ledger's records, filtered and paginated.

    Query: ``since``, ``until``, ``kind`` (repeat or comma-separate), ``notebook``,
    ``limit`` (default 100, at most 1000), ``offset``, ``order=asc|desc``.
    """

    def _int(self, name: str, default: int, low: int, high: int) -> int:
        raw = self.get_query_argument(name, None)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise tornado.web.HTTPError(400, "%s must be an integer", name) from None
        if not low <= value <= high:
            raise tornado.web.HTTPError(400, "%s must be between %d and %d", name, low, high)
        return value

    @tornado.web.authenticated
    async def get(self) -> None:
        limit = self._int("limit", 100, 1, MAX_PAGE)
        offset = self._int("offset", 0, 0, 2**62)
        order = self.get_query_argument("order", "asc")
        if order not in ("asc", "desc"):
            raise tornado.web.HTTPError(400, "order must be asc or desc")
        filters = {
            "since": self.get_query_argument("since", None),
            "until": self.get_query_argument("until", None),
            "kinds": self.get_query_arguments("kind") or None,
            "notebook": self.get_query_argument("notebook", None),
        }
        try:
            parse_time(filters["since"])
            parse_time(filters["until"], end=True)
            Ledger._check_kinds(filters["kinds"])
        except LedgerError as exc:
            raise tornado.web.HTTPError(400, "%s", str(exc)) from None
        try:
            ledger = self.extensionapp.ledger()
        except LedgerError as exc:
            raise tornado.web.HTTPError(503, "%s", str(exc)) from None

        def query() -> tuple[list, int]:
            rows = list(
                ledger.records(**filters, offset=offset, limit=limit, descending=order == "desc")
            )
            return rows, ledger.count(**filters)

        try:
            rows, total = await asyncio.get_running_loop().run_in_executor(None, query)
        except LedgerError as exc:
            raise tornado.web.HTTPError(503, "%s", str(exc)) from None
        following = offset + len(rows)
        self.finish(
            json.dumps(
                {
                    "events": rows,
                    "total": total,
                    "offset": offset,
                    "limit": limit,
                    "next_offset": following if following < total else None,
                }
            )
        )
