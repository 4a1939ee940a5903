"""The output detector: does a notebook output show individual-level data or small cells?

One detector serves the kernel (``display.py``), the ``scan`` command line, the pre-commit hook
and the lab extension. It reads a Jupyter mime bundle (HTML tables from pandas, polars and R,
printed frames, ``application/vnd.dataresource+json``, stream text) or, inside a kernel, the
displayed pandas / polars object itself, and returns :class:`Finding` objects.

Findings name column labels, counts and reasons, never cell values: they end up in the
ledger, in logs and in the page, where case-level data must not go (DUA sec. 17/8).

pandas and polars are optional: they are only touched when an object of theirs is passed in.
The rule set and its defaults are documented in ``docs/detector.md``.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from html import unescape as _html_unescape
from pathlib import Path
from typing import Any

__all__ = [
    "DIRECT_IDENTIFIER",
    "INDIVIDUAL_LEVEL",
    "KINDS",
    "SMALL_CELLS",
    "DetectorSettings",
    "Finding",
    "Vocabulary",
    "detect",
    "detect_bundle",
    "detect_object",
    "detect_output",
    "detect_text",
    "summarize",
]

INDIVIDUAL_LEVEL = "individual_level"
SMALL_CELLS = "small_cells"
DIRECT_IDENTIFIER = "direct_identifier"
KINDS = (INDIVIDUAL_LEVEL, SMALL_CELLS, DIRECT_IDENTIFIER)

#: Only this much of one HTML output is parsed: displays are truncated anyway, and a 50 MB
#: notebook must scan about as fast as nbformat reads it.
MAX_HTML_CHARS = 250_000
#: Only this much of one text output is parsed into tables / searched for identifiers.
MAX_TEXT_CHARS = 1_000_000
MAX_TEXT_TABLE_LINES = 400
#: Rows sampled from an in-kernel frame for value checks.
OBJECT_SAMPLE_ROWS = 2_000
#: Rows of an in-kernel frame used for distinct counts and class sizes: beyond this the first
#: rows stand for the frame (class sizes then err on the side of flagging), so displaying a
#: 10-million-row frame stays quick.
OBJECT_EXACT_ROWS = 200_000

DEFAULT_VOCABULARY = Path(__file__).parent / "data" / "seer_vocabulary.txt"


# --------------------------------------------------------------------------- findings


@dataclass
class Finding:
    """One reason an output must not leave the secure environment.

    ``reasons`` are plain sentences for researchers; ``location`` says where (notebook, cell,
    output, mime type). Neither ever holds a data value.
    """

    kind: str
    confidence: float
    reasons: list[str]
    location: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "confidence": round(float(self.confidence), 2),
            "reasons": list(self.reasons),
            "location": dict(self.location),
        }


def summarize(findings: Iterable[Finding | Mapping[str, Any]]) -> dict[str, int]:
    """Count findings by kind (what ``review`` stores and ``scan`` prints as a total)."""
    out = dict.fromkeys(KINDS, 0)
    for f in findings:
        kind = f.kind if isinstance(f, Finding) else f["kind"]
        out[kind] = out.get(kind, 0) + 1
    return out


# --------------------------------------------------------------------------- vocabulary


def _norm(label: Any) -> str:
    """Normalise a column label: lower case, punctuation and underscores become spaces."""
    text = str(label).lower().replace("%", " pct ")
    return " ".join(re.findall(r"[a-z0-9]+", text))


class Vocabulary:
    """Case-level column labels grouped by role (identifier, date, qi:<group>, ...)."""

    def __init__(self, roles: Mapping[str, str] | None = None) -> None:
        self.roles: dict[str, str] = dict(roles or {})

    @classmethod
    def from_files(
        cls, paths: Sequence[str | Path] = (), extra_case: Sequence[str] = ()
    ) -> Vocabulary:
        roles: dict[str, str] = {}
        for path in [DEFAULT_VOCABULARY, *paths]:
            roles.update(_read_vocabulary(Path(path)))
        for label in extra_case:
            roles.setdefault(_norm(label), "case")
        return cls(roles)

    def role(self, label: str) -> str | None:
        return self.roles.get(_norm(label))


class VocabularyError(ValueError):
    """A vocabulary file cannot be read; the message names the file and the fix."""


def _read_vocabulary(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise VocabularyError(
            f"cannot read vocabulary file {path}: {exc.__class__.__name__}; fix the path in "
            "c.DUAGuard.vocabulary_files or make the file readable UTF-8 text"
        ) from None
    roles: dict[str, str] = {}
    section = "case"
    valid = {"identifier", "direct", "date", "per_person", "case"}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip().lower()
            if section not in valid and not section.startswith("qi:"):
                raise VocabularyError(
                    f"{path}:{lineno}: unknown section [{section}]; use one of "
                    "[identifier], [direct], [date], [per_person], [qi:<group>], [case]"
                )
            continue
        roles[_norm(line)] = section
    return roles


@lru_cache(maxsize=1)
def _default_vocabulary() -> Vocabulary:
    return Vocabulary.from_files()


@dataclass
class DetectorSettings:
    """Thresholds of the detector; :meth:`from_guard` reads them from ``DUAGuard``."""

    min_cell_count: int = 16
    allow_zero_cells: bool = True
    k_anonymity: int = 0
    vocabulary: Vocabulary = field(default_factory=_default_vocabulary)

    @property
    def k_threshold(self) -> int:
        return self.k_anonymity or self.min_cell_count

    @classmethod
    def from_guard(cls, guard: Any | None = None) -> DetectorSettings:
        if guard is None:
            return cls()
        vocab = (
            Vocabulary.from_files(guard.vocabulary_files, guard.extra_case_variables)
            if guard.vocabulary_files or guard.extra_case_variables
            else _default_vocabulary()
        )
        return cls(
            min_cell_count=guard.min_cell_count,
            allow_zero_cells=guard.allow_zero_cells,
            k_anonymity=guard.k_anonymity,
            vocabulary=vocab,
        )


# --------------------------------------------------------------------------- table model


@dataclass
class Column:
    """One column (or index level) of a displayed table: its label and visible values."""

    name: str
    values: list[str | None]
    n_unique: int | None = None  # exact, when the whole object was available
    dtype: str | None = None
    #: computes n_unique on demand (in-kernel objects: only for columns that need it)
    unique_fn: Callable[[], int | None] | None = field(default=None, repr=False)

    def exact_unique(self) -> int | None:
        if self.n_unique is None and self.unique_fn is not None:
            try:
                self.n_unique = self.unique_fn()
            except Exception:
                self.n_unique = None
            self.unique_fn = None
        return self.n_unique


@dataclass
class Table:
    """A table as the detector sees it, whatever it was rendered from."""

    columns: list[Column]
    index: list[Column] = field(default_factory=list)
    n_rows: int | None = None  # total rows when the renderer said so
    truncated: bool = False
    source: str = "html"
    series_name: str | None = None
    column_axis_name: str | None = None
    #: exact smallest equivalence class over the given column names (in-kernel only)
    min_class: Callable[[list[str]], int] | None = None
    #: rows behind exact distinct counts (in-kernel: the frame, up to OBJECT_EXACT_ROWS)
    exact_rows: int | None = None

    @property
    def shown_rows(self) -> int:
        cols = self.columns or self.index
        return len(cols[0].values) if cols else 0

    @property
    def total_rows(self) -> int:
        return self.n_rows if self.n_rows is not None else self.shown_rows


_MISSING = {"", "nan", "na", "<na>", "none", "null", "nat", "-", "—", "…", "...", "⋮", "⋯"}
_INT_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+$|^[+-]?\d+$")
_INTF_RE = re.compile(r"^[+-]?\d+\.0+$")
_FLOAT_RE = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_NPCT_RE = re.compile(r"^(\d[\d,]*)\s*\(\s*[<>]?\s*\d+(?:\.\d+)?\s*%?\s*\)$")
_DATE_RE = re.compile(
    r"^(?:\d{4}-\d{1,2}-\d{1,2}(?:[ T]\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?"
    r"|\d{1,2}/\d{1,2}/\d{2,4}|\d{1,2}\.\d{1,2}\.\d{4}"
    r"|\d{1,2}[- ](?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*[- ]\d{2,4})$",
    re.IGNORECASE,
)
_IDVAL_RE = re.compile(
    r"^(?:[A-Za-z]{1,8}[-_ ]?\d{3,}[A-Za-z]?|\d{6,}|"
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$"
)
_PERSON_NAME_RE = re.compile(r"^[A-Z][a-z'’-]+(?:,)?(?: [A-Z]\.?)?(?: [A-Z][a-z'’-]+)+$")


def _clean(value: Any) -> str | None:
    if value is None:
        return None
    text = value.strip() if isinstance(value, str) else str(value).strip()
    if not text:
        return None
    if text[0] == '"' and text[-1] == '"' and len(text) >= 2:
        text = text[1:-1]
    if len(text) <= 5 and text.lower() in _MISSING:
        return None
    return text


def _clean_cell(text: str) -> str | None:
    """``_clean`` for text already stripped by the HTML reader (the common, fast case)."""
    if not text or text[0] == '"' or (len(text) <= 5 and text.lower() in _MISSING):
        return _clean(text)
    return text


def _as_count(text: str | None) -> int | None:
    """The count a cell shows ("12", "1,204", "12.0", "12 (4.5%)"), or None."""
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    if _INT_RE.match(text):
        return int(text.replace(",", ""))
    if _INTF_RE.match(text):
        return int(float(text))
    m = _NPCT_RE.match(text)
    if m:
        return int(m.group(1).replace(",", ""))
    return None


# --------------------------------------------------------------------------- column roles

# fmt: off
_AGG_TOKENS = {
    "mean", "median", "avg", "average", "std", "sd", "stdev", "se", "sem", "var", "variance",
    "sum", "rate", "rates", "pct", "percent", "percentage", "proportion", "prop", "share",
    "ci", "lcl", "ucl", "iqr", "q1", "q3", "incidence", "prevalence", "crude", "adjusted",
    "cumulative", "aapc", "apc", "mortality", "quantile", "percentile", "lower", "upper",
    "population", "denominator", "expected", "per",
}
_COUNT_LABELS = {
    "n", "count", "counts", "freq", "frequency", "frequencies", "cases", "case count",
    "case counts", "no", "num", "number", "size", "deaths", "events", "total", "tally",
    "observations", "obs", "patients", "persons", "people", "subjects", "records",
    "n cases", "number of cases", "no of cases", "n patients", "number of patients",
    "num cases", "count of cases", "n pct", "count pct", "n obs", "nobs", "len",
    "population at risk", "at risk", "observed", "censored", "removed", "entrance",
    "survivors", "tumors", "number of tumors", "all", "grand total", "row total",
}
_COUNT_TOKENS = {"count", "counts", "freq", "frequency", "tally", "nobs"}
_COUNT_LAST_TOKENS = {
    "cases", "deaths", "patients", "persons", "people", "subjects", "events", "tumors",
    "tumours", "diagnoses", "admissions", "survivors", "n",
}  # fmt: skip
_MODEL_LABELS = {
    "coef", "coefficient", "coefficients", "estimate", "estimates", "std err", "std error",
    "stderr", "standard error", "se coef", "t", "z", "t value", "z value", "p", "p value",
    "pvalue", "pr t", "pr z", "pr chi", "p t", "p z", "0 025", "0 975", "conf low",
    "conf high", "statistic", "or", "hr", "rr", "exp coef", "lower 95", "upper 95",
    "lower 0 95", "upper 0 95", "wald", "beta", "odds ratio", "hazard ratio",
    "relative risk", "term", "df", "chi2", "chisq", "f value", "sum sq", "mean sq", "pr f",
    "95 ci", "95pct ci", "coef lower 95pct", "coef upper 95pct", "exp coef lower 95pct",
    "exp coef upper 95pct", "importance", "feature importance", "weight", "loadings",
    "r2", "rmse", "auc", "accuracy", "precision", "recall", "f1", "f1 score", "support",
}
_DESCRIBE_LABELS = {
    "count", "mean", "std", "min", "25%", "50%", "75%", "max", "null_count", "unique",
    "top", "freq", "median", "min.", "1st qu.", "3rd qu.", "max.", "sd", "var", "sum",
    "first", "last", "nunique", "skew", "kurt",
}
_MODEL_ROW_LABELS = {"const", "intercept", "(intercept)", "_cons"}
_NON_PERSON = {
    "registry", "site", "county", "state", "hospital", "facility", "model", "run", "batch",
    "study", "variable", "term", "cluster", "group", "class", "job", "task", "provider",
    "physician", "code", "category", "question", "item", "region", "block", "node", "doc",
    "document", "file", "image", "row", "col", "column", "experiment", "fold", "seed",
    "thread", "process", "session", "request", "product", "order", "transaction",
}
_ID_TOKENS = {"id", "ids", "identifier", "uuid", "guid", "mrn", "ssn", "pubcsnum", "ptid"}
_ID_PHRASES = (
    "record number", "case number", "patient number", "patient no", "chart number",
    "medical record", "social security", "patient key", "person key",
)
_PERSON_NAME_LABELS = {
    "name", "patient name", "full name", "first name", "last name", "surname", "given name",
    "family name", "middle name", "maiden name", "firstname", "lastname", "fname", "lname",
    "decedent",
}
_PERSON_ENTITY_LABELS = {"patient", "person", "subject", "participant", "case", "individual"}
_CONTACT_TOKENS = {"email", "mail", "phone", "telephone", "address", "street", "ssn"}
_DATE_EVENT_TOKENS = {
    "birth", "dob", "diagnosis", "dx", "death", "died", "contact", "followup", "follow",
    "surgery", "admission", "admit", "discharge", "treatment", "visit", "encounter",
}
_QI_TOKENS = {
    "age": "age", "sex": "sex", "gender": "sex", "race": "race", "ethnicity": "race",
    "hispanic": "race", "origin": "race", "county": "geo", "state": "geo", "zip": "geo",
    "zipcode": "geo", "fips": "geo", "tract": "geo", "registry": "geo", "city": "geo",
    "postcode": "geo", "histology": "site", "histologic": "site", "morphology": "site",
    "topography": "site", "behavior": "site", "behaviour": "site", "yob": "year",
}
_CASE_TOKENS = {
    "stage", "grade", "laterality", "surgery", "radiation", "chemo", "chemotherapy",
    "treatment", "tumor", "tumour", "nodes", "eod", "marital", "insurance", "diagnostic",
    "behavior", "cod", "primary", "icd", "icdo3", "seer", "recode", "histo3v", "siteo2v",
    "er", "pr", "her2", "receptor", "biomarker", "tnm", "metastasis", "mets", "lymph",
}
_FINE_QI = {"geo", "year"}
_N_ENTITY_RE = re.compile(
    r"(?:n|num|no|number of|count of) (?:cases|patients|persons|people|subjects|events|deaths|"
    r"obs|records|tumors|tumours|rows|individuals|women|men|participants|diagnoses)"
)
_SURVIVAL_TOKENS = {"survival", "surv", "srv", "vital", "died", "deceased", "dead", "alive"}
_OUTCOME_TOKENS = {"os", "pfs", "dfs", "efs", "rfs", "followup", "fu"}
_TIME_TOKENS = {"months", "month", "days", "day", "time", "years", "status", "event", "mo"}
# fmt: on


@lru_cache(maxsize=4096)
def column_role(label: str, vocabulary: Vocabulary) -> str | None:
    """The detector's reading of a column label (``None`` for an unremarkable column)."""
    norm = _norm(label)
    if not norm:
        return None
    raw = str(label).strip().lower()
    tokens = set(norm.split())
    last = norm.rsplit(" ", 1)[-1]
    is_count = (
        norm in _COUNT_LABELS
        or tokens & _COUNT_TOKENS
        or _N_ENTITY_RE.fullmatch(norm)
        or last in _COUNT_LAST_TOKENS
    )
    if is_count and not tokens & {
        "mean", "median", "avg", "average", "rate", "pct", "percent", "per", "ratio", "rank",
    }:  # fmt: skip
        return "count"
    if norm in _MODEL_LABELS or raw in {
        "p>|t|",
        "p>|z|",
        "pr(>|t|)",
        "pr(>|z|)",
        "[0.025",
        "0.975]",
    }:
        return "model"
    if tokens & _AGG_TOKENS:
        return "agg"
    role = vocabulary.role(label)
    if role:
        return role
    if tokens & _ID_TOKENS or any(p in norm for p in _ID_PHRASES):
        if not tokens & _NON_PERSON:
            return "identifier"
        return None
    if norm in _PERSON_ENTITY_LABELS:
        return "identifier"  # "Patient": an identifier, or names (checked on the values)
    if norm in _PERSON_NAME_LABELS or tokens & _CONTACT_TOKENS:
        return "direct"
    if ("date" in tokens or "dt" in tokens or "dob" in tokens) and (
        tokens & _DATE_EVENT_TOKENS or norm in {"dob", "date"}
    ):
        return "date" if norm != "date" else None
    if "birth" in tokens and "year" in tokens:
        return "qi:year"
    if (
        tokens & _SURVIVAL_TOKENS
        or (tokens & _OUTCOME_TOKENS and tokens & _TIME_TOKENS)
        or ("cause" in tokens and "death" in tokens)
    ):
        return "per_person"
    if "year" in tokens and tokens & {"diagnosis", "dx", "death"}:
        return "qi:year"
    for tok in tokens:
        if tok in _QI_TOKENS:
            return "qi:" + _QI_TOKENS[tok]
        if tok.startswith("zip") or tok in ("postal", "postcode"):
            return "qi:geo"
    if "site" in tokens and tokens & {"primary", "cancer", "tumor", "tumour", "recode"}:
        return "qi:site"
    if tokens & _CASE_TOKENS:
        return "case"
    return None


# --------------------------------------------------------------------------- analysis


def _safe_label(label: str) -> str:
    """A column label fit for a reason; labels that may hold data become 'an unnamed column'."""
    text = " ".join(str(label).split())
    if (
        not text
        or len(text) > 60
        or re.search(r"\d{5,}|@|\d{3}-\d{2}-\d{4}", text)
        or _DATE_RE.match(text)
    ):
        return "an unnamed column"
    return f"'{text}'"


def _cols(cols: list[Column], verb: tuple[str, str] | None = None) -> str:
    """ "column 'A' is" / "columns 'A', 'B' are" (at most three labels named)."""
    names = ", ".join(_safe_label(c.name) for c in cols[:3])
    if len(cols) > 3:
        names += f" and {len(cols) - 3} more"
    text = ("columns " if len(cols) > 1 else "column ") + names
    if verb:
        text += " " + (verb[1] if len(cols) > 1 else verb[0])
    return text


def _looks_range(values: list[str | None]) -> bool:
    """Row labels that number rows: non-negative integers (pandas' default index, R's 1..n,
    or what is left of them after filtering, sampling, sorting or head/tail truncation)."""
    return all(v is not None and v.isdigit() for v in values)


def _distinct_ratio(col: Column) -> float:
    vals = [v for v in col.values if v is not None]
    if not vals:
        return 0.0
    return len(set(vals)) / len(vals)


def _numeric_kind(col: Column) -> str:
    """'int', 'float', 'date', 'text' or 'empty' for the visible values of a column."""
    vals = [v for v in col.values if v is not None]
    if not vals:
        return "empty"
    if all(v.isdigit() or _INT_RE.match(v) for v in vals):
        return "int"
    if all(_DATE_RE.match(v) for v in vals):
        return "date"
    if all(_FLOAT_RE.match(v) or _INT_RE.match(v) for v in vals):
        return "float"
    return "text"


def _is_describe(table: Table) -> bool:
    labels: set[str] = set()
    for col in table.index:
        labels.update(v.lower() for v in col.values if v)
    for col in table.columns:
        if col.name.strip().lower() in {"statistic", "describe", "stat", "metric"}:
            labels.update(v.lower() for v in col.values if v)
    header = {c.name.strip().lower() for c in table.columns}
    return len(labels & _DESCRIBE_LABELS) >= 3 or len(header & _DESCRIBE_LABELS) >= 4


def _is_model(table: Table, roles: list[str | None]) -> bool:
    n_model = sum(r == "model" for r in roles)
    if n_model >= 2:
        return True
    labels = {v.lower() for col in table.index for v in col.values if v}
    if (
        len(table.index) == 1
        and len(table.columns) >= 2
        and [v for v in table.index[0].values] == [c.name for c in table.columns]
        and all(_numeric_kind(c) == "float" for c in table.columns)
    ):
        return True  # a correlation / covariance matrix: variables against variables
    labels |= {v.lower() for col in table.columns[:1] for v in col.values if v}
    return n_model >= 1 and bool(labels & _MODEL_ROW_LABELS)


def analyze_table(table: Table, settings: DetectorSettings) -> list[Finding]:
    """Findings for one table (without location)."""
    vocab = settings.vocabulary
    if not table.columns and not table.index:
        return []
    col_roles = [column_role(c.name, vocab) for c in table.columns]
    idx_roles = [column_role(c.name, vocab) if c.name else None for c in table.index]
    if _is_describe(table) or _is_model(table, col_roles):
        return []
    findings: list[Finding] = []
    n_rows = table.total_rows
    shown = table.shown_rows

    # ---- is it an aggregate (counts / statistics per group)?
    count_cols = [c for c, r in zip(table.columns, col_roles, strict=False) if r == "count"]
    agg_cols = [c for c, r in zip(table.columns, col_roles, strict=False) if r in ("agg",)]
    recognised = sum(r is not None and r not in ("count", "agg") for r in col_roles)
    index_range = all(not c.name and _looks_range(c.values) for c in table.index)
    index_named = any(c.name for c in table.index) or bool(table.column_axis_name)
    all_int = bool(table.columns) and all(
        all(v.isdigit() or _as_count(v) is not None for v in c.values if v is not None)
        for c in table.columns
    )
    series_counts = (
        table.series_name is not None
        and all_int
        and (
            not table.series_name.strip()
            or column_role(table.series_name, vocab) == "count"
            or not index_range
        )
    )
    header_values = sum(
        bool(_INT_RE.match(c.name.strip()) or _FLOAT_RE.match(c.name.strip()))
        for c in table.columns
    )
    crosstab = (
        all_int
        and shown >= 1
        and recognised * 2 < max(1, len(table.columns))
        and (not index_range or index_named or header_values == len(table.columns) > 1)
        and not (table.series_name and not series_counts)
    )
    if table.series_name is not None and series_counts and all_int:
        crosstab = True
        count_cols = list(table.columns)
    grouped = False
    if table.index and not index_range and not any(r == "identifier" for r in idx_roles):
        keys = list(zip(*(c.values for c in table.index), strict=False))
        grouped = len(keys) == len(set(keys)) and not any(
            len(c.values) >= 2 and all(v and _IDVAL_RE.match(v) for v in c.values)
            for c in table.index
        )
    aggregate = bool(count_cols or agg_cols or crosstab or grouped)

    # ---- small cells
    if aggregate:
        cells = [v for c in (table.columns if crosstab else count_cols) for v in c.values]
        if not crosstab:  # "n (%)" cells in a Table 1 are counts too
            cells += [
                v
                for c in table.columns
                if c not in count_cols
                for v in c.values
                if v and _NPCT_RE.match(v)
            ]
        counts = [n for n in (_as_count(v) for v in cells) if n is not None]
        small = [
            n
            for n in counts
            if 0 < n < settings.min_cell_count or (n == 0 and not settings.allow_zero_cells)
        ]
        if small:
            lo = 0 if not settings.allow_zero_cells else 1
            what = (
                "crosstab"
                if crosstab
                else "count column(s) " + ", ".join(_safe_label(c.name) for c in count_cols[:3])
            )
            findings.append(
                Finding(
                    SMALL_CELLS,
                    0.9 if (count_cols or index_named) else 0.75,
                    [
                        f"{len(small)} of {len(counts)} counts in the {what} are between {lo} "
                        f"and {settings.min_cell_count - 1}: NIH small-cell policy requires "
                        f"suppressing counts below {settings.min_cell_count} (DUA sec. 8/17)"
                    ],
                )
            )

    # ---- individual-level
    reasons: list[str] = []
    conf = 0.0
    all_cols = list(zip(table.index, idx_roles, strict=False)) + list(
        zip(table.columns, col_roles, strict=False)
    )
    ids: list[Column] = []
    for col, role in all_cols:
        if (
            role == "identifier"
            and _id_values(col)
            and (
                (
                    (nu := col.exact_unique()) is not None
                    and nu >= 0.9 * max(1, table.exact_rows or n_rows)
                )
                or (nu is None and _distinct_ratio(col) >= 0.9)
            )
        ):
            ids.append(col)
    if not ids and not aggregate:
        for col, role in zip(table.columns, col_roles, strict=False):
            vals = [v for v in col.values if v is not None]
            if (
                role in (None, "identifier")
                and len(vals) >= 3
                and _distinct_ratio(col) == 1.0
                and all(_IDVAL_RE.match(v) for v in vals)
                and not all(_INT_RE.match(v) and len(v) < 7 for v in vals)
            ):
                ids.append(col)
        if not ids and table.index and not index_range:
            for col in table.index:
                vals = [v for v in col.values if v is not None]
                if (
                    len(vals) >= 2
                    and _distinct_ratio(col) == 1.0
                    and all(_IDVAL_RE.match(v) for v in vals)
                ):
                    ids.append(col)
    entity_rows = (not aggregate) or bool(ids)
    per_row = "one per case" if entity_rows else ""
    if ids:
        conf = 0.95
        reasons.append(
            f"{_cols(ids, ('identifies', 'identify'))} persons; "
            f"{n_rows} row{'s' if n_rows != 1 else ''}, "
            f"{per_row or 'one per identifier'}"
        )
    direct_cols = [
        c
        for c, r in all_cols
        if (r == "direct" and _direct_values(c))
        or (r == "identifier" and _norm(c.name) in _PERSON_ENTITY_LABELS and _names_in(c))
    ]
    if direct_cols:
        findings.append(
            Finding(
                DIRECT_IDENTIFIER,
                0.9,
                [
                    f"{_cols(direct_cols, ('holds', 'hold'))} direct identifiers "
                    "(names or contact details)"
                ],
            )
        )
        conf = max(conf, 0.9)
        reasons.append("rows carry direct identifiers of persons")
    if entity_rows:
        dates = [
            c for c, r in all_cols if r == "date" and _numeric_kind(c) in ("date", "text", "empty")
        ]
        per_person = [c for c, r in all_cols if r == "per_person"]
        qis = [(c, r[3:]) for c, r in all_cols if r and r.startswith("qi:")]
        case = [c for c, r in all_cols if r == "case"]
        if dates:
            conf = max(conf, 0.85)
            reasons.append(f"{_cols(dates, ('gives', 'give'))} exact dates per person")
        if per_person and shown >= 1:
            conf = max(conf, 0.8 if (qis or case or shown > 1) else 0.6)
            reasons.append(f"{_cols(per_person, ('is', 'are'))} recorded per person")
        n_vars = len(qis) + len(case) + len(per_person) + len(dates)
        if qis and (len(qis) >= 2 or n_vars >= 2):
            kmin = _min_class(table, [c for c, _ in qis])
            groups = sorted({g for _, g in qis})
            if kmin is not None and kmin < settings.k_threshold:
                conf = max(conf, 0.9 if kmin == 1 else 0.8)
                reasons.append(
                    f"on the quasi-identifiers ({', '.join(groups)}) the smallest group of "
                    f"identical rows has {kmin} person{'s' if kmin != 1 else ''} "
                    f"(k-anonymity below {settings.k_threshold})"
                )
            elif kmin is None and (len(qis) >= 3 or _fine_qis(qis)):
                conf = max(conf, 0.7)
                reasons.append(
                    f"each row combines quasi-identifiers ({', '.join(groups)}) of one person"
                )
        if n_vars >= 4 and not reasons:
            conf = max(conf, 0.6)
            reasons.append(f"{n_vars} case-level registry variables per row")
        if reasons and n_rows > 1 and not ids:
            reasons.append(f"{n_rows} rows, one per case (no count or aggregate columns)")
    if conf >= 0.5 and reasons:
        findings.append(Finding(INDIVIDUAL_LEVEL, conf, reasons))
    return findings


def _fine_qis(qis: list[tuple[Column, str]]) -> bool:
    """Quasi-identifiers fine enough that a few of them single out a person: geography,
    years, or age in single years (not age groups)."""
    for col, group in qis:
        if group in _FINE_QI:
            return True
        if group == "age" and _numeric_kind(col) in ("int", "float"):
            return True
    return False


def _id_values(col: Column) -> bool:
    """Values an identifier column really holds: codes with digits (not floats, not yes/no),
    or names."""
    vals = [v for v in col.values if v is not None]
    if not vals:
        return col.exact_unique() is not None
    if _numeric_kind(col) == "float":
        return False
    with_digits = sum(any(ch.isdigit() for ch in v) for v in vals)
    return with_digits * 5 >= len(vals) * 4 or _names_in(col)


def _names_in(col: Column) -> bool:
    """Whether most visible values look like person names ("Maria Garcia", "Baker, Tom")."""
    vals = [v for v in col.values if v is not None]
    return bool(vals) and sum(bool(_PERSON_NAME_RE.match(v)) for v in vals) * 2 >= len(vals)


def _direct_values(col: Column) -> bool:
    """Whether a 'name'/'email'/... column really holds such values (not codes or blanks)."""
    vals = [v for v in col.values if v is not None]
    if not vals:
        return col.exact_unique() is not None
    norm = _norm(col.name)
    if "mail" in norm:
        return any("@" in v for v in vals)
    if any(t in norm for t in ("phone", "telephone")):
        return any(sum(ch.isdigit() for ch in v) >= 7 for v in vals)
    if "ssn" in norm.split() or "social security" in norm:
        return any(sum(ch.isdigit() for ch in v) >= 9 for v in vals)
    if "address" in norm or "street" in norm:
        return any(re.search(r"\d+\s+\w+", v) for v in vals)
    if norm in ("name", "decedent", "full name", "patient name"):
        return _names_in(col)
    return sum(bool(re.fullmatch(r"[A-Z][a-z'’-]+(?: [A-Z][a-z'’-]+)*", v)) for v in vals) >= max(
        1, len(vals) // 2
    )


def _min_class(table: Table, cols: list[Column]) -> int | None:
    """Smallest group of rows sharing the quasi-identifiers, or None when unknowable."""
    if table.min_class is not None:
        try:
            return table.min_class([c.name for c in cols])
        except Exception:
            return None
    if table.truncated or table.total_rows > table.shown_rows:
        return None
    rows = list(zip(*(c.values for c in cols), strict=False))
    if not rows:
        return None
    return min(Counter(rows).values())


# --------------------------------------------------------------------------- HTML tables


_TR_RE = re.compile(r"<tr\b")
_CELL_RE = re.compile(r"<(t[hd])\b([^>]*)>(.*?)</t[hd]\s*>", re.DOTALL)
_CAPTION_RE = re.compile(r"<caption\b[^>]*>(.*?)</caption\s*>", re.DOTALL)
_SPAN_RE = re.compile(r"""(colspan|rowspan)\s*=\s*["']?(\d+)""")
_INNER_TAG_RE = re.compile(r"<[^>]*>")
#: Body rows read per HTML table: pandas shows at most 60, and the verdict needs no more.
MAX_HTML_ROWS = 120

# A cell: (is_header, text, colspan, rowspan, row_heading)
_Cell = tuple[bool, str, int, int, bool]


def _cell_text(fragment: str) -> str:
    if "<" in fragment:
        fragment = _INNER_TAG_RE.sub(" ", fragment)
    if "&" in fragment:
        fragment = _html_unescape(fragment)
    return " ".join(fragment.split())


def _html_tables(markup: str) -> tuple[list[dict[str, Any]], str]:
    """The <table>s of an HTML fragment as rows of cells, plus the text around them.

    Tables are cut into rows and cells with a few regular expressions (stdlib ``re`` and
    ``html.unescape``): a general HTML parser visits every tag in Python and made a scan
    of a notebook full of pandas tables many times slower than reading it. Rows past
    ``MAX_HTML_ROWS`` are skipped (the table is then treated as truncated).
    """
    low = markup.lower()
    tables: list[dict[str, Any]] = []
    outside: list[str] = []
    pos = 0
    while True:
        start = low.find("<table", pos)
        if start < 0:
            outside.append(markup[pos : pos + 2000])
            break
        outside.append(markup[max(pos, start - 2000) : start])
        end = low.find("</table", start)
        cut = end < 0
        stop = len(markup) if cut else end
        chunk, lchunk = markup[start:stop], low[start:stop]
        nested = lchunk.find("<table", 6)
        if nested > 0:  # a table inside a cell: keep the outer rows before it
            chunk, lchunk = chunk[:nested], lchunk[:nested]
        cap = _CAPTION_RE.search(lchunk) if "<caption" in lchunk else None
        caption = _cell_text(chunk[cap.start(1) : cap.end(1)]) if cap else ""
        head_end = lchunk.find("</thead")
        has_thead = head_end >= 0
        starts = [m.start() for m in _TR_RE.finditer(lchunk)]
        rows: list[dict[str, Any]] = []
        body_rows = 0
        for i, row_start in enumerate(starts):
            section = "head" if has_thead and row_start < head_end else "body"
            if section == "body":
                body_rows += 1
                if body_rows > MAX_HTML_ROWS:
                    cut = True
                    break
            row_stop = starts[i + 1] if i + 1 < len(starts) else len(chunk)
            cells: list[_Cell] = []
            for tag, attrs, content in _CELL_RE.findall(chunk, row_start, row_stop):
                colspan = rowspan = 1
                if "span" in attrs:
                    for name, value in _SPAN_RE.findall(attrs.lower()):
                        if name == "colspan":
                            colspan = max(1, min(int(value), 1000))
                        else:
                            rowspan = max(1, min(int(value), 1000))
                if "<" in content or "&" in content:
                    text = _cell_text(content)
                else:
                    text = content.strip()
                    if "  " in text or "\n" in text:
                        text = " ".join(text.split())
                cells.append((tag[1] == "h", text, colspan, rowspan, "row_heading" in attrs))
            rows.append({"section": section, "cells": cells, "has_thead": has_thead})
        tables.append({"rows": rows, "caption": caption, "body_rows": body_rows, "cut": cut})
        if cut and end < 0:
            break
        pos = (end if end >= 0 else len(markup)) + 8
    return tables, " ".join(outside)


def _int_attr(value: str | None) -> int:
    try:
        return max(1, min(int(value or 1), 1000))
    except ValueError:
        return 1


_SHAPE_PATTERNS = (
    re.compile(r"(\d[\d,]*)\s+rows?\s*[×x]\s*(\d[\d,]*)\s+columns?"),  # pandas
    re.compile(r"shape:\s*\((\d[\d_,]*),\s*(\d[\d_,]*)\)"),  # polars
    re.compile(r"A (?:data\.frame|tibble|data\.table|matrix)[^:]*:\s*(\d[\d,]*)\s*[×x]\s*(\d+)"),
)


def _shape_rows(text: str) -> int | None:
    if "row" not in text and "shape" not in text and "×" not in text:
        return None
    for pat in _SHAPE_PATTERNS:
        m = pat.search(text)
        if m:
            return int(re.sub(r"[,_]", "", m.group(1)))
    return None


def tables_from_html(html: str) -> list[Table]:
    """Parse the tables of an HTML output (pandas, Styler, polars, R, kable, generic)."""
    tail = html[-2000:] if len(html) > MAX_HTML_CHARS else ""
    raw_tables, outside = _html_tables(html[:MAX_HTML_CHARS])
    outside += " " + tail
    out: list[Table] = []
    for raw in raw_tables:
        table = _grid_to_table(raw, len(html) > MAX_HTML_CHARS or raw.get("cut", False))
        if table is None:
            continue
        rows = _shape_rows(raw["caption"]) or (
            _shape_rows(outside) if len(raw_tables) == 1 else None
        )
        if rows is not None:
            table.n_rows = rows
            table.truncated = table.truncated or rows > table.shown_rows
        elif raw.get("cut"):
            table.n_rows = max(table.shown_rows, raw["body_rows"])
        out.append(table)
    return out


def _expand(rows: list[dict[str, Any]]) -> list[list[tuple[bool, str, bool]]]:
    """Rows of (is_header, text, row_heading) with colspan / rowspan expanded to a grid."""
    if not any(c[2] > 1 or c[3] > 1 for row in rows for c in row["cells"]):
        return [[(c[0], c[1], c[4]) for c in row["cells"]] for row in rows]
    grid: list[list[tuple[bool, str, bool]]] = []
    carry: dict[int, tuple[int, tuple[bool, str, bool]]] = {}
    for row in rows:
        out: list[tuple[bool, str, bool]] = []
        col = 0
        cells = iter(row["cells"])
        pending = next(cells, None)
        while pending is not None or any(k >= col for k in carry):
            if col in carry:
                left, cell = carry[col]
                out.append(cell)
                if left <= 1:
                    del carry[col]
                else:
                    carry[col] = (left - 1, cell)
                col += 1
                continue
            if pending is None:
                break
            cell = (pending[0], pending[1], pending[4])
            for _ in range(pending[2]):
                if pending[3] > 1:
                    carry[col] = (pending[3] - 1, cell)
                out.append(cell)
                col += 1
            pending = next(cells, None)
        grid.append(out)
    return grid


_DTYPE_CELL = re.compile(
    r"^(?:<\w+>|i8|i16|i32|i64|u8|u16|u32|u64|f32|f64|str|bool|date|datetime\[.*\]|cat|"
    r"duration\[.*\]|list\[.*\]|object|int64|float64|decimal\[.*\]|enum|null|time)$"
)


def _grid_to_table(raw: dict[str, Any], truncated: bool) -> Table | None:
    grid = _expand(raw["rows"])
    if not grid:
        return None
    # header rows: <thead> rows, else leading all-<th> rows
    head: list[list[tuple[bool, str, bool]]] = []
    body: list[list[tuple[bool, str, bool]]] = []
    sections = [r["section"] for r in raw["rows"]]
    has_thead = "head" in sections
    for row, sec in zip(grid, sections, strict=False):
        if not row:
            continue
        if (has_thead and sec == "head") or (
            not has_thead and not body and all(c[0] for c in row) and len(row) > 1
        ):
            head.append(row)
        else:
            body.append(row)
    width = max(len(r) for r in grid)
    dtypes: list[str] | None = None
    for row in list(head):
        cells = [c[1] for c in row if c[1]]
        if cells and all(
            _DTYPE_CELL.match(t.strip("<>").lower()) or _DTYPE_CELL.match(t) for t in cells
        ):
            dtypes = [c[1] for c in row]
            head.remove(row)
    # number of index columns: leading <th> cells of body rows
    n_idx = 0
    if body:
        n_idx = min(sum(1 for _ in _takewhile_th(r)) for r in body[: min(len(body), 50)])
        n_idx = min(n_idx, width - 1) if width > 1 else n_idx
    # polars/R truncation rows and columns
    is_ellipsis = re.compile(r"^(?:\.\.\.|…|⋮|⋯|\.\.)$")
    trunc = truncated
    kept_body = []
    for row in body:
        data = [c[1] for c in row[n_idx:]]
        if data and all(is_ellipsis.match(t) or not t for t in data) and any(data):
            trunc = True
            continue
        kept_body.append(row)
    body = kept_body
    # column names
    index_names: list[str] = [""] * n_idx
    col_axis_name = ""
    names: list[str] = []
    for j in range(n_idx, width):
        parts = []
        for row in head:
            if j < len(row) and row[j][1] and (not parts or parts[-1] != row[j][1]):
                parts.append(row[j][1])
        names.append(" / ".join(parts))
    for row in head:
        idx_cells = [c[1] for c in row[:n_idx]]
        data_cells = [c[1] for c in row[n_idx:]]
        if any(idx_cells) and not any(data_cells):
            index_names = idx_cells + [""] * (n_idx - len(idx_cells))
        elif any(idx_cells) and any(data_cells) and n_idx:
            col_axis_name = idx_cells[-1]
    drop = {j for j, n in enumerate(names) if is_ellipsis.match(n)}
    if drop:
        trunc = True
    columns = [
        Column(
            names[j],
            [_clean_cell(r[n_idx + j][1]) if n_idx + j < len(r) else None for r in body],
            dtype=(dtypes[n_idx + j] if dtypes and n_idx + j < len(dtypes) else None),
        )
        for j in range(len(names))
        if j not in drop
    ]
    index = [
        Column(index_names[i], [_clean(r[i][1]) if i < len(r) else None for r in body])
        for i in range(n_idx)
    ]
    if not columns and not index:
        return None
    return Table(
        columns=columns,
        index=index,
        truncated=trunc,
        source="html",
        column_axis_name=col_axis_name or None,
    )


def _takewhile_th(row: list[tuple[bool, str, bool]]) -> Iterable[tuple[bool, str, bool]]:
    for cell in row:
        if not cell[0] and not cell[2]:
            return
        yield cell


# --------------------------------------------------------------------------- text tables

_POLARS_BORDER = re.compile(r"^[┌└╞├╰╭]")
_FOOTER_ROWS = (
    re.compile(r"^\[(\d[\d,]*) rows x (\d+) columns\]$"),
    re.compile(r"^#\s*A (?:tibble|data\.table|data frame):\s*(\d[\d,]*)\s*[×x]\s*(\d+)"),
    re.compile(r"^shape:\s*\((\d[\d_]*),\s*(\d+)\)$"),
)
_MORE_ROWS = re.compile(
    r"(?:#\s*(?:ℹ|…|\.\.\.)\s*(?:with\s*)?(\d[\d,]*) more rows?|omitted (\d[\d,]*) rows)"
)
_SERIES_FOOTER = re.compile(r"^(?:Name: (.*?), )?(?:Length: (\d+), )?dtype: \w+")
_TYPE_ROW = re.compile(r"^\s*(?:<[\w.]+>\s*)+$")


def _may_hold_table(text: str) -> bool:
    """Cheap test: printed frames have several lines and aligned columns, pipes or boxes."""
    first = text.find("\n")
    if first < 0 or first == len(text.rstrip()) or text.count("\n", 0, 20_000) < 1:
        return False
    return "  " in text or "|" in text or "│" in text or "\n " in text or text[:1] == " "


def tables_from_text(text: str) -> list[Table]:
    """Parse printed frames in plain text (pandas, R data.frame / tibble / table, polars, kable)."""
    text = text[:MAX_TEXT_CHARS]
    if not _may_hold_table(text):
        return []
    lines = text.split("\n")[: MAX_TEXT_TABLE_LINES * 4]
    tables: list[Table] = []
    block: list[str] = []
    blocks: list[list[str]] = []
    for line in lines:
        line = line.rstrip("\r").replace("\t", "    ")
        if line.strip():
            block.append(line)
        elif block:
            blocks.append(block)
            block = []
    if block:
        blocks.append(block)
    for block in blocks[:50]:
        block = block[:MAX_TEXT_TABLE_LINES]
        if len(block) == 1 and tables:
            m = _FOOTER_ROWS[0].match(block[0].strip()) or _MORE_ROWS.search(block[0])
            if m:  # pandas prints "[N rows x M columns]" after a blank line
                rows = next((g for g in m.groups() if g), None)
                if rows and m.re is _FOOTER_ROWS[0]:
                    tables[-1].n_rows = int(rows.replace(",", ""))
                tables[-1].truncated = (
                    tables[-1].truncated
                    or tables[-1].total_rows > tables[-1].shown_rows
                    or m.re is _MORE_ROWS
                )
                continue
        if any(_POLARS_BORDER.match(b.lstrip()) for b in block):
            t = _polars_text(block)
            if t:
                tables.append(t)
            continue
        if sum(b.lstrip().startswith("|") for b in block) >= 2:
            t = _pipe_text(block)
            if t:
                tables.append(t)
            continue
        tables.extend(_aligned_text(block))
    return tables


def _polars_text(block: list[str]) -> Table | None:
    n_rows = None
    head: list[list[str]] = []
    body: list[list[str]] = []
    seen_sep = False
    for line in block:
        s = line.strip()
        m = _FOOTER_ROWS[2].match(s)
        if m:
            n_rows = int(m.group(1).replace("_", ""))
            continue
        if not s.startswith("│"):
            if s.startswith("╞"):
                seen_sep = True
            continue
        cells = [c.strip() for c in s.strip("│").split("┆")]
        if not seen_sep:
            head.append(cells)
        else:
            body.append(cells)
    if not head:
        return None
    names = head[0]
    dtypes = head[-1] if len(head) > 2 else None
    trunc = False
    body2 = []
    for r in body:
        if all(c in ("…", "...") for c in r):
            trunc = True
        else:
            body2.append(r)
    cols = [
        Column(
            n,
            [_clean(r[j]) if j < len(r) else None for r in body2],
            dtype=dtypes[j] if dtypes and j < len(dtypes) else None,
        )
        for j, n in enumerate(names)
        if n not in ("…", "...")
    ]
    t = Table(cols, n_rows=n_rows, source="polars-text")
    t.truncated = trunc or (n_rows is not None and n_rows > len(body2))
    return t


def _pipe_text(block: list[str]) -> Table | None:
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in block
        if line.lstrip().startswith("|")
    ]
    rows = [r for r in rows if not all(re.fullmatch(r":?-{2,}:?", c) for c in r if c)]
    if len(rows) < 1:
        return None
    names, body = rows[0], rows[1:]
    n_idx = 1 if names and not names[0] else 0
    cols = [
        Column(n, [_clean(r[j]) if j < len(r) else None for r in body])
        for j, n in enumerate(names)
        if j >= n_idx
    ]
    index = [Column("", [_clean(r[0]) if r else None for r in body])] if n_idx else []
    return Table(cols, index=index, source="kable")


_TOKEN_RE = re.compile(r"\S+")


def _segments(lines: list[str]) -> list[tuple[int, int]]:
    width = max(len(s) for s in lines)
    filled = bytearray(width)
    for line in lines:
        for m in _TOKEN_RE.finditer(line):
            filled[m.start() : m.end()] = b"\x01" * (m.end() - m.start())
    segs = []
    start = None
    for pos in range(width):
        if filled[pos] and start is None:
            start = pos
        elif not filled[pos] and start is not None:
            segs.append((start, pos))
            start = None
    if start is not None:
        segs.append((start, width))
    return segs


def _aligned_text(block: list[str]) -> list[Table]:
    """Whitespace-aligned frames (pandas, R): columns found from the blank gutters."""
    n_rows: int | None = None
    series_name: str | None = None
    is_series = False
    lines: list[str] = []
    trunc = False
    for line in block:
        s = line.strip()
        if _MORE_ROWS.search(s):
            trunc = True
            continue
        m = _FOOTER_ROWS[0].match(s) or _FOOTER_ROWS[1].match(s)
        if m:
            n_rows = int(m.group(1).replace(",", ""))
            continue
        m = _SERIES_FOOTER.match(s)
        if m:
            is_series = True
            series_name = m.group(1) or ""
            if m.group(2):
                n_rows = int(m.group(2))
            continue
        if s.startswith("#") or _TYPE_ROW.match(line):
            continue
        padded = line != line.rstrip()
        line = line.rstrip()
        if s.endswith("\\") and not s.endswith("\\\\"):
            line = line.rstrip("\\").rstrip()
        lines.append(line + (" " if padded else ""))
    lines = _drop_prose(lines)
    if len(lines) < 2:
        return []
    if is_series:
        return _series_text([x.rstrip() for x in lines], series_name or "", n_rows, trunc)
    one_way = _r_one_way_table([x.strip() for x in lines])
    if one_way is not None:
        return [one_way]
    r_axis = None
    if (
        len(lines) >= 3
        and lines[0].startswith(" ")
        and len(lines[0].split()) == 1
        and all(x.startswith("  ") for x in lines[2:])
    ):  # R's table(): column variable alone on the first line, row variable below
        r_axis = lines[0].strip()
        lines = lines[1:]
    n_head = 1  # pandas prints one header line per column level, indented past the index
    first_col = len(lines[0]) - len(lines[0].lstrip())
    while (
        n_head < len(lines) - 1
        and first_col > 0
        and lines[n_head][:1] == " "
        and len(lines[n_head]) - len(lines[n_head].lstrip()) >= first_col
    ):
        n_head += 1
    head, body = lines[:n_head], lines[n_head:]
    # pandas index-name row right under the header: nothing in the last data column
    idx_name_rows = []
    if len(body) >= 2:
        data_segs = _segments([b.rstrip() for b in body[1:]])
        if len(data_segs) >= 2 and len(body[0].rstrip()) <= data_segs[-1][0]:
            idx_name_rows.append(body.pop(0))
    lines = [x.rstrip() for x in lines]
    head = [x.rstrip() for x in head]
    body = [x.rstrip() for x in body]
    idx_name_rows = [x.rstrip() for x in idx_name_rows]
    segs = _segments(head + idx_name_rows + body)
    if len(segs) < 2 or not body:
        return []
    segs = _merge_segments(segs, head, body)
    if len(segs) < 2:
        return []
    hfields = [_fields(h, segs) for h in head]
    bfields = [_fields(b, segs) for b in body]
    ifields = [_fields(h, segs) for h in idx_name_rows]
    names = [" ".join(h[j] for h in hfields if h[j]) for j in range(len(segs))]
    first_is_index = is_series or (not names[0]) or bool(idx_name_rows) or bool(r_axis)
    if not first_is_index and body and all(_INT_RE.match(b[0] or "x") for b in bfields):
        # R prints row names 1..n under an empty header; pandas does too under a blank
        first_is_index = not names[0]
    col_axis_name = names[0] if (idx_name_rows and names[0]) else r_axis
    if r_axis and names[0] and not idx_name_rows:
        ifields = [[names[0]] + [""] * (len(segs) - 1)]
        names[0] = ""
    # sparse MultiIndex (pandas leaves repeated outer labels blank): carry them down
    n_idx = 1 if first_is_index else 0
    if idx_name_rows:
        n_idx = max(1, sum(1 for x in ifields[0] if x and x not in ("...", "…")))
        n_idx = min(n_idx, len(segs) - 1)
    for j in range(n_idx):
        last = None
        for row in bfields:
            if row[j]:
                last = row[j]
            elif last is not None and any(row[j + 1 :]):
                row[j] = last
    trunc_rows = []
    for row in bfields:
        if all((v in ("...", "..", "…", "⋮") or not v) for v in row):
            trunc = True
        else:
            trunc_rows.append(row)
    bfields = trunc_rows
    cols = []
    for j in range(n_idx, len(segs)):
        if names[j] in ("...", "…"):
            trunc = True
            continue
        cols.append(Column(names[j], [_clean(r[j]) for r in bfields]))
    index = [
        Column(ifields[0][j] if ifields else "", [_clean(r[j]) for r in bfields])
        for j in range(n_idx)
    ]
    if is_series and cols:
        cols[0].name = series_name or ""
    t = Table(
        cols,
        index=index,
        n_rows=n_rows,
        truncated=trunc or (n_rows is not None and n_rows > len(bfields)),
        source="text",
        series_name=series_name if is_series else None,
        column_axis_name=col_axis_name,
    )
    return [t] if cols else []


def _r_one_way_table(lines: list[str]) -> Table | None:
    """R's print of a one-way table(): a line of labels over a line of counts (repeated
    when wide), optionally under the variable name."""
    name = ""
    if len(lines) % 2 == 1 and len(lines[0].split()) == 1:
        name, lines = lines[0], lines[1:]
    if len(lines) < 2 or len(lines) % 2:
        return None
    labels: list[str] = []
    counts: list[str] = []
    for top, bottom in zip(lines[::2], lines[1::2], strict=True):
        heads, values = top.split(), bottom.split()
        if len(heads) != len(values) or not all(v.isdigit() for v in values):
            return None
        if all(h.isdigit() for h in heads) and len(heads) > 1 and not name:
            return None  # two lines of plain numbers, not a labelled table
        labels += heads
        counts += values
    return Table(
        [Column("", [_clean(v) for v in counts])],
        index=[Column(name, [_clean(v) for v in labels])],
        source="text",
        series_name="",
    )


def _series_text(lines: list[str], name: str, n_rows: int | None, trunc: bool) -> list[Table]:
    """A printed pandas Series: index label(s) on the left, the value right-aligned last."""
    ends = [len(line) for line in lines]
    right = max(ends)
    head: list[str] = []
    if len(lines) > 1 and ends[0] < right and len(lines[0].split()) >= 1:
        body_right = max(ends[1:])
        if ends[0] < body_right:
            head = [lines[0]]
    body = lines[len(head) :]
    values: list[str | None] = []
    idx_lines: list[str] = []
    for line in body:
        stripped = line.rstrip()
        cut = stripped.rfind(" ")
        if cut < 0:
            values.append(_clean(stripped))
            idx_lines.append("")
            continue
        values.append(_clean(stripped[cut + 1 :]))
        idx_lines.append(stripped[:cut])
    if all(v in (None, "...") for v in values):
        return []
    segs = _segments([x for x in idx_lines + head if x.strip()] or [""])
    if head:
        segs = _merge_segments(segs, head, idx_lines)
    index: list[Column] = []
    for j, (s, e) in enumerate(segs):
        vals = [line[s:e].strip() or None for line in idx_lines]
        last = None
        for i, v in enumerate(vals):  # sparse MultiIndex: carry outer labels down
            if v:
                last = v
            else:
                vals[i] = last
        hname = head[0][s:e].strip() if head else ""
        index.append(Column(hname if j < len(segs) else "", [_clean(v) for v in vals]))
    rows = [i for i, v in enumerate(values) if v not in ("...", "…")]
    if len(rows) < len(values):
        trunc = True
    for c in index:
        c.values = [c.values[i] for i in rows]
    col = Column(name, [values[i] for i in rows])
    return [
        Table(
            [col],
            index=index,
            n_rows=n_rows,
            truncated=trunc or (n_rows is not None and n_rows > len(rows)),
            source="text",
            series_name=name,
        )
    ]


def _drop_prose(lines: list[str]) -> list[str]:
    """Drop leading sentences printed before a frame (``print("Cases:"); print(df)``)."""
    while len(lines) > 2:
        first = lines[0].strip()
        words = first.split(" ")
        if first.endswith((":", ".")) or (len(words) >= 4 and "  " not in first):
            lines = lines[1:]
        else:
            break
    return lines


def _fields(line: str, segs: list[tuple[int, int]]) -> list[str]:
    return [line[s:e].strip() for s, e in segs]


def _merge_segments(
    segs: list[tuple[int, int]], head: list[str], body: list[str]
) -> list[tuple[int, int]]:
    """Join segments split by a space inside a header ('Age at diagnosis') or a value."""
    segs = list(segs)
    changed = True
    while changed and len(segs) > 1:
        changed = False
        for j, (s, e) in enumerate(segs):
            data_empty = all(not b[s:e].strip() for b in body)
            head_empty = all(not h[s:e].strip() for h in head)
            if j == 0 and head_empty and not data_empty:
                continue  # the index column has no header
            if not (data_empty or head_empty):
                continue
            left_gap = s - segs[j - 1][1] if j > 0 else None
            right_gap = segs[j + 1][0] - e if j + 1 < len(segs) else None
            if right_gap == 1 or (right_gap is not None and left_gap != 1):
                k = j + 1
            elif left_gap is not None:
                k = j - 1
            else:
                continue
            a, b = sorted((j, k))
            segs[a : b + 1] = [(segs[a][0], segs[b][1])]
            changed = True
            break
    return segs


# --------------------------------------------------------------------------- other inputs


def table_from_dataresource(obj: Any) -> Table | None:
    """``application/vnd.dataresource+json`` (pandas ``to_json(orient="table")``)."""
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except ValueError:
            return None
    if not isinstance(obj, Mapping):
        return None
    schema = obj.get("schema")
    schema = schema if isinstance(schema, Mapping) else {}
    raw_fields = schema.get("fields")
    raw_fields = raw_fields if isinstance(raw_fields, list) else []
    fields = [f.get("name") for f in raw_fields if isinstance(f, Mapping)]
    data = obj.get("data") or []
    if not isinstance(data, list):
        return None
    pk = schema.get("primaryKey") or []
    if isinstance(pk, str):
        pk = [pk]
    rows = [r for r in data[:OBJECT_SAMPLE_ROWS] if isinstance(r, Mapping)]
    if not fields and rows:
        fields = list(rows[0])

    def col(name: Any) -> Column:
        return Column(str(name), [_clean(_fmt(r.get(name))) for r in rows])

    index = [col(n) for n in fields if n in pk]
    for c in index:
        if c.name in ("index", "level_0"):
            c.name = ""
    cols = [col(n) for n in fields if n not in pk]
    return Table(cols, index=index, n_rows=len(data), source="dataresource")


def _fmt(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 1e15 else str(value)
    return value


def table_from_object(obj: Any) -> Table | None:
    """A pandas / polars DataFrame or Series, with exact row counts and class sizes."""
    mod = type(obj).__module__.split(".")[0]
    if mod == "pandas" and "pandas" in sys.modules:
        return _table_from_pandas(obj)
    if mod == "polars" and "polars" in sys.modules:
        return _table_from_polars(obj)
    return None


def _table_from_pandas(obj: Any) -> Table | None:
    import pandas as pd

    series_name = None
    if type(obj).__name__ == "Styler" and isinstance(getattr(obj, "data", None), pd.DataFrame):
        obj = obj.data  # df.style: judge the frame behind the styling
    if isinstance(obj, pd.Series):
        series_name = "" if obj.name is None else str(obj.name)
        obj = obj.to_frame(name=series_name)
    if not isinstance(obj, pd.DataFrame):
        return None
    n_rows = len(obj)
    df = obj.head(OBJECT_EXACT_ROWS) if n_rows > OBJECT_EXACT_ROWS else obj
    sample = df.head(OBJECT_SAMPLE_ROWS)
    cols = []
    for j, name in enumerate(df.columns):
        label = " / ".join(str(x) for x in name) if isinstance(name, tuple) else str(name)
        ser = df.iloc[:, j]
        cols.append(
            Column(
                label,
                [_clean(_fmt(v)) for v in sample.iloc[:, j].tolist()],
                dtype=str(ser.dtype),
                unique_fn=lambda ser=ser: int(ser.nunique(dropna=True)),
            )
        )
    index = []
    if not isinstance(df.index, pd.RangeIndex):
        for lvl in range(df.index.nlevels):
            values = df.index.get_level_values(lvl)
            index.append(
                Column(
                    "" if df.index.names[lvl] is None else str(df.index.names[lvl]),
                    [_clean(_fmt(v)) for v in values[:OBJECT_SAMPLE_ROWS].tolist()],
                    unique_fn=lambda values=values: int(values.nunique()),
                )
            )
    label_of = {c.name: df.columns[j] for j, c in enumerate(cols)}
    index_of = {c.name: i for i, c in enumerate(index) if c.name}

    def min_class(names: list[str]) -> int:
        keys = [
            df[label_of[n]] if n in label_of else df.index.get_level_values(index_of[n])
            for n in names
        ]
        frame = pd.DataFrame({i: pd.Series(k).reset_index(drop=True) for i, k in enumerate(keys)})
        return int(frame.groupby(list(frame.columns), dropna=False, observed=True).size().min())

    axis_name = df.columns.name
    return Table(
        cols,
        index=index,
        n_rows=n_rows,
        exact_rows=len(df),
        truncated=False,
        source="pandas",
        series_name=series_name,
        column_axis_name=None if axis_name is None else str(axis_name),
        min_class=min_class if len(df) else None,
    )


def _table_from_polars(obj: Any) -> Table | None:
    import polars as pl

    series_name = None
    if isinstance(obj, pl.Series):
        series_name = obj.name or ""
        obj = obj.to_frame()
    if not isinstance(obj, pl.DataFrame):
        return None
    n_rows = obj.height
    df = obj.head(OBJECT_EXACT_ROWS)
    sample = df.head(OBJECT_SAMPLE_ROWS)
    cols = [
        Column(
            name,
            [_clean(_fmt(v)) for v in sample[name].to_list()],
            unique_fn=lambda name=name: int(df[name].n_unique()),
            dtype=str(df.schema[name]),
        )
        for name in df.columns
    ]

    def min_class(names: list[str]) -> int:
        return int(df.group_by(names).len()["len"].min())

    return Table(
        cols,
        n_rows=n_rows,
        exact_rows=df.height,
        source="polars",
        series_name=series_name,
        min_class=min_class if df.height else None,
    )


# --------------------------------------------------------------------------- identifiers in text

_SSN_RE = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")
_SSN_QUICK_RE = re.compile(r"-\d\d-\d\d\d\d")  # starts with a literal: fast to search
_EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_MRN_RE = re.compile(
    r"\b(?:MRN|medical record (?:number|no\.?|#))\s*[:#=]?\s*[A-Z]{0,4}[-]?\d{4,}", re.IGNORECASE
)
_DOB_RE = re.compile(
    r"\b(?:DOB|D\.O\.B\.?|date of birth|birth ?date|born(?: on)?)\b\W{0,3}"
    r"(?:\d{4}-\d{1,2}-\d{1,2}|\d{1,2}/\d{1,2}/\d{2,4}|\d{1,2}\.\d{1,2}\.\d{4}|"
    r"[A-Z][a-z]+ \d{1,2},? \d{4}|\d{1,2} [A-Z][a-z]+ \d{4})",
    re.IGNORECASE,
)
_NAME_RE = re.compile(r"\b([A-Z][a-z'’-]+),? ([A-Z]\. )?([A-Z][a-z'’-]+)\b")
# fmt: off
_NAME_STOP = {
    "Date", "Birth", "Patient", "Name", "Age", "Sex", "The", "Of", "Year", "Male", "Female",
    "Born", "Record", "Medical", "Number", "Case", "Study", "Primary", "Site", "Stage",
    "Grade", "Race", "White", "Black", "Other", "Hispanic", "Non", "County", "State",
    "Registry", "Vital", "Status", "Alive", "Dead", "Survival", "Months", "Diagnosis",
    "Unknown", "Cancer", "Breast", "Lung", "Colon", "Prostate", "Total", "All", "Mr", "Mrs",
    "Ms", "Dr", "On", "In", "At", "And", "For", "With", "Id", "January", "February", "March",
    "April", "May", "June", "July", "August", "September", "October", "November", "December",
}
# fmt: on


def detect_text(text: str) -> list[Finding]:
    """Direct identifiers in free text: SSN-, MRN-, e-mail-like values, names next to DOB."""
    text = text[:MAX_TEXT_CHARS]
    reasons = []
    if "-" in text and _SSN_QUICK_RE.search(text):
        n = len(_SSN_RE.findall(text))
        if n:
            reasons.append(f"{n} SSN-like value{'s' if n > 1 else ''}")
    if "@" in text:
        n = len(_EMAIL_RE.findall(text))
        if n:
            reasons.append(f"{n} e-mail address{'es' if n > 1 else ''}")
    low = text.lower()
    if "mrn" in low or "medical record" in low:
        n = len(_MRN_RE.findall(text))
        if n:
            reasons.append(f"{n} medical-record-number-like value{'s' if n > 1 else ''}")
    if "dob" in low or "birth" in low or "born" in low or "d.o.b" in low:
        n = 0
        for line in text.splitlines():
            if _DOB_RE.search(line) and _has_name(line):
                n += 1
        if n:
            reasons.append(
                f"{n} line{'s' if n > 1 else ''} with a person's name next to a date of birth"
            )
    if not reasons:
        return []
    return [
        Finding(
            DIRECT_IDENTIFIER,
            0.9,
            ["the output shows " + "; ".join(reasons) + " (values withheld)"],
        )
    ]


def _has_name(line: str) -> bool:
    if re.search(r"\bname\s*[:=]\s*\S", line, re.IGNORECASE):
        return True
    for m in _NAME_RE.finditer(line):
        if m.group(1) not in _NAME_STOP and m.group(3) not in _NAME_STOP:
            return True
    return False


# --------------------------------------------------------------------------- entry points


def _merge(findings: list[Finding], location: Mapping[str, Any] | None) -> list[Finding]:
    """One finding per kind per output: the highest confidence, all distinct reasons."""
    by_kind: dict[str, Finding] = {}
    for f in findings:
        prev = by_kind.get(f.kind)
        if prev is None:
            by_kind[f.kind] = Finding(f.kind, f.confidence, list(f.reasons), dict(location or {}))
        else:
            prev.confidence = max(prev.confidence, f.confidence)
            prev.reasons.extend(r for r in f.reasons if r not in prev.reasons)
    return [by_kind[k] for k in KINDS if k in by_kind]


def _text_of(value: Any) -> str:
    if isinstance(value, list):  # nbformat stores multi-line strings as lists of lines
        try:
            return "".join(value)
        except TypeError:
            return "".join(str(v) for v in value)
    return value if isinstance(value, str) else ""


def detect_bundle(
    bundle: Mapping[str, Any],
    *,
    obj: Any = None,
    settings: DetectorSettings | None = None,
    location: Mapping[str, Any] | None = None,
) -> list[Finding]:
    """Findings for one mime bundle; ``obj`` is the displayed object when known (in a kernel)."""
    settings = settings or DetectorSettings()
    findings: list[Finding] = []
    tables: list[Table] = []
    text_for_ids = ""
    table = table_from_object(obj) if obj is not None else None
    if table is not None:
        tables.append(table)
        text_for_ids = _text_of(bundle.get("text/plain"))
    elif "application/vnd.dataresource+json" in bundle:
        t = table_from_dataresource(bundle["application/vnd.dataresource+json"])
        if t is not None:
            tables.append(t)
        text_for_ids = _text_of(bundle.get("text/plain"))
    if not tables:
        html = _text_of(bundle.get("text/html"))
        if html and "<t" in html[:MAX_HTML_CHARS].lower():
            tables.extend(tables_from_html(html))
        if tables:
            text_for_ids = _html_text(html) if _html_may_identify(html) else ""
        else:
            plain = _text_of(bundle.get("text/plain")) or _text_of(bundle.get("text/markdown"))
            if plain:
                tables.extend(tables_from_text(plain))
                text_for_ids = plain
            elif html:
                text_for_ids = _html_text(html)
    elif not text_for_ids:
        text_for_ids = _cells_text(tables)
    for t in tables:
        findings.extend(analyze_table(t, settings))
    if text_for_ids:
        findings.extend(detect_text(text_for_ids))
    return _merge(findings, location)


_ROW_END_RE = re.compile(r"</tr\s*>|<br\s*/?>|</p\s*>|</div\s*>|</li\s*>", re.IGNORECASE)


def _html_may_identify(markup: str) -> bool:
    """Cheap test before the identifier patterns run on an HTML output's text."""
    low = markup[:MAX_HTML_CHARS].lower()
    return (
        "@" in low
        or "mrn" in low
        or "medical record" in low
        or "dob" in low
        or "birth" in low
        or "born" in low
        or (_SSN_QUICK_RE.search(markup, 0, MAX_HTML_CHARS) is not None)
    )


def _html_text(markup: str) -> str:
    """The text of an HTML output, one table row per line (for the identifier patterns)."""
    text = " ".join(markup[:MAX_HTML_CHARS].split())
    text = _INNER_TAG_RE.sub(" ", _ROW_END_RE.sub("\n", text))
    return _html_unescape(text) if "&" in text else text


def _cells_text(tables: list[Table]) -> str:
    lines = []
    for t in tables:
        cols = t.index + t.columns
        for i in range(min(t.shown_rows, 500)):
            lines.append(
                "  ".join(f"{c.name}: {c.values[i] or ''}" for c in cols if i < len(c.values))
            )
    return "\n".join(lines)


def detect_output(
    output: Mapping[str, Any],
    *,
    settings: DetectorSettings | None = None,
    location: Mapping[str, Any] | None = None,
) -> list[Finding]:
    """Findings for one nbformat output (stream, execute_result, display_data, error)."""
    otype = output.get("output_type")
    if otype == "stream":
        text = _text_of(output.get("text"))
        return detect_bundle({"text/plain": text}, settings=settings, location=location)
    if otype in ("execute_result", "display_data", "update_display_data"):
        data = output.get("data") or {}
        if not isinstance(data, Mapping):
            return []
        return detect_bundle(data, settings=settings, location=location)
    if otype == "error":
        text = "\n".join(str(x) for x in output.get("traceback") or [])
        return _merge(detect_text(text + "\n" + str(output.get("evalue", ""))), location)
    return []


def detect_object(
    obj: Any,
    *,
    settings: DetectorSettings | None = None,
    location: Mapping[str, Any] | None = None,
) -> list[Finding]:
    """Findings for a pandas / polars object itself (exact counts, whole frame)."""
    return detect_bundle({}, obj=obj, settings=settings, location=location)


def detect(
    data: Any,
    *,
    obj: Any = None,
    settings: DetectorSettings | None = None,
    location: Mapping[str, Any] | None = None,
) -> list[Finding]:
    """One entry point for any input: an nbformat output, a mime bundle, or an object.

    A mapping with ``output_type`` is an nbformat output; another mapping is a mime bundle;
    anything else (a pandas / polars frame or series) is the displayed object itself.
    """
    if isinstance(data, Mapping):
        if "output_type" in data:
            return detect_output(data, settings=settings, location=location)
        return detect_bundle(data, obj=obj, settings=settings, location=location)
    if isinstance(data, str):
        return detect_bundle({"text/plain": data}, settings=settings, location=location)
    return detect_object(data, settings=settings, location=location)
