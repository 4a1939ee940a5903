"""Server-side export guard: nbconvert asks first when a notebook has unreviewed findings.

The page asks before Download / Export (DUA sec. 17 and 22), but nbconvert URLs can be
opened directly, so the server checks too. An export goes through when the notebook is
clean, when the request carries ``dua_guard_confirm=1`` (the warning page's link), or when
the page recorded an "Export anyway" for this notebook moments before.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import html
from typing import Any

from jupyter_core.utils import ensure_async
from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import path_regex
from jupyter_server.nbconvert.handlers import NbconvertFileHandler
from jupyter_server.utils import url_path_join
from tornado import web
from tornado.routing import HostMatches, Rule

from .detect import DetectorSettings, Finding
from .events import DISCLOSURE_DECISION
from .ledger import LedgerError
from .scan import scan_notebook_node

#: How long an "Export anyway" from the page covers the export request that follows it.
CONFIRMATION_SECONDS = 120


class GuardedNbconvertHandler(NbconvertFileHandler):
    """nbconvert's file handler, behind the DUA guard's check of unreviewed findings."""

    def initialize(self, extension: Any) -> None:
        self.extension = extension

    @web.authenticated
    @authorized
    async def get(self, format: str, path: str) -> None:
        path = path.strip("/")
        guard = self.extension.guard
        if guard.enabled and path.endswith(".ipynb"):
            confirmed = self.get_argument("dua_guard_confirm", None) == "1"
            model = await ensure_async(self.contents_manager.get(path, content=True))
            settings = DetectorSettings.from_guard(guard)
            findings = await asyncio.get_running_loop().run_in_executor(
                None,
                lambda: scan_notebook_node(model["content"], settings=settings, skip_reviewed=True),
            )
            if findings and confirmed:
                await self._record(path, format, len(findings))
            elif findings and not await self._recently_confirmed(path):
                self._refuse(format, path, findings)
                return
        await super().get(format, path)

    async def _record(self, path: str, format: str, flagged: int) -> None:
        user = self.current_user
        data = {
            "action": "export",
            "decision": "exported",
            "notebook": path,
            "command": f"nbconvert:{format}",
            "flagged_outputs": flagged,
            "user": getattr(user, "username", None),
        }
        try:
            await self.extension.record(DISCLOSURE_DECISION, data, {"notebook": path})
        except LedgerError as exc:
            raise web.HTTPError(503, "the export could not be recorded: %s", str(exc)) from None

    async def _recently_confirmed(self, path: str) -> bool:
        since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=CONFIRMATION_SECONDS)

        def search() -> bool:
            ledger = self.extension.ledger()
            return any(
                record["data"].get("action") == "export"
                and record["data"].get("decision") == "exported"
                for record in ledger.records(
                    since=since, kinds=[DISCLOSURE_DECISION], notebook=path
                )
            )

        try:
            return await asyncio.get_running_loop().run_in_executor(None, search)
        except LedgerError:
            return False

    def _refuse(self, format: str, path: str, findings: list[Finding]) -> None:
        """A 409 page that lists the findings (reasons only) and offers to go on."""
        items = "".join(
            f"<li>Cell {f.location.get('cell', 0) + 1}, output {f.location.get('output', 0) + 1}: "
            f"<strong>{html.escape(f.kind.replace('_', ' '))}</strong> — "
            f"{html.escape('; '.join(f.reasons))}</li>"
            for f in findings
        )
        query = dict(self.request.query_arguments)
        query["dua_guard_confirm"] = [b"1"]
        onward = (
            self.request.path
            + "?"
            + "&".join(
                f"{key}={value.decode()}" for key, values in query.items() for value in values
            )
        )
        self.set_status(409)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(
            "<!doctype html><html><head><meta charset='utf-8'>"
            "<title>Unreviewed individual-level outputs</title></head><body>"
            "<h1>Unreviewed individual-level outputs</h1>"
            f"<p>{html.escape(path)} has outputs that the DUA guard flagged and nobody has "
            "reviewed (NCCR DUA sec. 17, 8 and 22). Clear them or have them reviewed in "
            "JupyterLab before the notebook leaves the secure environment.</p>"
            f"<ul>{items}</ul>"
            f"<p><a href='{html.escape(onward)}'>Export as {html.escape(format)} anyway</a> "
            "(recorded in the DUA ledger)</p></body></html>"
        )


def install(extension: Any) -> None:
    """Put the guarded handler in front of nbconvert's own route on this server."""
    web_app = extension.serverapp.web_app
    pattern = url_path_join(
        web_app.settings["base_url"], rf"/nbconvert/(?P<format>\w+){path_regex}"
    )
    router = web_app.default_router
    router.add_rules(
        [Rule(HostMatches(".*$"), [(pattern, GuardedNbconvertHandler, {"extension": extension})])]
    )
    router.rules.insert(0, router.rules.pop())
