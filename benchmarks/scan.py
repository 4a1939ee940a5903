"""Scan speed: time of ``scan`` over time of plain ``nbformat.read`` of the same files.

Builds (in a temporary folder) 200 ordinary analysis notebooks and one 50 MB notebook
(images, full HTML tables, long logs), then prints for each set the best-of-3 time of
``nbformat.read`` alone and of the scan (read + checks + detector), and their ratio.
Goal: ratio <= 1.5. Run: python benchmarks/scan.py [--keep DIR]
"""

import argparse
import base64
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from corpus import build_corpus, case_listing

from jupyter_dua_guard.scan import scan_paths


def _output(case):
    return nbformat.v4.new_output("display_data", data=case.bundle, metadata={})


def _png(rng, size):
    return base64.b64encode(rng.bytes(size)).decode()


def make_folder(root: Path, n: int = 200) -> list[Path]:
    """n analysis notebooks of 15-35 cells with the usual mix of outputs.

    Per code cell: no output (25%), a small result (15%), printed lines (10%), a plot (15%),
    a DataFrame display as people use them -- head(), a truncated frame, a crosstab,
    value_counts, describe (20%) -- or any output of the labelled corpus (15%).
    """
    cases = [c for c in build_corpus() if c.obj is None]
    rng = np.random.default_rng(0)
    listing = case_listing(5000, 3)
    frames = [
        listing.head(),
        listing,
        listing.describe(),
        listing["Sex"].value_counts(),
        pd.crosstab(listing["Combined Summary Stage (2004+)"], listing["Sex"]),
        listing.groupby("Primary Site - labeled")["Survival months"].median(),
    ]
    bundles = [
        {
            "text/html": f.to_frame()._repr_html_()
            if isinstance(f, pd.Series)
            else f._repr_html_(),
            "text/plain": repr(f),
        }
        for f in frames
    ]
    paths = []
    for i in range(n):
        nb = nbformat.v4.new_notebook()
        for j in range(int(rng.integers(15, 36))):
            cell = nbformat.v4.new_code_cell(f"# step {j}\nresult = analysis_step({j})")
            u = rng.random()
            if u < 0.25:
                pass
            elif u < 0.40:
                cell.outputs = [
                    nbformat.v4.new_output(
                        "execute_result",
                        data={"text/plain": f"{rng.random():.4f}"},
                        execution_count=j,
                    )
                ]
            elif u < 0.50:
                text = "".join(
                    f"fold {k}: auc={rng.random():.3f}\n" for k in range(int(rng.integers(1, 8)))
                )
                cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=text)]
            elif u < 0.65:
                cell.outputs = [
                    nbformat.v4.new_output(
                        "display_data",
                        data={
                            "image/png": _png(rng, int(rng.integers(20_000, 80_000))),
                            "text/plain": "<Figure size 640x480 with 1 Axes>",
                        },
                    )
                ]
            elif u < 0.85:
                cell.outputs = [
                    nbformat.v4.new_output(
                        "execute_result",
                        data=bundles[int(rng.integers(len(bundles)))],
                        execution_count=j,
                    )
                ]
            else:
                cell.outputs = [_output(cases[int(rng.integers(len(cases)))])]
            nb.cells.append(cell)
        path = root / f"analysis_{i:03d}.ipynb"
        nbformat.write(nb, str(path))
        paths.append(path)
    return paths


def make_big(path: Path, target_mb: int = 50) -> Path:
    """A ~50 MB notebook: plots (PNG), full HTML tables, long stream logs."""
    rng = np.random.default_rng(1)
    png = base64.b64encode(rng.bytes(300_000)).decode()
    frame = pd.DataFrame(rng.random((2_000, 12)), columns=[f"feature_{k}" for k in range(12)])
    table_html = frame.to_html()
    log = "".join(
        f"epoch {k}: loss={rng.random():.5f} val_auc={rng.random():.4f}\n" for k in range(20_000)
    )
    nb = nbformat.v4.new_notebook()
    k = 0
    while True:
        cell = nbformat.v4.new_code_cell(f"step({k})")
        kind = k % 3
        if kind == 0:
            cell.outputs = [
                nbformat.v4.new_output(
                    "display_data",
                    data={"image/png": png, "text/plain": "<Figure size 640x480 with 1 Axes>"},
                )
            ]
        elif kind == 1:
            cell.outputs = [
                nbformat.v4.new_output(
                    "execute_result",
                    data={"text/html": table_html, "text/plain": repr(frame)},
                    execution_count=k,
                )
            ]
        else:
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=log)]
        nb.cells.append(cell)
        k += 1
        if k % 10 == 0:
            nbformat.write(nb, str(path))
            if path.stat().st_size >= target_mb * 1_000_000:
                return path


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(label: str, paths: list[Path]) -> float:
    def read_all():
        for p in paths:
            with open(p, encoding="utf-8") as fh:
                nbformat.read(fh, as_version=4)

    def scan_all():
        results = scan_paths([str(p) for p in paths])
        assert not any(r.error for r in results)

    t_read = best_of(read_all)
    t_scan = best_of(scan_all)
    size = sum(p.stat().st_size for p in paths) / 1e6
    ratio = t_scan / t_read
    print(f"{label:<28} {len(paths):>4} files {size:8.1f} MB  read {t_read:7.3f} s  "
          f"scan {t_scan:7.3f} s  ratio {ratio:5.2f}")  # fmt: skip
    return ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="build the notebooks in this folder and keep them")
    args = parser.parse_args()
    tmp = None
    if args.keep:
        root = Path(args.keep)
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory()
        root = Path(tmp.name)
    folder = root / "folder"
    folder.mkdir(exist_ok=True)
    paths = make_folder(folder)
    big = make_big(root / "big.ipynb")
    print(
        f"python {sys.version.split()[0]}, nbformat {nbformat.__version__}, cpus {os.cpu_count()}"
    )
    r1 = measure("folder of 200 notebooks", paths)
    r2 = measure("one 50 MB notebook", [big])
    ok = r1 <= 1.5 and r2 <= 1.5
    print("goal (ratio <= 1.5) met" if ok else "GOAL NOT MET (ratio > 1.5)")
    if tmp:
        tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
