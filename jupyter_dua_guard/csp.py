"""Content-Security-Policy for Jupyter pages: page scripts may only talk to this server.

``connect-src 'self'`` covers HTTP and WebSocket to the page's own origin (CSP level 3),
whatever base URL or reverse proxy serves it, so browser-side assistants and pasted
scripts cannot send data to AI services. Violations are reported to an authenticated
endpoint of ours and recorded in the ledger.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any

import tornado
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from jupyter_server.utils import url_path_join

from .events import CSP_VIOLATION
from .ledger import LedgerError
from .policy import normalize_host

REPORT_PATH = "/dua-guard/api/csp-report"
MAX_REPORT = 64 * 1024


def build_csp(base_url: str, extra_connect: Iterable[str] = ()) -> str:
    """The policy string: Jupyter's default ``frame-ancestors`` plus a strict connect-src."""
    connect = " ".join(["'self'", "data:", "blob:", *extra_connect])
    return "; ".join(
        [
            "frame-ancestors 'self'",
            f"connect-src {connect}",
            "report-uri " + url_path_join(base_url or "/", REPORT_PATH),
        ]
    )


def report_fields(body: Any) -> dict[str, Any]:
    """The parts of a violation report we keep: where and what, never page content."""
    if isinstance(body, list) and body:  # Reporting API format
        body = body[0].get("body", {}) if isinstance(body[0], dict) else {}
    report = body.get("csp-report", body) if isinstance(body, dict) else {}
    if not isinstance(report, dict):
        report = {}
    blocked = str(report.get("blocked-uri") or report.get("blockedURL") or "")[:500]
    host = None
    if "://" in blocked:
        host = normalize_host(blocked.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1])
    directive = report.get("violated-directive") or report.get("effectiveDirective") or ""
    return {
        "blocked_uri": blocked.split("?", 1)[0],
        "host": host,
        "directive": str(directive)[:100],
        "document_uri": str(report.get("document-uri") or report.get("documentURL") or "").split(
            "?", 1
        )[0][:500],
    }


class CSPReportHandler(ExtensionHandlerMixin, APIHandler):
    """``POST /dua-guard/api/csp-report``: record a violation report in the ledger."""

    _track_activity = False

    def skip_check_origin(self) -> bool:
        return True

    def check_xsrf_cookie(self) -> None:
        return

    @tornado.web.authenticated
    async def post(self) -> None:
        if len(self.request.body) > MAX_REPORT:
            raise tornado.web.HTTPError(413, "CSP report too large")
        try:
            body = json.loads(self.request.body or b"{}")
        except ValueError:
            raise tornado.web.HTTPError(400, "CSP report is not JSON") from None
        data = report_fields(body)
        try:
            ledger = self.extensionapp.ledger()
            await asyncio.get_running_loop().run_in_executor(
                None, ledger.append, CSP_VIOLATION, data, {"kernel_id": None}
            )
        except LedgerError as exc:
            raise tornado.web.HTTPError(503, "%s", str(exc)) from None
        self.log.warning("jupyter-dua-guard: CSP violation: %s", data)
        self.set_status(204)
        self.finish()
