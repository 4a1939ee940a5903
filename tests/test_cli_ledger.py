"""``jupyter dua-guard log | verify | report | closeout`` run as real processes."""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from ledger_helpers import db, make_ledger

from jupyter_dua_guard.ledger import open_ledger

CHROMIUM = "/usr/bin/chromium"


def cli(*args: str, env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-m", "jupyter_dua_guard.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def one_line_error(proc) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture
def populated(tmp_path):
    """A ledger with every section of the report represented (synthetic values only)."""
    path = tmp_path / "ledger.sqlite"
    make_ledger(path, 8)
    kept = tmp_path / "models" / "kept.pt"
    kept.parent.mkdir()
    kept.write_bytes(b"\0" * 64)
    with open_ledger(f"sqlite:///{path}") as ledger:
        nb = {"kernel_id": "k-9", "notebook": "nb/late.ipynb", "time": "2026-04-02T09:00:00Z"}
        ledger.append(
            "kernel_started",
            {"kernel_id": "k-9", "kernel_name": "python3", "notebook": "nb/late.ipynb"},
            nb,
        )
        ledger.append(
            "egress_blocked", {"host": "llm.example.test", "port": 443, "rule": "ai-endpoint"}, nb
        )
        ledger.append(
            "model_artifact_written", {"path": str(kept), "size": 64, "library": "torch"}, nb
        )
        ledger.append(
            "model_artifact_written",
            {"path": str(tmp_path / "models" / "gone.pkl"), "size": 10, "library": "joblib"},
            nb,
        )
        ledger.append(
            "review_signed",
            {
                "reviewer": "Dr. Synthetic",
                "notebook": "nb/late.ipynb",
                "scope": "figure 2",
                "statement": "checked",
            },
            nb,
        )
        ledger.append("output_flagged", {"rule": "small-cell", "cell": 3}, nb)
    return path


def test_log_json_and_filters(populated):
    url = f"sqlite:///{populated}"
    proc = cli("log", "--ledger", url, "--json")
    assert proc.returncode == 0, proc.stderr
    recs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["seq"] for r in recs] == list(range(1, 15))
    proc = cli(
        "log", "--ledger", url, "--json", "--kind", "egress_blocked", "--kind", "review_signed"
    )
    assert [json.loads(x)["kind"] for x in proc.stdout.splitlines()] == [
        "egress_blocked",
        "review_signed",
    ]
    proc = cli(
        "log",
        "--ledger",
        url,
        "--json",
        "--notebook",
        "nb/late.ipynb",
        "--since",
        "2026-04-02",
        "--until",
        "2026-04-02",
    )
    assert len(proc.stdout.splitlines()) == 6
    proc = cli("log", "--ledger", url, "--json", "--until", "2026-01-01")
    assert proc.returncode == 0 and proc.stdout == ""


def test_log_table(populated):
    proc = cli("log", "--ledger", str(populated), "--kind", "egress_blocked")
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["seq", "time", "(UTC)"]
    assert "egress_blocked" in lines[1] and "host=llm.example.test" in lines[1]
    assert len(lines) == 2


def test_log_bad_filter_is_one_line_error(populated):
    err = one_line_error(cli("log", "--ledger", str(populated), "--kind", "bogus"))
    assert "unknown event kind 'bogus'" in err
    err = one_line_error(cli("log", "--ledger", str(populated), "--since", "yesterday-ish"))
    assert "cannot read the time" in err


def test_verify_exit_codes(populated):
    proc = cli("verify", "--ledger", str(populated))
    assert proc.returncode == 0
    assert proc.stdout.startswith("ledger intact: 14 records, head 14:")
    assert len(proc.stdout.strip().splitlines()) == 1
    head = proc.stdout.split("head ")[1].split()[0]
    assert cli("verify", "--ledger", str(populated), "--head", head).returncode == 0
    conn = db(populated)
    conn.execute("DELETE FROM ledger_records WHERE seq = 13")
    conn.close()
    proc = cli("verify", "--ledger", str(populated))
    assert proc.returncode == 1
    assert "record 13" in proc.stdout and "deleted" in proc.stdout


def test_verify_detects_truncation_against_report_head(populated, tmp_path):
    proc = cli("report", "--ledger", str(populated), "--format", "json")
    head = json.loads(proc.stdout)["verification"]["head"]
    conn = db(populated)
    conn.execute("DELETE FROM ledger_records WHERE seq > 11")
    conn.close()
    assert cli("verify", "--ledger", str(populated)).returncode == 0
    proc = cli("verify", "--ledger", str(populated), "--head", head)
    assert proc.returncode == 1 and "record 12" in proc.stdout and "truncated" in proc.stdout


def test_report_json_sections(populated):
    proc = cli("report", "--ledger", str(populated), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    tools = {t["tool"]: t for t in rep["tools"]}
    assert set(tools) == {"scikit-learn", "torch", "xgboost", "openai"}
    assert tools["scikit-learn"]["versions"][0]["version"] == "1.5.2"
    assert tools["scikit-learn"]["kernels"] == 2 and tools["scikit-learn"]["notebooks"] == 1
    assert tools["torch"]["first"] <= tools["torch"]["last"]
    assert rep["locations"] and rep["locations"][0]["host"]
    assert rep["egress_blocked"][0]["host"] == "llm.example.test"
    assert rep["egress_blocked"][0]["count"] == 1
    status = {Path(a["path"]).name: a["status"] for a in rep["model_artifacts"]}
    assert status == {"kept.pt": "present", "gone.pkl": "gone"}
    assert rep["reviews"][0]["reviewer"] == "Dr. Synthetic"
    assert rep["outputs_flagged"][0]["rule"] == "small-cell"
    assert rep["kernels_started"] == 1
    assert rep["verification"]["ok"] and rep["verification"]["head"].startswith("14:")


def test_report_period(populated):
    proc = cli("report", "--ledger", str(populated), "--format", "json", "--until", "2026-04-02")
    rep = json.loads(proc.stdout)
    assert rep["events"] == 6 and rep["tools"] == []
    assert rep["period"]["until"] == "2026-04-02"


def test_report_csv_to_file(populated, tmp_path):
    out = tmp_path / "r.csv"
    proc = cli("report", "--ledger", str(populated), "--format", "csv", "-o", str(out))
    assert proc.returncode == 0 and proc.stdout == ""
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    sections = {r["section"] for r in rows}
    assert {
        "ai_ml_tool",
        "location",
        "egress_blocked",
        "model_artifact",
        "review_signed",
        "verification",
    } <= sections
    assert rows[-1]["section"] == "verification" and rows[-1]["item"] == "intact"


def test_report_unknown_format_is_one_line_error(populated):
    err = one_line_error(cli("report", "--ledger", str(populated), "--format", "pdf"))
    assert "unknown --format 'pdf'" in err


def test_report_to_unwritable_output_is_one_line_error(populated, tmp_path):
    err = one_line_error(
        cli("report", "--ledger", str(populated), "-o", str(tmp_path / "no" / "dir" / "r.html"))
    )
    assert "cannot write" in err


def test_closeout_lists_artifacts(populated):
    proc = cli("closeout", "--ledger", str(populated))
    assert proc.returncode == 0
    assert "2 model artefacts recorded: 1 still present, 1 gone" in proc.stdout
    proc = cli("closeout", "--ledger", str(populated), "--json")
    items = [json.loads(x) for x in proc.stdout.splitlines()]
    assert {Path(i["path"]).name: i["status"] for i in items} == {
        "kept.pt": "present",
        "gone.pkl": "gone",
    }
    assert cli("closeout", "--ledger", str(populated), "--strict").returncode == 1
    for item in items:
        if item["status"] == "present":
            os.unlink(item["path"])
    assert cli("closeout", "--ledger", str(populated), "--strict").returncode == 0


def test_ledger_url_from_server_config_file(populated, tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "jupyter_server_config.json").write_text(
        json.dumps({"DUAGuard": {"ledger_url": f"sqlite:///{populated}"}})
    )
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(conf)}
    proc = cli("verify", env=env)
    assert proc.returncode == 0 and "14 records" in proc.stdout
    other = tmp_path / "other.sqlite"
    make_ledger(other, 3)
    proc = cli("verify", "--ledger", f"sqlite:///{other}", env=env)
    assert proc.returncode == 0 and "3 records" in proc.stdout


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("command", ["log", "verify", "report", "closeout"])
def test_non_ledger_file_exit_2_untouched(tmp_path, command):
    path = tmp_path / "data.csv"
    path.write_bytes(b"id,site,count\n1,C50,3\n" * 100)
    before = path.read_bytes()
    err = one_line_error(cli(command, "--ledger", f"sqlite:///{path}"))
    assert "not a jupyter-dua-guard ledger" in err
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv"]


def test_corrupt_ledger_exit_2_untouched(tmp_path):
    path = tmp_path / "ledger.sqlite"
    make_ledger(path, 300)
    data = bytearray(path.read_bytes())
    assert len(data) > 8192
    data[4096:8192] = os.urandom(4096)  # smash a b-tree page, keep the header
    path.write_bytes(bytes(data))
    for command in ("verify", "log", "report"):
        err = one_line_error(cli(command, "--ledger", str(path)))
        assert "corrupt" in err or "malformed" in err or "not a" in err
        assert path.read_bytes() == bytes(data)


def test_other_sqlite_database_exit_2_untouched(tmp_path):
    path = tmp_path / "study.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE cohort (id INTEGER)")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    err = one_line_error(cli("verify", "--ledger", str(path)))
    assert "not a jupyter-dua-guard ledger" in err and path.read_bytes() == before


@pytest.mark.parametrize("url", ["mysql://db/x", "s3://bucket/ledger", "redis://hub/l"])
def test_unknown_scheme_exit_2(url):
    err = one_line_error(cli("verify", "--ledger", url))
    assert "scheme" in err and "sqlite:" in err


def test_missing_ledger_exit_2_not_created(tmp_path):
    err = one_line_error(cli("log", "--ledger", str(tmp_path / "typo.sqlite")))
    assert "no ledger at" in err and not (tmp_path / "typo.sqlite").exists()


def _lock_dir(path: Path) -> bool:
    """Make ``path`` unwritable even for root (immutable flag); plain chmod otherwise."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return True
    return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0


def _unlock_dir(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    path.chmod(0o755)


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_unwritable_directory_exit_2_untouched(tmp_path):
    """A ledger in a directory the user cannot write: one-line error, file unchanged."""
    ro = tmp_path / "ro"
    ro.mkdir()
    path = ro / "ledger.sqlite"
    make_ledger(path, 5)
    before = path.read_bytes()
    names = sorted(p.name for p in ro.iterdir())
    if not _lock_dir(ro):
        pytest.skip("cannot make a directory unwritable here (chattr unavailable)")
    try:
        for command in ("verify", "log", "report"):
            err = one_line_error(cli(command, "--ledger", str(path)))
            assert str(ro) in err and "writable" in err, err
        # a new ledger in an unwritable directory, through the writer's interface
        code = (
            "import sys\nfrom jupyter_dua_guard.ledger import open_ledger, LedgerError\n"
            "try:\n    open_ledger(sys.argv[1]).append('data_read', {'path': '/x'})\n"
            "except LedgerError as e:\n    print(e); sys.exit(2)\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code, str(ro / "new.sqlite")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2 and "writable" in proc.stdout, (proc.stdout, proc.stderr)
        assert len(proc.stdout.strip().splitlines()) == 1
        assert path.read_bytes() == before
        assert sorted(p.name for p in ro.iterdir()) == names
    finally:
        _unlock_dir(ro)


# --------------------------------------------------------------------------- browser


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs /usr/bin/chromium")
def test_html_report_renders_in_chromium(populated, tmp_path):
    out = tmp_path / "report.html"
    assert cli("report", "--ledger", str(populated), "-o", str(out)).returncode == 0
    text = out.read_text()
    assert "<script" not in text and "http://" not in text and "https://" not in text
    base = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'chrome'}",
    ]
    dom = subprocess.run(
        [*base, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    for heading in (
        "AI/ML tools used",
        "Locations of processing",
        "Blocked egress attempts",
        "Model artefacts written",
        "Reviews signed",
        "Verification",
    ):
        assert f"<h2>{heading}</h2>" in dom, heading
    assert "scikit-learn" in dom and "Ledger intact" in dom
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1200,1600", out.as_uri()],
        capture_output=True,
        timeout=120,
    )
    assert shot.exists() and shot.stat().st_size > 10_000
    pdf = tmp_path / "report.pdf"
    subprocess.run(
        [*base, f"--print-to-pdf={pdf}", "--no-pdf-header-footer", out.as_uri()],
        capture_output=True,
        timeout=120,
    )
    assert pdf.exists() and pdf.read_bytes()[:5] == b"%PDF-"
