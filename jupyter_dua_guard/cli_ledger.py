"""``jupyter dua-guard log | verify | report | closeout``: the ledger on the command line.

Each command reads the same configuration as the server (``c.DUAGuard.ledger_url``) and
takes ``--ledger URL`` to override it. Problems print one line to stderr and exit 2, so
scripts and people can tell "the ledger is not intact" (exit 1) from "could not check".
"""

from __future__ import annotations

import json
import os
import sys

from jupyter_core.application import JupyterApp
from traitlets import Bool, List, Unicode

from ._version import __version__
from .config import DUAGuard, SettingsError
from .events import EVENT_KINDS
from .ledger import Ledger, LedgerError, open_ledger

_COMMON_ALIASES = {"ledger": "DUAGuard.ledger_url"}


class LedgerCommand(JupyterApp):
    """Base of the ledger subcommands: configuration, ledger opening, one-line errors."""

    version = __version__
    config_file_name = "jupyter_server_config"
    classes = [DUAGuard]
    aliases = dict(_COMMON_ALIASES)
    flags: dict = {}
    command = "ledger"

    def open(self) -> Ledger:
        try:
            guard = DUAGuard.load(self)
        except SettingsError as error:
            raise LedgerError(str(error)) from None
        return open_ledger(guard.ledger_url, create=False)

    def run(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def start(self) -> None:
        try:
            code = self.run()
        except LedgerError as exc:
            print(f"jupyter dua-guard {self.command}: error: {exc}", file=sys.stderr)
            self.exit(2)
        except BrokenPipeError:  # `| head` closed the pipe: not an error of the ledger
            sys.stderr.close()
            self.exit(0)
        except OSError as exc:
            print(f"jupyter dua-guard {self.command}: error: {exc}", file=sys.stderr)
            self.exit(2)
        self.exit(code)

    def write(self, text: str, output: str = "") -> None:
        """Write to ``output`` (a file, atomically) or stdout."""
        if not output or output == "-":
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        tmp = f"{output}.tmp{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8", newline="") as fh:
                fh.write(text)
            os.replace(tmp, output)
        except OSError as exc:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise LedgerError(
                f"cannot write {output} ({exc.strerror}): choose a writable -o path"
            ) from None


_FILTER_HELP = {
    "since": "Only events at or after this UTC time (ISO 8601, e.g. 2026-03-01).",
    "until": "Only events up to this UTC time; a date alone includes that whole day.",
}


class _Filtered(LedgerCommand):
    since = Unicode("", help=_FILTER_HELP["since"]).tag(config=True)
    until = Unicode("", help=_FILTER_HELP["until"]).tag(config=True)
    user = Unicode(
        "", help="Only events of this user (glob * allowed); default: every user of the hub."
    ).tag(config=True)
    host = Unicode("", help="Only events on this host name (glob * allowed).").tag(config=True)

    def who(self) -> dict[str, str | None]:
        return {"user": self.user or None, "host": self.host or None}


def _filter_aliases(cls: str) -> dict[str, str]:
    return {f: f"{cls}.{f}" for f in ("since", "until", "user", "host")}


class LogApp(_Filtered):
    """Show the ledger's events, newest last."""

    name = "jupyter-dua-guard-log"
    command = "log"
    description = "Show the usage ledger's events, newest last, as a table or JSON lines."
    kind = List(Unicode(), help=f"Only these kinds (repeat or comma-separate): {EVENT_KINDS}").tag(
        config=True
    )
    notebook = Unicode("", help="Only events of this notebook path (glob * allowed).").tag(
        config=True
    )
    as_json = Bool(False, help="Print JSON lines, one record each.").tag(config=True)
    aliases = {
        **_COMMON_ALIASES,
        **_filter_aliases("LogApp"),
        "kind": "LogApp.kind",
        "notebook": "LogApp.notebook",
    }
    flags = {"json": ({"LogApp": {"as_json": True}}, "Print JSON lines, one record each.")}

    def run(self) -> int:
        with self.open() as ledger:
            rows = ledger.records(
                self.since or None,
                self.until or None,
                self.kind or None,
                self.notebook or None,
                **self.who(),
            )
            if self.as_json:
                for rec in rows:
                    sys.stdout.write(json.dumps(rec, ensure_ascii=False) + "\n")
                return 0
            sys.stdout.write(
                f"{'seq':>6}  {'time (UTC)':<20}  {'kind':<22}  {'user@host':<20}  "
                f"{'kernel':<8}  {'notebook':<24}  details\n"
            )
            for rec in rows:
                ctx = rec["context"]
                where = f"{ctx.get('user')}@{ctx.get('host')}"
                details = ", ".join(f"{k}={v}" for k, v in sorted(rec["data"].items()))
                sys.stdout.write(
                    f"{rec['seq']:>6}  {rec['time'][:19]:<20}  {rec['kind']:<22}  {where:<20}  "
                    f"{(ctx.get('kernel_id') or '-')[:8]:<8}  {ctx.get('notebook') or '-':<24}  "
                    f"{details}\n"
                )
        return 0


class VerifyApp(LedgerCommand):
    """Walk the hash chain: exit 0 if intact, 1 naming the first bad record."""

    name = "jupyter-dua-guard-verify"
    command = "verify"
    description = (
        "Walk the ledger's hash chain. Exit 0 with a one-line summary (records, head hash) when "
        "intact; exit 1 naming the first bad record and what is wrong. --head SEQ:HASH (from an "
        "earlier verify or report) also detects a truncated tail."
    )
    head = Unicode("", help="Pinned head SEQ:HASH that must still be in the ledger.").tag(
        config=True
    )
    as_json = Bool(False, help="Print the result as JSON.").tag(config=True)
    aliases = {**_COMMON_ALIASES, "head": "VerifyApp.head"}
    flags = {"json": ({"VerifyApp": {"as_json": True}}, "Print the result as JSON.")}

    def run(self) -> int:
        with self.open() as ledger:
            result = ledger.verify(head=self.head or None, workers=os.cpu_count() or 1)
        print(json.dumps(result.to_dict()) if self.as_json else result.summary())
        return 0 if result.ok else 1


class ReportApp(_Filtered):
    """The records package for an NIH request (DUA sec. 22)."""

    name = "jupyter-dua-guard-report"
    command = "report"
    description = (
        "Build the records package for an NIH request: AI/ML tools with versions, first/last "
        "use, kernels, notebooks, locations of processing, blocked egress, model artefacts "
        "(present or gone), reviews, and the verification result with the head hash."
    )
    format = Unicode("html", help="Output format: html, csv or json.").tag(config=True)
    output = Unicode("", help="Write to this file instead of stdout.").tag(config=True)
    head = Unicode("", help="Pinned head SEQ:HASH from an earlier report.").tag(config=True)
    aliases = {
        **_COMMON_ALIASES,
        **_filter_aliases("ReportApp"),
        "format": "ReportApp.format",
        "o": "ReportApp.output",
        "output": "ReportApp.output",
        "head": "ReportApp.head",
    }

    def run(self) -> int:
        from .report import RENDERERS, build_report

        if self.format not in RENDERERS:
            raise LedgerError(f"unknown --format {self.format!r}: use html, csv or json")
        with self.open() as ledger:
            report = build_report(
                ledger,
                self.since or None,
                self.until or None,
                head=self.head or None,
                workers=os.cpu_count() or 1,
                **self.who(),
            )
        self.write(RENDERERS[self.format](report), self.output)
        if self.output:
            ver = report["verification"]
            print(f"report written to {self.output}; {ver['summary']}", file=sys.stderr)
        return 0


class CloseoutApp(_Filtered):
    """List every recorded model artefact and whether it still exists."""

    name = "jupyter-dua-guard-closeout"
    command = "closeout"
    description = (
        "Close-out (DUA sec. 21/22): list every model artefact the guard recorded and whether "
        "it still exists, so you can destroy them and keep this list as evidence."
    )
    as_json = Bool(False, help="Print JSON lines, one artefact each.").tag(config=True)
    strict = Bool(False, help="Exit 1 while any recorded artefact is still present.").tag(
        config=True
    )
    aliases = {**_COMMON_ALIASES, **_filter_aliases("CloseoutApp")}
    flags = {
        "json": ({"CloseoutApp": {"as_json": True}}, "Print JSON lines, one artefact each."),
        "strict": ({"CloseoutApp": {"strict": True}}, "Exit 1 while any artefact is present."),
    }

    def run(self) -> int:
        from .report import model_artifacts

        with self.open() as ledger:
            items = model_artifacts(ledger, self.since or None, self.until or None, **self.who())
            head = ledger.head()
        present = [a for a in items if a["status"].startswith("present")]
        if self.as_json:
            for item in items:
                sys.stdout.write(json.dumps(item) + "\n")
        else:
            for item in items:
                size = "" if item["size"] is None else f"{item['size']} B"
                sys.stdout.write(
                    f"{item['status']:<10}  {item['path']}  ({item['library'] or '?'}, {size}, "
                    f"last written {item['last_written']} on {item['host']})\n"
                )
            print(
                f"{len(items)} model artefacts recorded: {len(present)} still present, "
                f"{sum(a['status'] == 'gone' for a in items)} gone; ledger head "
                f"{head[0]}:{head[1]}"
            )
        return 1 if (self.strict and present) else 0


SUBCOMMANDS: dict[str, tuple[type[JupyterApp], str]] = {
    "log": (LogApp, LogApp.description),
    "verify": (VerifyApp, VerifyApp.description.split(". ")[0] + "."),
    "report": (ReportApp, ReportApp.description.split(": ")[0] + "."),
    "closeout": (CloseoutApp, CloseoutApp.description.split(": ")[0] + "."),
}
