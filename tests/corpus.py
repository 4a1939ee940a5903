"""A labelled synthetic corpus of notebook outputs for the detector (tests and benchmark).

Every value is generated here from a fixed seed; nothing comes from real registry data.
pandas and polars render their own outputs; R renderings (data.frame, tibble, table(),
kable, summary(lm)) and statsmodels summaries are written by hand in the formats those
libraries print, since R is not installed.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import polars as pl

IND, SMALL, DIRECT = "individual_level", "small_cells", "direct_identifier"

SITES = ["Breast", "Lung and Bronchus", "Colon", "Prostate", "Pancreas", "Melanoma of the Skin"]
STAGES = ["Localized", "Regional", "Distant", "Unknown/unstaged"]
RACES = ["White", "Black", "Asian or Pacific Islander", "American Indian/Alaska Native"]
COUNTIES = ["06037", "06073", "53033", "13121", "36061", "26163", "09003", "15003"]
REGISTRIES = ["San Francisco-Oakland", "Connecticut", "Seattle (Puget Sound)", "Atlanta"]
FIRST = ["Maria", "James", "Aiko", "Olu", "Ingrid", "Rahul", "Chen", "Lucia", "Tom", "Ana"]
LAST = ["Garcia", "Okafor", "Tanaka", "Lindqvist", "Sharma", "Wong", "Rossi", "Baker"]


@dataclass
class Case:
    """One labelled output: a mime bundle (and optionally the displayed object)."""

    name: str
    bundle: dict[str, Any]
    expected: set[str]
    obj: Any = None
    tags: set[str] = field(default_factory=set)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def case_listing(n: int, seed: int = 0, *, ids: bool = True, wide: bool = True) -> pd.DataFrame:
    """A synthetic SEER-style case listing (one row per tumour/person)."""
    r = _rng(seed)
    data: dict[str, Any] = {}
    if ids:
        data["Patient ID"] = [f"{10000000 + int(x)}" for x in r.choice(8999999, n, replace=False)]
    data["Age at diagnosis"] = r.integers(18, 95, n)
    data["Sex"] = r.choice(["Male", "Female"], n)
    data["Race recode (White, Black, Other)"] = r.choice(["White", "Black", "Other"], n)
    data["Year of diagnosis"] = r.integers(2000, 2021, n)
    if wide:
        data["State-county"] = r.choice(COUNTIES, n)
        data["Primary Site - labeled"] = r.choice(SITES, n)
        data["Histologic Type ICD-O-3"] = r.choice([8140, 8500, 8070, 8720, 8010], n)
        data["Combined Summary Stage (2004+)"] = r.choice(STAGES, n)
        data["Survival months"] = r.integers(0, 240, n)
        data["Vital status recode (study cutoff used)"] = r.choice(["Alive", "Dead"], n)
    return pd.DataFrame(data)


def _pl(df: pd.DataFrame) -> pl.DataFrame:
    return pl.DataFrame({c: df[c].tolist() for c in df.columns})


def _pandas_html(df: Any) -> dict[str, str]:
    return {"text/html": df._repr_html_(), "text/plain": repr(df)}


def _pandas_text(df: Any) -> dict[str, str]:
    return {"text/plain": repr(df)}


def _polars_html(df: pl.DataFrame) -> dict[str, str]:
    return {"text/html": df._repr_html_(), "text/plain": repr(df)}


def r_dataframe_html(df: pd.DataFrame, *, tibble: bool = False, max_rows: int = 20) -> str:
    """What IRkernel's repr shows for a data.frame / tibble."""
    types = {"int64": "&lt;int&gt;", "float64": "&lt;dbl&gt;"}
    kind = "A tibble" if tibble else "A data.frame"
    out = ['<table class="dataframe">', f"<caption>{kind}: {len(df)} × {df.shape[1]}</caption>"]
    lead = "" if tibble else "<th></th>"
    out.append("<thead>")
    out.append(
        "\t<tr>"
        + lead
        + "".join(f"<th scope=col>{html.escape(str(c))}</th>" for c in df.columns)
        + "</tr>"
    )
    out.append(
        "\t<tr>"
        + lead
        + "".join(
            f"<th scope=col>{types.get(str(df[c].dtype), '&lt;chr&gt;')}</th>" for c in df.columns
        )
        + "</tr>"
    )
    out.append("</thead>\n<tbody>")
    shown = (
        df if len(df) <= max_rows else pd.concat([df.head(max_rows // 2), df.tail(max_rows // 2)])
    )
    for k, (i, row) in enumerate(shown.iterrows()):
        if len(df) > max_rows and k == max_rows // 2:
            out.append(
                "\t<tr>"
                + ("<th scope=row>⋮</th>" if not tibble else "")
                + "<td>⋮</td>" * df.shape[1]
                + "</tr>"
            )
        head = "" if tibble else f"<th scope=row>{i + 1}</th>"
        out.append(
            "\t<tr>" + head + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
        )
    out.append("</tbody>\n</table>")
    return "\n".join(out)


def r_dataframe_text(df: pd.DataFrame, *, tibble: bool = False, max_rows: int = 10) -> str:
    """R's print() of a data.frame (row names 1..n) or a tibble (with types and footer)."""
    shown = df.head(max_rows) if tibble else df
    cols = [str(c).replace(" ", "_") for c in df.columns]
    cells = [[str(v) for v in shown[c]] for c in df.columns]
    types = [
        "<int>"
        if str(df[c].dtype) == "int64"
        else "<dbl>"
        if str(df[c].dtype) == "float64"
        else "<chr>"
        for c in df.columns
    ]
    widths = [
        max(len(h), len(t), *(len(x) for x in col))
        for h, t, col in zip(cols, types, cells, strict=True)
    ]
    rn = [str(i + 1) for i in range(len(shown))]
    rw = max(len(x) for x in rn)
    lines = []
    if tibble:
        lines.append(f"# A tibble: {len(df)} × {df.shape[1]}")
    lines.append(" " * rw + " " + " ".join(h.rjust(w) for h, w in zip(cols, widths, strict=True)))
    if tibble:
        lines.append(
            " " * rw + " " + " ".join(t.rjust(w) for t, w in zip(types, widths, strict=True))
        )
    for i in range(len(shown)):
        lines.append(
            rn[i].rjust(rw) + " " + " ".join(cells[j][i].rjust(w) for j, w in enumerate(widths))
        )
    if tibble and len(df) > max_rows:
        lines.append(f"# ℹ {len(df) - max_rows} more rows")
    return "\n".join(lines)


def r_table_text(ct: pd.DataFrame, row_var: str, col_var: str) -> str:
    """R's print() of a two-way table(): dimnames names in the top-left corner."""
    rows = [str(x) for x in ct.index]
    cols = [str(x) for x in ct.columns]
    lw = max(len(row_var), *(len(r) + 2 for r in rows))
    widths = [
        max(len(c), *(len(str(v)) for v in ct[c0])) for c, c0 in zip(cols, ct.columns, strict=True)
    ]
    lines = [
        " " * lw + " " + col_var,
        row_var.ljust(lw) + " " + " ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)),
    ]
    for r, (_, vals) in zip(rows, ct.iterrows(), strict=True):
        lines.append(
            ("  " + r).ljust(lw)
            + " "
            + " ".join(str(v).rjust(w) for v, w in zip(vals, widths, strict=True))
        )
    return "\n".join(lines)


def kable_html(df: pd.DataFrame) -> str:
    out = ["<table>", " <thead>", "  <tr>"]
    out += [f'   <th style="text-align:left;"> {html.escape(str(c))} </th>' for c in df.columns]
    out += ["  </tr>", " </thead>", "<tbody>"]
    for _, row in df.iterrows():
        out.append("  <tr>")
        out += [f'   <td style="text-align:right;"> {html.escape(str(v))} </td>' for v in row]
        out.append("  </tr>")
    out.append("</tbody>\n</table>")
    return "\n".join(out)


def kable_markdown(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    cells = [[str(v) for v in df[c]] for c in df.columns]
    widths = [max(len(h), *(len(x) for x in col)) for h, col in zip(cols, cells, strict=True)]
    lines = ["|" + "|".join(h.ljust(w) for h, w in zip(cols, widths, strict=True)) + "|"]
    lines.append("|" + "|".join("-" * (w - 1) + ":" for w in widths) + "|")
    for i in range(len(df)):
        lines.append("|" + "|".join(cells[j][i].rjust(w) for j, w in enumerate(widths)) + "|")
    return "\n".join(lines)


def statsmodels_summary(seed: int) -> dict[str, str]:
    r = _rng(seed)
    rows = ["const", "age_at_diagnosis", "stage_distant", "sex_female"]
    coef = r.normal(0, 1, len(rows))
    text = [
        "                            OLS Regression Results",
        "==============================================================================",
        "Dep. Variable:        survival_months   R-squared:                       0.412",
        "Model:                            OLS   Adj. R-squared:                  0.409",
        "No. Observations:                2104   F-statistic:                     162.3",
        "==============================================================================",
        "                       coef    std err          t      P>|t|      [0.025      0.975]",
        "------------------------------------------------------------------------------",
    ]
    for n, c in zip(rows, coef, strict=True):
        text.append(
            f"{n:<18} {c:10.4f} {abs(c) / 7:10.3f} {c * 7:10.3f} {0.001:10.3f} {c - 0.2:10.3f} {c + 0.2:10.3f}"
        )
    h = [
        '<table class="simpletable">',
        "<caption>OLS Regression Results</caption>",
        "<tr><th>Dep. Variable:</th><td>survival_months</td><th>  R-squared:</th><td>0.412</td></tr>",
        "<tr><th>No. Observations:</th><td>2104</td><th>  F-statistic:</th><td>162.3</td></tr>",
        "<tr><th>Df Residuals:</th><td>2100</td><th>  Prob (F-statistic):</th><td>3.2e-41</td></tr>",
        "</table>",
        '<table class="simpletable">',
        "<tr><td></td><th>coef</th><th>std err</th><th>t</th><th>P>|t|</th><th>[0.025</th><th>0.975]</th></tr>",
    ]
    for n, c in zip(rows, coef, strict=True):
        h.append(
            f"<tr><th>{n}</th><td>{c:.4f}</td><td>{abs(c) / 7:.3f}</td><td>{c * 7:.3f}</td>"
            f"<td>0.001</td><td>{c - 0.2:.3f}</td><td>{c + 0.2:.3f}</td></tr>"
        )
    h.append("</table>")
    return {"text/html": "\n".join(h), "text/plain": "\n".join(text)}


R_LM_SUMMARY = """
Call:
lm(formula = surv_months ~ age + stage, data = seer)

Residuals:
    Min      1Q  Median      3Q     Max
-60.123 -20.442  -2.113  18.909  95.301

Coefficients:
              Estimate Std. Error t value Pr(>|t|)
(Intercept)   80.12345    3.21000  24.960  < 2e-16 ***
age           -0.51234    0.04512 -11.355  < 2e-16 ***
stageRegional -12.3456    1.98765  -6.211 6.12e-10 ***
stageDistant  -40.1234    2.34567 -17.105  < 2e-16 ***
---
Signif. codes:  0 '***' 0.001 '**' 0.01 '*' 0.05 '.' 0.1 ' ' 1

Residual standard error: 28.1 on 2100 degrees of freedom
Multiple R-squared:  0.412,	Adjusted R-squared:  0.409
F-statistic: 162.3 on 3 and 2100 DF,  p-value: < 2.2e-16
"""


def _crosstab(n: int, seed: int, big: bool) -> pd.DataFrame:
    r = _rng(seed)
    df = pd.DataFrame(
        {
            "Combined Summary Stage (2004+)": r.choice(STAGES, n, p=[0.4, 0.3, 0.2, 0.1]),
            "Sex": r.choice(["Male", "Female"], n),
        }
    )
    ct = pd.crosstab(df["Combined Summary Stage (2004+)"], df["Sex"])
    if big:
        ct = ct + 20  # synthetic: lift every cell above the threshold
    return ct


def build_corpus() -> list[Case]:
    """The labelled corpus: ≥ 40 outputs across renderers, kinds and clean look-alikes."""
    cases: list[Case] = []

    def add(name: str, bundle: dict[str, Any], expected: set[str], obj: Any = None) -> None:
        cases.append(Case(name, bundle, set(expected), obj))

    # ---------------- case listings (individual-level)
    wide_id = case_listing(40, 1, ids=True, wide=True)
    wide_noid = case_listing(40, 2, ids=False, wide=True)
    narrow_noid = case_listing(30, 3, ids=False, wide=False)
    long_noid = case_listing(1200, 4, ids=False, wide=True)
    long_id = case_listing(900, 5, ids=True, wide=False)
    add("pandas html listing wide with ID", _pandas_html(wide_id), {IND})
    add("pandas text listing wide with ID", _pandas_text(wide_id), {IND})
    add("pandas html listing wide no ID", _pandas_html(wide_noid), {IND})
    add("pandas text listing wide no ID", _pandas_text(wide_noid), {IND})
    add("pandas html listing narrow no ID", _pandas_html(narrow_noid), {IND})
    add("pandas text listing narrow no ID", _pandas_text(narrow_noid), {IND})
    add("pandas html listing 1200 rows truncated", _pandas_html(long_noid), {IND})
    add("pandas text listing 1200 rows truncated", _pandas_text(long_noid), {IND})
    add("pandas text listing 900 rows with ID", _pandas_text(long_id), {IND})
    add("pandas html head() narrow", _pandas_html(narrow_noid.head()), {IND})
    add("polars html listing with ID", _polars_html(_pl(wide_id)), {IND})
    add("polars text listing no ID", {"text/plain": repr(_pl(narrow_noid))}, {IND})
    add("polars html listing 1200 rows", _polars_html(_pl(long_noid)), {IND})
    rdf = case_listing(25, 6, ids=True, wide=False).rename(
        columns={"Patient ID": "patient_id", "Age at diagnosis": "age_dx", "Sex": "sex",
                 "Race recode (White, Black, Other)": "race", "Year of diagnosis": "year_dx"}
    )  # fmt: skip
    add("R data.frame html with patient_id", {"text/html": r_dataframe_html(rdf)}, {IND})
    add(
        "R tibble html no id",
        {"text/html": r_dataframe_html(rdf.drop(columns="patient_id"), tibble=True)},
        {IND},
    )
    add("R data.frame text", {"text/plain": r_dataframe_text(rdf)}, {IND})
    add(
        "R tibble text 25 rows",
        {"text/plain": r_dataframe_text(rdf.drop(columns="patient_id"), tibble=True)},
        {IND},
    )
    add("kable html listing", {"text/html": kable_html(rdf.head(12))}, {IND})
    add(
        "kable markdown listing",
        {"text/markdown": kable_markdown(rdf.head(12)), "text/plain": kable_markdown(rdf.head(12))},
        {IND},
    )
    add(
        "dataresource listing",
        {
            "application/vnd.dataresource+json": json.loads(
                wide_noid.head(20).to_json(orient="table")
            ),
            "text/plain": repr(wide_noid.head(20)),
        },
        {IND},
    )
    r = _rng(7)
    dates = pd.DataFrame(
        {
            "Date of birth": pd.to_datetime(r.integers(-15000, 5000, 15), unit="D").strftime(
                "%Y-%m-%d"
            ),
            "Date of diagnosis": pd.to_datetime(r.integers(12000, 18000, 15), unit="D").strftime(
                "%Y-%m-%d"
            ),
            "Tumor size": r.integers(1, 80, 15),
        }
    )
    add("listing with dates of birth and diagnosis", _pandas_html(dates), {IND})
    surv = pd.DataFrame(
        {
            "Primary Site - labeled": r.choice(SITES, 20),
            "Combined Summary Stage (2004+)": r.choice(STAGES, 20),
            "Survival months": r.integers(0, 200, 20),
        }
    )
    add("listing with survival months per person", _pandas_text(surv), {IND})
    add("single patient lookup", _pandas_html(wide_id.iloc[[3]]), {IND})
    add("pandas Styler listing", {"text/html": wide_id.head(8).style.to_html()}, {IND})
    seer_ascii = pd.DataFrame(
        {"PUBCSNUM": r.choice(89999999, 12, replace=False) + 10000000, "REG": r.choice([1501, 1502, 1520], 12),
         "AGE_DX": r.integers(20, 90, 12), "SEX": r.choice([1, 2], 12), "YEAR_DX": r.integers(2000, 2020, 12),
         "SRV_TIME_MON": r.integers(0, 200, 12)}
    )  # fmt: skip
    add("SEER ASCII names listing", _pandas_text(seer_ascii), {IND})
    add("in-kernel pandas listing", _pandas_html(wide_noid), {IND}, obj=wide_noid)
    add("in-kernel polars listing", _polars_html(_pl(narrow_noid)), {IND}, obj=_pl(narrow_noid))
    preds = pd.DataFrame(
        {
            "patient_id": [f"P-{100000 + i}" for i in range(30)],
            "predicted_risk": r.random(30).round(3),
        }
    )
    add("model predictions per patient", _pandas_html(preds), {IND})

    # ---------------- direct identifiers
    add(
        "stream with name and DOB",
        {
            "text/plain": "Checking record...\nPatient: Maria Garcia, DOB: 1961-04-12, stage Regional\n"
        },
        {DIRECT},
    )
    named = pd.DataFrame(
        {"Name": [f"{r.choice(FIRST)} {r.choice(LAST)}" for _ in range(10)],
         "Date of birth": pd.to_datetime(r.integers(-15000, 5000, 10), unit="D").strftime("%m/%d/%Y"),
         "Primary Site - labeled": r.choice(SITES, 10)}
    )  # fmt: skip
    add("listing with names and DOB", _pandas_html(named), {IND, DIRECT})
    add(
        "stream with SSN and e-mail",
        {"text/plain": "ssn=123-45-6789 contact=olu.okafor@example.org\n"},
        {DIRECT},
    )
    add("stream with MRN", {"text/plain": "lookup MRN: 00482913 -> matched 1 record\n"}, {DIRECT})

    # ---------------- small cells
    small = _crosstab(120, 8, big=False)
    small.iloc[0, 0] = 3
    add("pandas crosstab html small", _pandas_html(small), {SMALL})
    add("pandas crosstab text small", _pandas_text(small), {SMALL})
    add(
        "crosstab with margins small",
        _pandas_html(pd.concat([small, small.sum().to_frame("All").T])),
        {SMALL},
    )
    vc = pd.Series(
        r.choice(SITES, 200, p=[0.4, 0.3, 0.2, 0.07, 0.02, 0.01]), name="Primary Site - labeled"
    ).value_counts()
    add("value_counts text small", _pandas_text(vc), {SMALL})
    grp = pd.DataFrame(
        {"County": r.choice(COUNTIES, 150), "Sex": r.choice(["Male", "Female"], 150)}
    )
    gsize = grp.groupby(["County", "Sex"]).size().reset_index(name="n")
    add("groupby size reset_index html small", _pandas_html(gsize), {SMALL})
    add(
        "groupby size series text small",
        _pandas_text(grp.groupby(["County", "Sex"]).size()),
        {SMALL},
    )
    rt = pd.crosstab(grp["Sex"], grp["County"])
    add("R table() text small", {"text/plain": r_table_text(rt, "sex", "county")}, {SMALL})
    rcount = gsize.rename(columns={"County": "county", "Sex": "sex"})
    add(
        "R dplyr count tibble html small",
        {"text/html": r_dataframe_html(rcount, tibble=True)},
        {SMALL},
    )
    add("kable count table small", {"text/html": kable_html(rcount.head(8))}, {SMALL})
    add(
        "polars group_by len small",
        _polars_html(_pl(grp).group_by(["County", "Sex"]).len().sort("County")),
        {SMALL},
    )
    t1 = pd.DataFrame(
        {"Characteristic": ["Male", "Female", "White", "Black", "Other"],
         "Cases, n (%)": ["412 (51.2%)", "393 (48.8%)", "700 (87.0%)", "96 (11.9%)", "9 (1.1%)"]}
    )  # fmt: skip
    add("Table 1 n (%) small", _pandas_html(t1), {SMALL})
    add("in-kernel crosstab small", _pandas_html(small), {SMALL}, obj=small)
    add(
        "dataresource counts small",
        {"application/vnd.dataresource+json": json.loads(gsize.to_json(orient="table"))},
        {SMALL},
    )
    add("value_counts in-kernel small", _pandas_text(vc), {SMALL}, obj=vc)

    # ---------------- clean outputs (must not be flagged)
    big = _crosstab(4000, 9, big=True)
    add("pandas crosstab html large", _pandas_html(big), set())
    add("pandas crosstab text large", _pandas_text(big), set())
    add("value_counts large", _pandas_text(long_noid["Sex"].value_counts()), set())
    add("describe html", _pandas_html(long_noid.describe()), set())
    add("describe text", _pandas_text(long_noid.describe()), set())
    add("describe include=all", _pandas_html(wide_id.describe(include="all")), set())
    add("polars describe", {"text/plain": repr(_pl(narrow_noid).describe())}, set())
    add("statsmodels OLS summary", statsmodels_summary(10), set())
    add("R summary(lm)", {"text/plain": R_LM_SUMMARY}, set())
    broom = pd.DataFrame(
        {"term": ["(Intercept)", "age", "stageDistant"], "estimate": [80.1, -0.51, -40.1],
         "std.error": [3.2, 0.045, 2.3], "statistic": [24.9, -11.3, -17.1], "p.value": [1e-16, 1e-16, 2e-16]}
    )  # fmt: skip
    add("broom tidy tibble html", {"text/html": r_dataframe_html(broom, tibble=True)}, set())
    cox = pd.DataFrame(
        {
            "coef": [0.41, -0.2],
            "exp(coef)": [1.5, 0.82],
            "se(coef)": [0.05, 0.04],
            "z": [8.2, -5.0],
            "p": [0.001, 0.001],
        },
        index=pd.Index(["stage_distant", "age_per_10y"], name="covariate"),
    )
    add("Cox coefficient table", _pandas_html(cox), set())
    add(
        "matplotlib figure",
        {
            "image/png": "iVBORw0KGgoAAAANSUhEUg==",
            "text/plain": "<Figure size 640x480 with 1 Axes>",
        },
        set(),
    )
    add(
        "plotly figure html",
        {"text/html": '<div id="f1" class="plotly-graph-div"></div><script>Plotly.newPlot("f1", [{"x": [2010, 2011], "y": [412.1, 398.4]}])</script>',
         "text/plain": "Figure({'data': [...]})"},
        set(),
    )  # fmt: skip
    means = long_noid.groupby("Primary Site - labeled").agg(
        mean_age=("Age at diagnosis", "mean"), median_survival=("Survival months", "median")
    )
    add("groupby means by site", _pandas_html(means), set())
    rates = pd.DataFrame(
        {"Year of diagnosis": range(2010, 2021), "Count": r.integers(900, 1500, 11),
         "Population": r.integers(2_000_000, 2_100_000, 11), "Rate per 100,000": r.uniform(40, 60, 11).round(1)}
    )  # fmt: skip
    add("incidence rates by year", _pandas_html(rates), set())
    add("R table() text large", {"text/plain": r_table_text(big, "stage", "sex")}, set())
    add(
        "random numeric frame",
        _pandas_html(pd.DataFrame(r.random((30, 5)), columns=list("abcde"))),
        set(),
    )
    add(
        "stream progress log",
        {"text/plain": "epoch 1/10 loss=0.41\nepoch 2/10 loss=0.37\nsaved model to /tmp/m.pt\n"},
        set(),
    )
    t1big = pd.DataFrame(
        {"Characteristic": ["Male", "Female", "White", "Black"],
         "Cases, n (%)": ["412 (51.2%)", "393 (48.8%)", "700 (87.0%)", "105 (13.0%)"]}
    )  # fmt: skip
    add("Table 1 n (%) large", _pandas_html(t1big), set())
    metrics = pd.DataFrame(
        {"model": ["logit", "gbm"], "auc": [0.71, 0.74], "accuracy": [0.66, 0.69]}
    )
    add("model metrics table", _pandas_html(metrics), set())
    corr = long_noid[["Age at diagnosis", "Year of diagnosis", "Survival months"]].corr()
    add("correlation matrix", _pandas_html(corr), set())
    add("in-kernel describe", _pandas_html(long_noid.describe()), set(), obj=long_noid.describe())
    add("in-kernel large crosstab", _pandas_html(big), set(), obj=big)
    add(
        "value_counts in-kernel large",
        _pandas_text(long_noid["Sex"].value_counts()),
        set(),
        obj=long_noid["Sex"].value_counts(),
    )

    # ---------------- more renderings and look-alikes
    cols = pd.MultiIndex.from_product([["2019", "2020"], ["Male", "Female"]])
    wide_ct = pd.DataFrame(
        [[4, 40, 29, 19], [22, 24, 19, 33], [28, 25, 17, 24]],
        index=pd.Index(["Breast", "Lung", "Colon"], name="Site"),
        columns=cols,
    )
    add("two-level column crosstab text small", _pandas_text(wide_ct), {SMALL})
    add("two-level column crosstab html large", _pandas_html(wide_ct + 100), set())
    daily = pd.DataFrame(
        {
            "date": pd.date_range("2020-01-01", periods=30).strftime("%Y-%m-%d"),
            "new_cases": r.integers(0, 30, 30),
        }
    )
    add("daily new cases small", _pandas_html(daily), {SMALL})
    add("daily new cases large", _pandas_html(daily.assign(new_cases=daily.new_cases + 200)), set())
    add(
        "exact age and sex 1200 rows truncated",
        _pandas_text(long_noid[["Age at diagnosis", "Sex"]]),
        {IND},
    )
    add(
        "value_counts normalized",
        _pandas_text(long_noid["Sex"].value_counts(normalize=True)),
        set(),
    )
    add("correlation matrix text", _pandas_text(corr), set())
    add(
        "polars group_by text small",
        {"text/plain": repr(_pl(grp).group_by(["County", "Sex"]).len().sort("County"))},
        {SMALL},
    )
    add(
        "R one-way table() small",
        {"text/plain": "\n  Distant Localized  Regional \n       12       410       233 \n"},
        {SMALL},
    )
    add(
        "R one-way table() large",
        {"text/plain": "stage\n  Distant Localized  Regional \n       92       410       233 \n"},
        set(),
    )
    return cases


def score(detect: Callable[[Case], set[str]], cases: list[Case]) -> dict[str, dict[str, float]]:
    """Precision and recall per kind of a detector over the corpus."""
    out: dict[str, dict[str, float]] = {}
    for kind in (IND, SMALL, DIRECT):
        tp = fp = fn = 0
        for case in cases:
            got = kind in detect(case)
            want = kind in case.expected
            tp += got and want
            fp += got and not want
            fn += want and not got
        out[kind] = {
            "precision": tp / (tp + fp) if tp + fp else 1.0,
            "recall": tp / (tp + fn) if tp + fn else 1.0,
            "support": tp + fn,
            "tp": tp,
            "fp": fp,
            "fn": fn,
        }
    return out
