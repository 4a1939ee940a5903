"""`jupyter dua-guard scan` through the real command line."""

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml
from corpus import _crosstab, case_listing

ROOT = Path(__file__).resolve().parents[1]


def run_scan(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "jupyter_dua_guard.cli", "scan", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def write_nb(path, outputs_per_cell):
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell("# Analysis"))
    for outputs in outputs_per_cell:
        cell = nbformat.v4.new_code_cell("x")
        cell.outputs = outputs
        nb.cells.append(cell)
    nbformat.write(nb, str(path))
    return nb


def result(data):
    return nbformat.v4.new_output("execute_result", data=data, execution_count=1)


@pytest.fixture
def notebooks(tmp_path):
    listing = case_listing(30, 1)
    small = _crosstab(100, 2, big=False)
    small.iloc[0, 0] = 4
    big = _crosstab(3000, 3, big=True)
    flagged = tmp_path / "flagged.ipynb"
    nb = write_nb(
        flagged,
        [
            [result({"text/plain": "2"})],
            [result({"text/html": listing._repr_html_(), "text/plain": repr(listing)})],
            [nbformat.v4.new_output("stream", name="stdout", text=repr(small))],
        ],
    )
    clean = tmp_path / "sub" / "clean.ipynb"
    clean.parent.mkdir()
    write_nb(clean, [[result({"text/html": big._repr_html_(), "text/plain": repr(big)})]])
    ckpt = tmp_path / "sub" / ".ipynb_checkpoints"
    ckpt.mkdir()
    (ckpt / "flagged-checkpoint.ipynb").write_text(flagged.read_text())
    return {"flagged": flagged, "clean": clean, "ids": [c.get("id") for c in nb.cells]}


def test_scan_table_and_exit_codes(notebooks):
    proc = run_scan(notebooks["clean"])
    assert proc.returncode == 0, proc.stderr
    assert "1 notebook(s) scanned: 0 flagged, 1 clean" in proc.stdout
    proc = run_scan(notebooks["flagged"])
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert any("cell 3, output 1: individual_level" in ln for ln in lines), proc.stdout
    assert any("cell 4, output 1: small_cells" in ln for ln in lines), proc.stdout


def test_scan_folder_json(notebooks, tmp_path):
    proc = run_scan(tmp_path, "--json")
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    paths = {Path(n["path"]).name: n for n in data["notebooks"]}
    assert set(paths) == {"flagged.ipynb", "clean.ipynb"}  # checkpoints skipped
    assert data["summary"] == {"scanned": 2, "flagged": 1, "clean": 1, "unreadable": 0}
    found = paths["flagged.ipynb"]["findings"]
    assert [(f["kind"], f["location"]["cell"]) for f in found] == [
        ("individual_level", 2),
        ("small_cells", 3),
    ]
    assert found[0]["location"]["cell_id"] == notebooks["ids"][2]
    assert paths["flagged.ipynb"]["summary"]["individual_level"] == 1


def test_scan_config_from_command_line(notebooks):
    proc = run_scan(notebooks["flagged"], "--DUAGuard.min_cell_count=3", "--json")
    kinds = [f["kind"] for f in json.loads(proc.stdout)["notebooks"][0]["findings"]]
    assert kinds == ["individual_level"]


MALFORMED = {
    "invalid.ipynb": (b'{"cells": [', "invalid JSON"),
    "v99.ipynb": (
        b'{"nbformat": 99, "nbformat_minor": 0, "cells": [], "metadata": {}}',
        "unsupported notebook format",
    ),
    "nooutputs.ipynb": (
        json.dumps(
            {
                "nbformat": 4,
                "nbformat_minor": 5,
                "metadata": {},
                "cells": [
                    {
                        "cell_type": "code",
                        "id": "c1",
                        "metadata": {},
                        "source": "df",
                        "execution_count": 1,
                    }
                ],
            }
        ).encode(),
        "no 'outputs' list",
    ),
    "empty.ipynb": (b"", "empty file (0 bytes)"),
    "binary.ipynb": (bytes(range(256)) * 4, "binary file"),
}


def test_malformed_notebooks_one_line_each_and_rest_scanned(notebooks, tmp_path):
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    for name, (content, _) in MALFORMED.items():
        (bad_dir / name).write_bytes(content)
    proc = run_scan(bad_dir, notebooks["flagged"], notebooks["clean"])
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == len(MALFORMED), proc.stderr
    assert "Traceback" not in proc.stderr
    for name, (_, message) in MALFORMED.items():
        (line,) = [ln for ln in err if name in ln]
        assert message in line
    assert "cell 3, output 1: individual_level" in proc.stdout
    assert "7 notebook(s) scanned: 1 flagged, 1 clean, 5 unreadable" in proc.stdout


def test_each_malformed_file_alone_exits_2(tmp_path):
    for name, (content, message) in MALFORMED.items():
        path = tmp_path / name
        path.write_bytes(content)
        proc = run_scan(path, "--json")
        assert proc.returncode == 2, name
        assert json.loads(proc.stdout)["notebooks"][0]["error"]
        assert message in proc.stderr


def test_missing_path_and_no_args(tmp_path):
    proc = run_scan(tmp_path / "nope.ipynb")
    assert proc.returncode == 2 and "no such file or folder" in proc.stderr
    proc = run_scan()
    assert proc.returncode == 2 and "give one or more notebooks" in proc.stderr


def test_pre_commit_hook_definition_runs_scan(notebooks):
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    (hook,) = [h for h in hooks if h["id"] == "dua-guard-scan"]
    assert hook["entry"] == "jupyter-dua-guard scan"
    assert hook["types"] == ["jupyter"] and hook["language"] == "python"
    exe = Path(sys.executable).with_name("jupyter-dua-guard")
    # pre-commit appends the staged file names to the entry
    cmd = [str(exe), *hook["entry"].split()[1:]]
    assert subprocess.run([*cmd, notebooks["flagged"]], capture_output=True).returncode == 1
    assert subprocess.run([*cmd, notebooks["clean"]], capture_output=True).returncode == 0


def test_bad_settings_are_one_line_errors(notebooks, tmp_path):
    for arg, message in [
        ("--DUAGuard.min_cell_count=0", "must be at least 1"),
        ("--DUAGuard.min_cell_count=abc", "expected an int"),
        (f"--DUAGuard.vocabulary_files={tmp_path / 'missing.txt'!s}", "cannot read vocabulary"),
    ]:
        proc = run_scan(notebooks["clean"], arg)
        assert proc.returncode == 2, arg
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
