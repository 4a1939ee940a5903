"""REST handlers of the server extension, all behind Jupyter's authentication."""

import asyncio
import json
import platform
import sys
from typing import Any

import tornado
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin

from ._version import __version__
from .detect import DetectorSettings, detect_output
from .events import DISCLOSURE_DECISION, REVIEW_SIGNED
from .ledger import Ledger, LedgerError, parse_time
from .report import build_report, render_csv, render_html, render_json

#: Finding kinds the detector reports; anything else from the page is dropped.
KNOWN_FINDING_KINDS = ("individual_level", "small_cells", "direct_identifier")

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
                    "ai_extensions": self.extensionapp.ai_extensions,
                    "defence": self.extensionapp.defence,
                    "ai_extensions_actions": self.extensionapp.ai_extension_report,
                }
            )
        )


class EventsHandler(ExtensionHandlerMixin, APIHandler):
    """``GET /dua-guard/api/events``: the ledger's records, filtered and paginated.

    Query: ``since``, ``until``, ``kind`` (repeat or comma-separate), ``notebook``, ``user``,
    ``host``, ``kernel`` (kernel id), ``limit`` (default 100, at most 1000), ``offset``,
    ``order=asc|desc``.
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
            "user": self.get_query_argument("user", None),
            "host": self.get_query_argument("host", None),
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

        kernel = self.get_query_argument("kernel", None)

        def query() -> tuple[list, int]:
            if kernel:
                # Kernel ids live in each record's context; the page asks for one kernel's
                # few guard events, so filtering here is cheap.
                matches = [
                    record
                    for record in ledger.records(**filters, descending=order == "desc")
                    if record["context"].get("kernel_id") == kernel
                ]
                return matches[offset : offset + limit], len(matches)
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


class _LedgerWriter(ExtensionHandlerMixin, APIHandler):
    """Base of the handlers that record what a researcher did in the page."""

    def body(self) -> dict[str, Any]:
        try:
            payload = json.loads(self.request.body or b"{}")
        except ValueError:
            raise tornado.web.HTTPError(400, "the request body must be JSON") from None
        if not isinstance(payload, dict):
            raise tornado.web.HTTPError(400, "the request body must be a JSON object")
        return payload

    def reviewer(self) -> str:
        user = self.current_user
        return getattr(user, "display_name", None) or getattr(user, "username", None) or "unknown"

    async def record(self, kind: str, data: dict[str, Any], notebook: str | None) -> dict:
        try:
            return await self.extensionapp.record(kind, data, {"notebook": notebook})
        except LedgerError as exc:
            raise tornado.web.HTTPError(503, "%s", str(exc)) from None


def _text(payload: dict[str, Any], key: str, limit: int = 2000) -> str:
    value = payload.get(key)
    if not isinstance(value, str) or not value.strip():
        raise tornado.web.HTTPError(400, "%s is required", key)
    return value.strip()[:limit]


def _findings_summary(payload: dict[str, Any]) -> dict[str, int]:
    """Kinds and counts only: the page never sends, and the ledger never keeps, values."""
    summary: dict[str, int] = {}
    for finding in payload.get("findings") or []:
        kind = finding.get("kind") if isinstance(finding, dict) else None
        if isinstance(kind, str) and kind in KNOWN_FINDING_KINDS:
            summary[kind] = summary.get(kind, 0) + 1
    return summary


class ReviewsHandler(_LedgerWriter):
    """``POST /dua-guard/api/reviews``: a reviewer marks one flagged output as reviewed."""

    @tornado.web.authenticated
    async def post(self) -> None:
        payload = self.body()
        path = _text(payload, "path", 4096)
        reason = _text(payload, "reason")
        reviewer = self.reviewer()
        data = {
            "reviewer": reviewer,
            "notebook": path,
            "scope": "output",
            "statement": reason,
            "decision": "approve",
            "cell_id": str(payload.get("cell_id") or "")[:128] or None,
            "output_index": payload.get("output_index")
            if isinstance(payload.get("output_index"), int)
            else None,
            "findings": _findings_summary(payload),
        }
        record = await self.record(REVIEW_SIGNED, data, path)
        self.finish(json.dumps({"reviewer": reviewer, "reason": reason, "time": record["time"]}))


class DecisionsHandler(_LedgerWriter):
    """``POST /dua-guard/api/decisions``: copy or export of flagged outputs, allowed or not."""

    ACTIONS = {"copy": {"copied", "cancelled"}, "export": {"exported", "cancelled"}}

    @tornado.web.authenticated
    async def post(self) -> None:
        payload = self.body()
        action = payload.get("action")
        decision = payload.get("decision")
        if action not in self.ACTIONS or decision not in self.ACTIONS[action]:
            raise tornado.web.HTTPError(
                400, "action must be copy (copied|cancelled) or export (exported|cancelled)"
            )
        path = payload.get("path") if isinstance(payload.get("path"), str) else None
        data = {
            "action": action,
            "decision": decision,
            "notebook": path,
            "command": str(payload.get("command") or "")[:128] or None,
            "flagged_outputs": payload.get("flagged_outputs")
            if isinstance(payload.get("flagged_outputs"), int)
            else None,
            "user": self.reviewer(),
        }
        await self.record(DISCLOSURE_DECISION, data, path)
        self.set_status(201)
        self.finish(json.dumps({"recorded": True}))


class ReportHandler(ExtensionHandlerMixin, APIHandler):
    """``GET /dua-guard/api/report?format=html|json|csv``: the records report to download."""

    RENDERERS = {
        "html": ("text/html; charset=utf-8", render_html),
        "json": ("application/json", render_json),
        "csv": ("text/csv; charset=utf-8", render_csv),
    }

    @tornado.web.authenticated
    async def get(self) -> None:
        fmt = self.get_query_argument("format", "html")
        if fmt not in self.RENDERERS:
            raise tornado.web.HTTPError(400, "format must be html, json or csv")
        since = self.get_query_argument("since", None)
        until = self.get_query_argument("until", None)
        try:
            parse_time(since)
            parse_time(until, end=True)
            ledger = self.extensionapp.ledger()
            report = await asyncio.get_running_loop().run_in_executor(
                None, build_report, ledger, since, until
            )
        except LedgerError as exc:
            raise tornado.web.HTTPError(503, "%s", str(exc)) from None
        content_type, render = self.RENDERERS[fmt]
        self.set_header("Content-Type", content_type)
        self.set_header("Content-Disposition", f'attachment; filename="dua-guard-report.{fmt}"')
        self.finish(render(report))


class DetectHandler(ExtensionHandlerMixin, APIHandler):
    """``POST /dua-guard/api/detect``: the detector for outputs no guarded kernel checked.

    Kernels without the guard (R, Julia, ...) send plain outputs; the page posts them here
    and draws the same banner. The answer holds findings only, never data values.
    """

    @tornado.web.authenticated
    async def post(self) -> None:
        try:
            payload = json.loads(self.request.body or b"{}")
        except ValueError:
            raise tornado.web.HTTPError(400, "the request body must be JSON") from None
        output = payload.get("output") if isinstance(payload, dict) else None
        if not isinstance(output, dict):
            raise tornado.web.HTTPError(400, "send {'output': <an nbformat output>}")
        settings = self.settings.setdefault(
            "dua_guard_detector", DetectorSettings.from_guard(self.extensionapp.guard)
        )
        findings = await asyncio.get_running_loop().run_in_executor(
            None, lambda: detect_output(output, settings=settings)
        )
        self.finish(json.dumps({"findings": [f.to_dict() for f in findings]}))
