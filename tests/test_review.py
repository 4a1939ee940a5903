"""`jupyter dua-guard review` records a review_signed event in a real SQLite ledger."""

import hashlib
import json
import subprocess
import sys

import nbformat
from corpus import case_listing

from jupyter_dua_guard.ledger import open_ledger


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "jupyter_dua_guard.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def make_notebook(path):
    listing = case_listing(20, 11)
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("cases")
    cell.outputs = [
        nbformat.v4.new_output(
            "execute_result",
            data={"text/html": listing._repr_html_(), "text/plain": repr(listing)},
            execution_count=1,
        )
    ]
    nb.cells = [cell, nbformat.v4.new_code_cell("1 + 1")]
    nbformat.write(nb, str(path))
    return listing


def test_review_records_hash_findings_reviewer_decision(tmp_path):
    url = f"sqlite:///{tmp_path}/ledger.sqlite"
    nb_path = tmp_path / "paper.ipynb"
    listing = make_notebook(nb_path)
    proc = cli(
        "review", nb_path, "--reviewer", "Dr. Ada Rivera", "--decision", "reject",
        "--comment", "case listing in cell 1 must go", "--ledger", url,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "reject by Dr. Ada Rivera" in proc.stdout

    ledger = open_ledger(url)
    (rec,) = list(ledger.records(kinds=["review_signed"]))
    ledger.close()
    data = rec["data"]
    assert data["reviewer"] == "Dr. Ada Rivera"
    assert data["decision"] == "reject"
    assert data["comment"] == "case listing in cell 1 must go"
    assert data["content_hash"] == "sha256:" + hashlib.sha256(nb_path.read_bytes()).hexdigest()
    assert data["findings_summary"]["individual_level"] == 1
    assert data["findings_summary"]["total"] == 1
    assert data["flagged_outputs"][0]["cell"] == 0
    dumped = json.dumps(rec)
    for pid in listing["Patient ID"]:
        assert pid not in dumped

    # a changed notebook gets a different hash: the earlier review does not cover it
    nb = nbformat.read(str(nb_path), as_version=4)
    nb.cells[0].outputs = []
    nbformat.write(nb, str(nb_path))
    proc = cli("review", nb_path, "--reviewer", "Dr. Ada Rivera", "--decision", "approve",
               "--ledger", url)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ledger = open_ledger(url)
    recs = list(ledger.records(kinds=["review_signed"]))
    assert ledger.verify().ok
    ledger.close()
    assert recs[1]["data"]["content_hash"] != data["content_hash"]
    assert recs[1]["data"]["findings_summary"]["total"] == 0

    proc = cli("report", "--format", "json", "--ledger", url)
    assert proc.returncode == 0, proc.stderr
    reviews = json.loads(proc.stdout)["reviews"]
    assert [r["decision"] for r in reviews] == ["reject", "approve"]


def test_review_errors_are_one_line(tmp_path):
    url = f"sqlite:///{tmp_path}/ledger.sqlite"
    nb_path = tmp_path / "a.ipynb"
    make_notebook(nb_path)
    bad = tmp_path / "bad.ipynb"
    bad.write_text("{not json")
    cases = [
        (["review", nb_path, "--reviewer", "X", "--decision", "maybe"], "approve or reject"),
        (["review", nb_path, "--decision", "approve"], "--reviewer is required"),
        (["review", bad, "--reviewer", "X", "--decision", "approve"], "invalid JSON"),
        (["review", tmp_path / "missing.ipynb", "--reviewer", "X", "--decision", "approve"],
         "no such notebook"),
    ]  # fmt: skip
    for args, message in cases:
        proc = cli(*args, "--ledger", url)
        assert proc.returncode == 2, args
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ledger.sqlite").exists() or not list(
        open_ledger(url).records(kinds=["review_signed"])
    )
