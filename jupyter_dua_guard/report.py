"""The records package for an NIH request (DUA sec. 22), built from the ledger.

The ledger backend supplies the usage figures together with the chain's verification
(``Ledger.survey``: both read the whole ledger; with the C modules SQLite tallies the figures
along its report index beside the chain walk, and a PostgreSQL ledger's records are streamed
out, checked and tallied in one pass; otherwise the database groups them), so events are
never read one by one in Python. The report closes with the verification result and head hash,
which lets a later ``verify --head`` detect truncation.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import events
from ._version import __version__
from .ledger import Ledger


def artifact_status(path: str | None, host: str | None, size: Any = None) -> str:
    """Whether a recorded model file still exists: present, gone, or not checkable here."""
    if not path:
        return "unknown (no path recorded)"
    if host and host != socket.gethostname():
        return f"not checked (written on host {host})"
    if not os.path.isabs(path):
        return "unknown (relative path)"
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return "gone"
    except OSError as exc:
        return f"unknown ({exc.strerror})"
    if isinstance(size, int) and stat.st_size != size:
        return "present (size changed)"
    return "present"


def model_artifacts(
    ledger: Ledger,
    since: Any = None,
    until: Any = None,
    *,
    user: str | None = None,
    host: str | None = None,
) -> list[dict[str, Any]]:
    """Every recorded model file (latest record per path) and whether it still exists."""
    latest: dict[str, dict[str, Any]] = {}
    for rec in ledger.records(
        since, until, kinds=[events.MODEL_ARTIFACT_WRITTEN], user=user, host=host
    ):
        data, ctx = rec["data"], rec["context"]
        path = str(data.get("path") or "")
        item = latest.get(path)
        if item is None:
            item = latest[path] = {"path": path, "first_written": rec["time"], "writes": 0}
        item.update(
            {
                "last_written": rec["time"],
                "library": data.get("library"),
                "size": data.get("size"),
                "sha256": data.get("sha256"),
                "host": ctx.get("host"),
                "kernel_id": ctx.get("kernel_id"),
                "notebook": ctx.get("notebook"),
                "record": rec["seq"],
            }
        )
        item["writes"] += 1
    out = sorted(latest.values(), key=lambda a: a["path"])
    for item in out:
        item["status"] = artifact_status(item["path"], item["host"], item["size"])
    return out


def build_report(
    ledger: Ledger,
    since: Any = None,
    until: Any = None,
    head: str | None = None,
    *,
    workers: int = 1,
    user: str | None = None,
    host: str | None = None,
) -> dict[str, Any]:
    """Everything NIH asks for in sec. 22, for the period, as plain data.

    ``user`` / ``host`` (exact or glob) narrow it to some of a hub's users or machines; by
    default it covers everyone who writes to the ledger. Verification always covers the
    whole chain.
    """
    who = {"user": user or None, "host": host or None}
    # The record listings are small: fetch them beside the ledger's pass over every record.
    with ThreadPoolExecutor(max_workers=1) as pool:
        listed = pool.submit(_listings, ledger, since, until, who)
        verification, usage = ledger.survey(since, until, head, workers=workers, **who)
        result = _assemble(ledger, since, until, usage, who, listed.result())
    result["head"] = verification.head
    result["verification"] = verification.to_dict()
    return result


def _listings(ledger: Ledger, since: Any, until: Any, who: dict[str, Any]) -> dict[str, Any]:
    """The sections that list records one by one rather than aggregate them."""
    return {
        "model_artifacts": model_artifacts(ledger, since, until, **who),
        "reviews": [
            {"time": r["time"], "record": r["seq"], "user": r["context"].get("user"), **r["data"]}
            for r in ledger.records(since, until, kinds=[events.REVIEW_SIGNED], **who)
        ],
        "guard_defaults_used": [
            {"time": r["time"], "record": r["seq"], **r["data"]}
            for r in ledger.records(since, until, kinds=[events.GUARD_DEFAULTS_USED], **who)
        ],
    }


def _assemble(
    ledger: Ledger,
    since: Any,
    until: Any,
    usage: dict[str, Any],
    who: dict[str, Any],
    listed: dict[str, Any],
) -> dict[str, Any]:
    tools: dict[str, dict[str, Any]] = {}
    locations: dict[tuple, dict[str, Any]] = {}
    egress: dict[str, dict[tuple, dict[str, Any]]] = {
        events.EGRESS_BLOCKED: {},
        events.EGRESS_ALLOWED_AI: {},
    }
    flagged: dict[str, dict[str, Any]] = {}
    data_read: dict[str, dict[str, Any]] = {}
    total = 0

    def span(item: dict[str, Any], row: dict[str, Any]) -> None:
        item["first"] = min(filter(None, [item.get("first"), row["first"]]), default=None)
        item["last"] = max(filter(None, [item.get("last"), row["last"]]), default=None)
        item["count"] = item.get("count", 0) + row["count"]

    for row in usage["groups"]:
        total += row["count"]
        kind = row["kind"]
        loc_key = (row["host"], row["platform"], row["user"])
        loc = locations.setdefault(
            loc_key, {"host": row["host"], "platform": row["platform"], "user": row["user"]}
        )
        span(loc, row)
        if kind == events.AI_ML_IMPORT:
            name = row["subject"] or "(unknown)"
            tool = tools.setdefault(
                name,
                {
                    "tool": name,
                    "_versions": {},
                    "_categories": set(),
                    "_locations": set(),
                    "kernels": 0,
                    "notebooks": 0,
                },
            )
            span(tool, row)
            span(tool["_versions"].setdefault(row["detail"] or "unknown", {}), row)
            if row["extra"]:
                tool["_categories"].add(row["extra"])
            tool["_locations"].add(f"{row['host']} ({row['platform']})")
        elif kind in egress:
            key = (row["subject"], row["detail"], row["extra"])
            item = egress[kind].setdefault(
                key,
                {
                    "host": row["subject"],
                    "port": row["detail"],
                    "rule": row["extra"],
                    "kernels": 0,
                    "notebooks": 0,
                },
            )
            span(item, row)
        elif kind == events.OUTPUT_FLAGGED:
            item = flagged.setdefault(
                row["subject"] or "", {"rule": row["subject"], "kernels": 0, "notebooks": 0}
            )
            span(item, row)
        elif kind == events.DATA_READ:
            item = data_read.setdefault(
                row["subject"] or "", {"path": row["subject"], "format": row["detail"]}
            )
            span(item, row)

    for row in usage["distinct"]:
        kind = row["kind"]
        target = None
        if kind == events.AI_ML_IMPORT:
            target = tools.get(row["subject"] or "(unknown)")
        elif kind in egress:
            target = egress[kind].get((row["subject"], row["detail"], row["extra"]))
        elif kind == events.OUTPUT_FLAGGED:
            target = flagged.get(row["subject"] or "")
        if target is not None:
            target["kernels"] += row["kernels"]
            target["notebooks"] += row["notebooks"]

    def finish_sets(item: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in item.items():
            if key == "_versions":
                out["versions"] = [
                    {"version": v, "first": s["first"], "last": s["last"], "count": s["count"]}
                    for v, s in sorted(value.items())
                ]
            elif key == "_categories":
                out["categories"] = sorted(value)
            elif key == "_locations":
                out["locations"] = sorted(value)
            else:
                out[key] = value
        return out

    return {
        "title": "Records of AI/ML tools used with the Data (NCCR/SEER DUA sec. 22)",
        "generated": events.utc_now(),
        "generated_by": {"host": socket.gethostname(), "guard_version": __version__},
        "ledger": ledger.url,
        "period": {"since": since or None, "until": until or None},
        "filters": who,
        "users": _users(usage["groups"]),
        "events": total,
        "kernels": usage["kernels"],
        "kernels_started": usage["kernels_started"],
        "notebooks": usage["notebooks"],
        "tools": [finish_sets(t) for _, t in sorted(tools.items(), key=lambda kv: kv[0].lower())],
        "locations": [
            finish_sets(v) for _, v in sorted(locations.items(), key=lambda kv: str(kv[0]))
        ],
        "egress_blocked": [
            finish_sets(v) for _, v in sorted(egress[events.EGRESS_BLOCKED].items(), key=str)
        ],
        "egress_allowed_ai": [
            finish_sets(v) for _, v in sorted(egress[events.EGRESS_ALLOWED_AI].items(), key=str)
        ],
        "model_artifacts": listed["model_artifacts"],
        "outputs_flagged": [finish_sets(v) for _, v in sorted(flagged.items())],
        "reviews": listed["reviews"],
        "data_read": [finish_sets(v) for _, v in sorted(data_read.items())],
        "guard_defaults_used": listed["guard_defaults_used"],
    }


def _users(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per user: events, hosts, first and last event — the hub-wide view of who did what."""
    users: dict[str, dict[str, Any]] = {}
    for row in groups:
        item = users.setdefault(
            row["user"] or "(unknown)",
            {"user": row["user"] or "(unknown)", "hosts": set(), "events": 0, "ai_ml_imports": 0,
             "first": None, "last": None},
        )  # fmt: skip
        item["hosts"].add(row["host"] or "(unknown)")
        item["events"] += row["count"]
        if row["kind"] == events.AI_ML_IMPORT:
            item["ai_ml_imports"] += row["count"]
        item["first"] = min(filter(None, [item["first"], row["first"]]), default=None)
        item["last"] = max(filter(None, [item["last"], row["last"]]), default=None)
    return [{**v, "hosts": sorted(v["hosts"])} for _, v in sorted(users.items())]


# --------------------------------------------------------------------------- renderers


def render_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=False) + "\n"


CSV_COLUMNS = [
    "section",
    "item",
    "version",
    "first",
    "last",
    "count",
    "kernels",
    "notebooks",
    "locations",
    "status",
    "detail",
]


def render_csv(report: dict[str, Any]) -> str:
    """One table with a ``section`` column, so a spreadsheet can filter each part."""
    buf = io.StringIO()
    out = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    out.writeheader()
    period = report["period"]
    out.writerow(
        {
            "section": "report",
            "item": report["title"],
            "first": period["since"],
            "last": period["until"],
            "count": report["events"],
            "kernels": report["kernels"],
            "notebooks": len(report["notebooks"]),
            "detail": f"ledger {report['ledger']}; generated {report['generated']}; {_who(report)}",
        }
    )
    for item in report.get("users", []):
        out.writerow(
            {
                "section": "user",
                "item": item["user"],
                "first": item["first"],
                "last": item["last"],
                "count": item["events"],
                "locations": "; ".join(item["hosts"]),
                "detail": f"{item['ai_ml_imports']} AI/ML imports",
            }
        )
    for tool in report["tools"]:
        for ver in tool["versions"]:
            out.writerow(
                {
                    "section": "ai_ml_tool",
                    "item": tool["tool"],
                    "version": ver["version"],
                    "first": ver["first"],
                    "last": ver["last"],
                    "count": ver["count"],
                    "kernels": tool["kernels"],
                    "notebooks": tool["notebooks"],
                    "locations": "; ".join(tool["locations"]),
                    "detail": ", ".join(tool["categories"]),
                }
            )
    for loc in report["locations"]:
        out.writerow(
            {
                "section": "location",
                "item": loc["host"],
                "first": loc["first"],
                "last": loc["last"],
                "count": loc["count"],
                "locations": loc["platform"],
                "detail": f"user {loc['user']}",
            }
        )
    for section in ("egress_blocked", "egress_allowed_ai"):
        for item in report[section]:
            out.writerow(
                {
                    "section": section,
                    "item": f"{item['host']}:{item['port']}",
                    "first": item["first"],
                    "last": item["last"],
                    "count": item["count"],
                    "kernels": item["kernels"],
                    "notebooks": item["notebooks"],
                    "detail": f"rule {item['rule']}",
                }
            )
    for art in report["model_artifacts"]:
        out.writerow(
            {
                "section": "model_artifact",
                "item": art["path"],
                "first": art["first_written"],
                "last": art["last_written"],
                "count": art["writes"],
                "status": art["status"],
                "locations": art["host"],
                "detail": f"library {art['library']}; size {art['size']}; sha256 {art['sha256']}",
            }
        )
    for item in report["outputs_flagged"]:
        out.writerow(
            {
                "section": "output_flagged",
                "item": item["rule"],
                "first": item["first"],
                "last": item["last"],
                "count": item["count"],
                "notebooks": item["notebooks"],
            }
        )
    for rev in report["reviews"]:
        out.writerow(
            {
                "section": "review_signed",
                "item": rev.get("reviewer"),
                "first": rev["time"],
                "notebooks": rev.get("notebook"),
                "detail": f"{rev.get('scope') or ''} {rev.get('statement') or ''}".strip(),
            }
        )
    for item in report["data_read"]:
        out.writerow(
            {
                "section": "data_read",
                "item": item["path"],
                "first": item["first"],
                "last": item["last"],
                "count": item["count"],
                "detail": item["format"],
            }
        )
    ver = report["verification"]
    out.writerow(
        {
            "section": "verification",
            "item": "intact" if ver["ok"] else "NOT intact",
            "count": ver["records"],
            "status": ver["head"],
            "detail": ver["summary"],
        }
    )
    return buf.getvalue()


_CSS = """
body { font: 11pt/1.4 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #111;
       margin: 2em auto; max-width: 60em; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { font-size: 1.2em; margin-top: 1.6em;
  border-bottom: 1px solid #999; padding-bottom: .2em; page-break-after: avoid; }
table { border-collapse: collapse; width: 100%; margin: .5em 0; font-size: .9em; }
th, td { border: 1px solid #bbb; padding: .25em .45em; text-align: left; vertical-align: top;
  overflow-wrap: anywhere; }
th { background: #eee; overflow-wrap: normal; } td.t { white-space: nowrap; }
tr { page-break-inside: avoid; }
.meta td:first-child { width: 14em; font-weight: 600; } .none { color: #555; font-style: italic; }
.ok { color: #0a5a0a; font-weight: 700; } .bad { color: #a00; font-weight: 700; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .85em; }
@media print { body { margin: 0; max-width: none; font-size: 9.5pt; }
  th { background: #eee !important; -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  a { color: inherit; text-decoration: none; } }
@page { size: A4; margin: 15mm; }
"""


_STAMP = re.compile(r"(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}:\d{2})\.\d{6}Z")


def _cell(value: Any) -> str:
    """A table cell; ledger timestamps shown to the second, in UTC, without wrapping."""
    text = "" if value is None else str(value)
    stamp = _STAMP.fullmatch(text)
    if stamp:
        return f'<td class="t">{stamp.group(1)} {stamp.group(2)} UTC</td>'
    return f"<td>{html.escape(text)}</td>"


def _table(headers: list[str], rows: list[list[Any]], empty: str) -> str:
    if not rows:
        return f'<p class="none">{html.escape(empty)}</p>'
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(c) for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _who(report: dict[str, Any]) -> str:
    filters = report.get("filters") or {}
    users = report.get("users") or []
    scope = ", ".join(f"{k} {v}" for k, v in filters.items() if v) or "all users and hosts"
    return (
        f"{scope} ({len(users)} user{'s' if len(users) != 1 else ''}: "
        + (", ".join(u["user"] for u in users) or "none")
        + ")"
    )


def render_html(report: dict[str, Any]) -> str:
    """A self-contained page (inline CSS, no scripts) that prints cleanly to PDF."""
    e = html.escape
    period = report["period"]
    ver = report["verification"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(report['title'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(report['title'])}</h1>",
        '<table class="meta"><tbody>',
        f"<tr><td>Period</td><td>{e(str(period['since'] or 'beginning'))} to "
        f"{e(str(period['until'] or 'now'))}</td></tr>",
        f"<tr><td>Generated</td><td>{e(report['generated'])} on "
        f"{e(report['generated_by']['host'])} by jupyter-dua-guard "
        f"{e(report['generated_by']['guard_version'])}</td></tr>",
        f"<tr><td>Ledger</td><td><code>{e(report['ledger'])}</code></td></tr>",
        f"<tr><td>Users</td><td>{e(_who(report))}</td></tr>",
        f"<tr><td>Events</td><td>{report['events']} events, {report['kernels']} kernels, "
        f"{len(report['notebooks'])} notebooks</td></tr>",
        "</tbody></table>",
        "<h2>AI/ML tools used</h2>",
        _table(
            [
                "Tool",
                "Versions seen",
                "First use",
                "Last use",
                "Kernels",
                "Notebooks",
                "Locations of processing",
                "Category",
            ],
            [
                [
                    t["tool"],
                    ", ".join(v["version"] for v in t["versions"]),
                    t["first"],
                    t["last"],
                    t["kernels"],
                    t["notebooks"],
                    "; ".join(t["locations"]),
                    ", ".join(t["categories"]),
                ]
                for t in report["tools"]
            ],
            "No AI/ML tool was recorded in this period.",
        ),
        "<h2>Locations of processing</h2>",
        _table(
            ["Host", "Platform", "User", "First event", "Last event", "Events"],
            [
                [loc["host"], loc["platform"], loc["user"], loc["first"], loc["last"], loc["count"]]
                for loc in report["locations"]
            ],
            "No events in this period.",
        ),
        "<h2>Users</h2>",
        _table(
            ["User", "Hosts", "Events", "AI/ML imports", "First event", "Last event"],
            [
                [
                    u["user"],
                    ", ".join(u["hosts"]),
                    u["events"],
                    u["ai_ml_imports"],
                    u["first"],
                    u["last"],
                ]
                for u in report.get("users", [])
            ],
            "No user recorded an event in this period.",
        ),
        "<h2>Blocked egress attempts</h2>",
        _table(
            ["Host", "Port", "Rule", "Attempts", "First", "Last", "Notebooks"],
            [
                [i["host"], i["port"], i["rule"], i["count"], i["first"], i["last"], i["notebooks"]]
                for i in report["egress_blocked"]
            ],
            "No connection was blocked in this period.",
        ),
        "<h2>AI service connections allowed by configuration</h2>",
        _table(
            ["Host", "Port", "Rule", "Connections", "First", "Last", "Notebooks"],
            [
                [i["host"], i["port"], i["rule"], i["count"], i["first"], i["last"], i["notebooks"]]
                for i in report["egress_allowed_ai"]
            ],
            "No AI service connection was allowed in this period.",
        ),
        "<h2>Model artefacts written</h2>",
        _table(
            ["Path", "Library", "Size", "SHA-256", "Last written", "Host", "Status now"],
            [
                [
                    a["path"],
                    a["library"],
                    a["size"],
                    a["sha256"],
                    a["last_written"],
                    a["host"],
                    a["status"],
                ]
                for a in report["model_artifacts"]
            ],
            "No model artefact was recorded in this period.",
        ),
        "<h2>Outputs flagged</h2>",
        _table(
            ["Rule", "Count", "First", "Last", "Notebooks"],
            [
                [i["rule"], i["count"], i["first"], i["last"], i["notebooks"]]
                for i in report["outputs_flagged"]
            ],
            "No output was flagged in this period.",
        ),
        "<h2>Reviews signed</h2>",
        _table(
            ["Time", "Reviewer", "Notebook", "Scope", "Statement"],
            [
                [
                    r["time"],
                    r.get("reviewer"),
                    r.get("notebook"),
                    r.get("scope"),
                    r.get("statement"),
                ]
                for r in report["reviews"]
            ],
            "No review was signed in this period.",
        ),
        "<h2>Data files read</h2>",
        _table(
            ["Path", "Format", "Reads", "First", "Last"],
            [
                [i["path"], i["format"], i["count"], i["first"], i["last"]]
                for i in report["data_read"]
            ],
            "No data read was recorded in this period.",
        ),
        "<h2>Verification</h2>",
        f'<p class="{"ok" if ver["ok"] else "bad"}">'
        f"{'Ledger intact' if ver['ok'] else 'Ledger NOT intact'}</p>",
        f"<p>{e(ver['summary'])}</p>",
        f"<p>Head hash (pin it to detect later truncation): <code>{e(ver['head'])}</code></p>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


RENDERERS = {"html": render_html, "csv": render_csv, "json": render_json}
