"""Precision and recall of the output detector per kind on the labelled synthetic corpus.

Run: python benchmarks/detector_quality.py   (goal: recall >= 0.95 on individual_level and
small_cells, precision >= 0.90 on every kind). Prints the misclassified outputs, if any.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from corpus import build_corpus, score

from jupyter_dua_guard.detect import detect_bundle


def main() -> int:
    cases = build_corpus()
    got: dict[str, set[str]] = {}
    start = time.perf_counter()
    for case in cases:
        got[case.name] = {f.kind for f in detect_bundle(case.bundle, obj=case.obj)}
    elapsed = time.perf_counter() - start
    result = score(lambda c: got[c.name], cases)
    print(f"corpus: {len(cases)} outputs, detector time {elapsed * 1000:.0f} ms in total")
    print(f"{'kind':<20}{'support':>8}{'precision':>11}{'recall':>8}{'fp':>5}{'fn':>5}")
    ok = True
    for kind, r in result.items():
        print(
            f"{kind:<20}{r['support']:>8}{r['precision']:>11.3f}{r['recall']:>8.3f}"
            f"{r['fp']:>5}{r['fn']:>5}"
        )
        ok &= r["precision"] >= 0.90
        if kind in ("individual_level", "small_cells"):
            ok &= r["recall"] >= 0.95
    for case in cases:
        if got[case.name] != case.expected:
            want, have = sorted(case.expected), sorted(got[case.name])
            print(f"  miss: {case.name}: expected {want}, got {have}")
    print("goals met" if ok else "GOALS NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
