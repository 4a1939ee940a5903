"""The output detector on the labelled synthetic corpus and on targeted cases."""

import json

import pandas as pd
import pytest
from corpus import DIRECT, IND, SMALL, build_corpus, case_listing, score
from traitlets import TraitError

from jupyter_dua_guard.config import DUAGuard
from jupyter_dua_guard.detect import (
    DetectorSettings,
    VocabularyError,
    detect_bundle,
    detect_object,
    detect_output,
    detect_text,
)


def kinds(case, settings=None):
    return {f.kind for f in detect_bundle(case.bundle, obj=case.obj, settings=settings)}


def test_corpus_is_big_and_varied():
    cases = build_corpus()
    assert len(cases) >= 40
    assert sum(IND in c.expected for c in cases) >= 10
    assert sum(SMALL in c.expected for c in cases) >= 8
    assert sum(not c.expected for c in cases) >= 10


def test_quality_goals_on_corpus():
    cases = build_corpus()
    result = score(kinds, cases)
    misses = [(c.name, c.expected, kinds(c)) for c in cases if kinds(c) != c.expected]
    assert result[IND]["recall"] >= 0.95, misses
    assert result[SMALL]["recall"] >= 0.95, misses
    for kind in (IND, SMALL, DIRECT):
        assert result[kind]["precision"] >= 0.90, misses


@pytest.mark.parametrize(
    "name",
    ["describe html", "describe text", "statsmodels OLS summary", "R summary(lm)",
     "matplotlib figure", "pandas crosstab html large", "broom tidy tibble html",
     "Cox coefficient table", "in-kernel describe"],
)  # fmt: skip
def test_clean_lookalikes_not_flagged(name):
    case = next(c for c in build_corpus() if c.name == name)
    assert detect_bundle(case.bundle, obj=case.obj) == []


def test_findings_never_carry_values():
    df = case_listing(25, 42, ids=True)
    named = df.assign(Name=[f"Person{i} Lastname{i}" for i in range(25)])
    named["Date of birth"] = [f"19{50 + i}-0{1 + i % 9}-1{i % 9}" for i in range(25)]
    findings = detect_bundle({"text/html": named._repr_html_(), "text/plain": repr(named)})
    findings += detect_object(named)
    assert {f.kind for f in findings} >= {IND, DIRECT}
    dumped = json.dumps([f.to_dict() for f in findings])
    for value in [*named["Patient ID"], *named["Name"], *named["Date of birth"]]:
        assert str(value) not in dumped
    text = "Patient: Maria Garcia, DOB: 1961-04-12, SSN 123-45-6789, jo@example.org, MRN 00482913"
    dumped = json.dumps([f.to_dict() for f in detect_text(text)])
    for value in ["Maria", "Garcia", "1961-04-12", "123-45-6789", "jo@example.org", "00482913"]:
        assert value not in dumped


def test_finding_shape_and_reasons():
    df = case_listing(50, 3, ids=True, wide=False)
    (f,) = detect_bundle({"text/html": df._repr_html_()}, location={"cell": 4, "output": 0})
    d = f.to_dict()
    assert d["kind"] == IND and 0.5 <= d["confidence"] <= 1
    assert d["location"] == {"cell": 4, "output": 0}
    assert any("'Patient ID'" in r and "50 rows" in r for r in d["reasons"])


def test_k_anonymity_without_id_column_and_threshold():
    # two quasi-identifiers, each combination shared by exactly 20 persons: k = 20
    df = pd.DataFrame(
        {"Sex": ["Male", "Female"] * 40, "Age group": ["40-49"] * 40 + ["50-59"] * 40}
    )
    assert detect_object(df) == []
    df.loc[0, "Age group"] = "90+"  # one person alone in a class
    (f,) = detect_object(df)
    assert f.kind == IND and any("k-anonymity" in r for r in f.reasons)
    assert detect_object(df, settings=DetectorSettings(k_anonymity=1)) == []


def test_min_cell_count_and_zero_setting():
    ct = pd.DataFrame(
        {"Male": [120, 12], "Female": [0, 140]},
        index=pd.Index(["Localized", "Distant"], name="Stage"),
    )
    ct.columns.name = "Sex"
    bundle = {"text/html": ct._repr_html_(), "text/plain": repr(ct)}
    (f,) = detect_bundle(bundle)
    assert f.kind == SMALL and "1 of 4 counts" in f.reasons[0]
    assert detect_bundle(bundle, settings=DetectorSettings(min_cell_count=11)) == []
    strict = DetectorSettings(min_cell_count=11, allow_zero_cells=False)
    (f,) = detect_bundle(bundle, settings=strict)
    assert f.kind == SMALL and "between 0 and 10" in f.reasons[0]
    guard = DUAGuard(min_cell_count=11)
    assert DetectorSettings.from_guard(guard).min_cell_count == 11
    with pytest.raises(TraitError, match="at least 1"):
        DUAGuard(min_cell_count=0)


def test_admin_vocabulary_extends_detector(tmp_path):
    df = pd.DataFrame(
        {
            "Residence zone": [f"Z{i % 7}" for i in range(30)],
            "Birth cohort band": [f"B{i % 5}" for i in range(30)],
            "Clinic note length": list(range(30)),
        }
    )
    bundle = {"text/html": df._repr_html_()}
    assert detect_bundle(bundle) == []
    vocab = tmp_path / "local_vocab.txt"
    vocab.write_text("[qi:geo]\nResidence zone\n[qi:year]\nBirth cohort band\n", encoding="utf-8")
    settings = DetectorSettings.from_guard(DUAGuard(vocabulary_files=[str(vocab)]))
    assert [f.kind for f in detect_bundle(bundle, settings=settings)] == [IND]
    bad = tmp_path / "bad.txt"
    bad.write_text("[nonsense]\nX\n", encoding="utf-8")
    with pytest.raises(VocabularyError, match=r"unknown section \[nonsense\]"):
        DetectorSettings.from_guard(DUAGuard(vocabulary_files=[str(bad)]))


def test_stream_and_error_outputs():
    df = case_listing(20, 9, ids=True)
    out = {"output_type": "stream", "name": "stdout", "text": "Cases:\n" + repr(df) + "\n"}
    assert {f.kind for f in detect_output(out)} == {IND}
    err = {
        "output_type": "error",
        "ename": "KeyError",
        "evalue": "'x'",
        "traceback": ["KeyError: row for jane.doe@example.org not found"],
    }
    assert {f.kind for f in detect_output(err)} == {DIRECT}
    assert detect_output({"output_type": "stream", "name": "stdout", "text": "done\n"}) == []


def test_aggregates_with_all_cells_above_threshold_are_clean():
    counts = pd.DataFrame(
        {"Year of diagnosis": [2018, 2019, 2020], "Sex": ["Female"] * 3, "n": [412, 398, 377]}
    )
    assert detect_bundle({"text/html": counts._repr_html_()}) == []
    counts.loc[1, "n"] = 7
    assert [f.kind for f in detect_bundle({"text/html": counts._repr_html_()})] == [SMALL]


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (
            pd.DataFrame(
                {
                    "Age group": ["0-19", "20-39", "40-59", "60+"] * 2,
                    "Sex": ["Male"] * 4 + ["Female"] * 4,
                    "Population": [120000, 130000, 110000, 90000, 118000, 128000, 112000, 99000],
                }
            ),
            set(),
        ),
        (pd.DataFrame({"Patient": ["Yes", "No"], "n": [120, 130]}), set()),
        (
            pd.DataFrame(
                {"name": ["Maria Garcia", "Tom Baker"], "DOB": ["1950-01-02", "1960-03-04"]}
            ),
            {IND, DIRECT},
        ),
        (
            pd.DataFrame(
                {"date": [f"2020-01-{d:02d}" for d in range(1, 29)], "new_cases": range(28)}
            ),
            {SMALL},
        ),
    ],
)
def test_general_lookalikes(frame, expected):
    for bundle in ({"text/html": frame._repr_html_()}, {"text/plain": repr(frame)}):
        assert {f.kind for f in detect_bundle(bundle)} == expected
    assert {f.kind for f in detect_object(frame)} == expected


def test_large_in_kernel_frame_uses_whole_frame_facts():
    n = 300_000
    big = pd.DataFrame(
        {"Sex": ["Male", "Female"] * (n // 2), "Age group": ["40-49", "50-59"] * (n // 2)}
    )
    assert detect_object(big) == []  # two classes of 150,000: k-anonymous
    listing = case_listing(300_000, 8, ids=True, wide=False)
    (f,) = detect_object(listing)
    assert f.kind == IND and "300000 rows" in f.reasons[0]


def test_detect_accepts_outputs_bundles_objects_and_text():
    from jupyter_dua_guard.detect import detect

    df = case_listing(30, 12)
    bundle = {"text/html": df._repr_html_(), "text/plain": repr(df)}
    output = {"output_type": "execute_result", "data": bundle, "metadata": {}, "execution_count": 1}
    for data in (output, bundle, df, repr(df)):
        assert [f.kind for f in detect(data)] == [IND]
    assert detect(df.describe()) == []


def test_sampled_and_sorted_listings_and_confusion_matrix():
    listing = case_listing(400, 21, ids=False, wide=False)
    for shown in (listing.sample(8, random_state=1), listing.nlargest(5, "Age at diagnosis")):
        for bundle in ({"text/html": shown._repr_html_()}, {"text/plain": repr(shown)}):
            assert [f.kind for f in detect_bundle(bundle)] == [IND]
    cm = pd.DataFrame(
        [[120, 3], [8, 200]], index=["actual_0", "actual_1"], columns=["pred_0", "pred_1"]
    )
    (f,) = detect_bundle({"text/html": cm._repr_html_()})
    assert f.kind == SMALL and "2 of 4 counts" in f.reasons[0]
