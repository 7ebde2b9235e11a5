"""Tabular schema: feature types, one-hot encoding, standardisation, decoding.

Encoding follows TabLeak (eth-sri/tableak ``datasets/base_dataset.py``): every categorical
feature (binaries included) is one-hot, continuous features stay raw, then *all* columns
are standardised with the mean/std of the whole table (std 0 -> 1). Decoding undoes the
standardisation, takes the argmax per categorical block and rounds continuous values
(``floor(x + 0.5)``) unless the feature is marked non-integer.

Besides the DataFrame round trip (``encode``/``decode``) the schema offers array-level
helpers used inside the attack (``decode_arrays``, ``project``, ``feature_errors``) so that
ensembles of candidates are decoded and matched without building DataFrames.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

CONT_TOL = 0.319  # TabLeak create_tolerance_map(tol=0.319): continuous cell correct iff |x̂-x| <= 0.319 σ


@dataclass(frozen=True)
class Feature:
    name: str
    kind: str  # "categorical" | "continuous"
    categories: tuple[str, ...] = ()
    lower: float = 0.0  # continuous bounds in raw units
    upper: float = 0.0
    std: float = 1.0  # raw std (continuous accuracy tolerance = 0.319 * std)
    integer: bool = True

    @property
    def width(self) -> int:
        return len(self.categories) if self.kind == "categorical" else 1


def _missing(v) -> bool:
    """A missing cell (None, NaN): never a category, even one spelled "None" or "nan"."""
    return v is None or (isinstance(v, float) and v != v)


def _clean_label(s: pd.Series) -> pd.Series:
    return s.astype(str).str.strip().str.rstrip(".")


@dataclass(frozen=True)
class TabularSchema:
    features: tuple[Feature, ...]
    label: str
    classes: tuple[str, ...]
    mean: np.ndarray = field(repr=False)  # per encoded column
    scale: np.ndarray = field(repr=False)
    dropped: tuple[str, ...] = ()  # constant columns left out at inference

    @property
    def dim(self) -> int:
        return sum(f.width for f in self.features)

    def blocks(self) -> list[tuple[Feature, slice]]:
        out, start = [], 0
        for f in self.features:
            out.append((f, slice(start, start + f.width)))
            start += f.width
        return out

    @property
    def categorical(self) -> list[tuple[Feature, slice]]:
        return [(f, s) for f, s in self.blocks() if f.kind == "categorical"]

    @property
    def continuous(self) -> list[tuple[Feature, slice]]:
        return [(f, s) for f, s in self.blocks() if f.kind == "continuous"]

    @property
    def continuous_index(self) -> np.ndarray:
        return np.array([s.start for _, s in self.continuous], dtype=int)

    # -- build ---------------------------------------------------------------------------
    @classmethod
    def infer(cls, df: pd.DataFrame, *, label: str, categorical: Sequence[str] | None = None,
              continuous: Sequence[str] | None = None, categories: Mapping[str, Sequence[str]] | None = None,
              max_categories: int = 64, integer: Mapping[str, bool] | None = None) -> "TabularSchema":
        """Infer a schema from a table.

        Non-numeric columns are categorical, numeric ones continuous, unless listed in
        ``categorical`` / ``continuous``. ``categories`` fixes the category list of a column
        (e.g. the paper's lists, which include values absent after dropping missing rows).
        Missing values are ignored for the statistics; constant columns are dropped (they
        carry nothing to reconstruct) and listed in ``dropped``.
        """
        if label not in df.columns:
            raise ValueError(f"label column {label!r} not in the table; columns: {', '.join(map(str, df.columns))}")
        labels = _clean_label(df[label].dropna())
        classes = tuple(sorted(labels.unique()))
        if len(classes) != 2:
            raise ValueError(f"label column {label!r} must be binary, found {len(classes)} values: "
                             f"{list(classes)[:5]}; pick a binary column with --label")
        categorical, continuous = list(categorical or []), list(continuous or [])
        categories = dict(categories or {})
        for col in [*categorical, *continuous, *categories]:
            if col not in df.columns:
                raise ValueError(f"column {col!r} given as categorical/continuous is not in the table")
        both = set(categorical) & set(continuous)
        if both:
            raise ValueError(f"columns {sorted(both)} are marked both categorical and continuous")
        feats, dropped = [], []
        for col in df.columns:
            if col == label:
                continue
            s = df[col]
            if s.dropna().nunique() <= 1 and col not in categories:
                dropped.append(str(col))
                continue
            is_cat = col in categorical or col in categories or (
                col not in continuous and not pd.api.types.is_numeric_dtype(s))
            if is_cat:
                present = set(s.dropna().astype(str).str.strip())
                cats = tuple(categories[col]) if col in categories else tuple(sorted(present))
                missing = present - set(cats)
                if missing:
                    raise ValueError(f"column {col!r} has values {sorted(missing)[:5]} outside its category list")
                if len(cats) > max_categories:
                    raise ValueError(f"column {col!r} has {len(cats)} categories (> {max_categories}); "
                                     f"mark it continuous or drop it")
                feats.append(Feature(str(col), "categorical", cats))
            else:
                v = pd.to_numeric(s, errors="coerce").astype(float)
                if v.notna().sum() < s.notna().sum():
                    raise ValueError(f"column {col!r} is marked continuous but has non-numeric values; "
                                     f"mark it categorical")
                v = v.dropna()
                is_int = bool(np.all(np.isclose(v, np.round(v)))) if integer is None or col not in integer else integer[col]
                feats.append(Feature(str(col), "continuous", (), float(v.min()), float(v.max()),
                                     float(v.std(ddof=0)) or 1.0, is_int))
        if not feats:
            raise ValueError("the table has no usable feature columns besides the label")
        proto = cls(tuple(feats), label, classes, np.zeros(0), np.ones(0))
        raw = proto._onehot(df.dropna(subset=[f.name for f in feats]))
        mean, scale = raw.mean(0), raw.std(0)
        scale[scale == 0] = 1.0
        return cls(tuple(feats), label, classes, mean, scale, tuple(dropped))

    # -- encode / decode -------------------------------------------------------------------
    def _onehot(self, df: pd.DataFrame) -> np.ndarray:
        cols = []
        for f in self.features:
            if f.name not in df.columns:
                raise ValueError(f"column {f.name!r} of the schema is missing from the table")
            if f.kind == "categorical":
                vals = df[f.name].astype(str).str.strip().to_numpy()
                idx = {c: i for i, c in enumerate(f.categories)}
                codes = np.array([idx.get(v, -1) for v in vals], dtype=int)
                if (codes < 0).any():
                    bad = vals[codes < 0][0]
                    raise ValueError(f"value {bad!r} of column {f.name!r} is not a known category")
                block = np.zeros((len(df), f.width))
                block[np.arange(len(df)), codes] = 1.0
                cols.append(block)
            else:
                cols.append(pd.to_numeric(df[f.name], errors="coerce").to_numpy(float)[:, None])
        return np.concatenate(cols, axis=1) if cols else np.zeros((len(df), 0))

    def encode(self, df: pd.DataFrame) -> torch.Tensor:
        return torch.tensor((self._onehot(df) - self.mean) / self.scale, dtype=torch.float32)

    def encode_labels(self, df: pd.DataFrame) -> torch.Tensor:
        y = _clean_label(df[self.label])
        return torch.tensor([self.classes.index(v) for v in y], dtype=torch.long)

    def destandardize(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().double().numpy()
        return x * self.scale + self.mean

    def decode_arrays(self, x: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Standardised rows [..., d] -> (category index [..., n_cat], raw continuous [..., n_cont])
        after argmax, clamping to bounds and rounding.

        A non-finite input never decodes to a value: a categorical block holding NaN/Inf gives
        index -1 (no category) and a NaN/Inf continuous cell stays NaN (no clamping of Inf to a
        bound), so scoring counts such cells as wrong."""
        raw = self.destandardize(x)
        cats = []
        for _, sl in self.categorical:
            block = raw[..., sl]
            ok = np.isfinite(block).all(-1)
            cats.append(np.where(ok, np.where(np.isfinite(block), block, 0.0).argmax(-1), -1))
        conts = []
        for f, sl in self.continuous:
            v = raw[..., sl.start]
            v = np.where(np.isfinite(v), np.clip(v, f.lower, f.upper), np.nan)
            conts.append(np.floor(v + 0.5) if f.integer else v)
        lead = raw.shape[:-1]
        c = np.stack(cats, -1) if cats else np.zeros((*lead, 0), dtype=int)
        n = np.stack(conts, -1) if conts else np.zeros((*lead, 0))
        return c, n

    def encode_arrays(self, cat: np.ndarray, cont: np.ndarray) -> np.ndarray:
        """Inverse of ``decode_arrays``: hard one-hot + raw continuous, standardised
        (category index -1, i.e. none, encodes as a NaN block)."""
        lead = cat.shape[:-1]
        raw = np.zeros((*lead, self.dim))
        ci = ni = 0
        for f, sl in self.blocks():
            if f.kind == "categorical":
                code = cat[..., ci:ci + 1]
                block = raw[..., sl]
                np.put_along_axis(block, np.maximum(code, 0), 1.0, axis=-1)
                block[code[..., 0] < 0] = np.nan
                raw[..., sl] = block
                ci += 1
            else:
                raw[..., sl.start] = cont[..., ni]
                ni += 1
        return (raw - self.mean) / self.scale

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Decode then re-encode (hard argmax, clamping, rounding): TabLeak's projection."""
        c, n = self.decode_arrays(x)
        return torch.tensor(self.encode_arrays(c, n), dtype=x.dtype, device=x.device)

    def arrays_to_frame(self, cat: np.ndarray, cont: np.ndarray) -> pd.DataFrame:
        data, ci, ni = {}, 0, 0
        for f in self.features:
            if f.kind == "categorical":
                data[f.name] = [f.categories[i] if i >= 0 else None for i in cat[:, ci]]
                ci += 1
            else:
                data[f.name] = cont[:, ni]
                ni += 1
        return pd.DataFrame(data)

    def frame_to_arrays(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        cats = []
        for f, _ in self.categorical:
            idx = {c: i for i, c in enumerate(f.categories)}
            cats.append([-1 if _missing(v) else idx.get(str(v).strip(), -1) for v in df[f.name]])
        conts = [pd.to_numeric(df[f.name], errors="coerce").to_numpy(float) for f, _ in self.continuous]
        c = np.array(cats, dtype=int).T if cats else np.zeros((len(df), 0), dtype=int)
        n = np.array(conts, dtype=float).T if conts else np.zeros((len(df), 0))
        return c, n

    def decode(self, x: torch.Tensor) -> pd.DataFrame:
        c, n = self.decode_arrays(x)
        return self.arrays_to_frame(c, n)

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-column bounds in standardised space (one-hot columns: [0, 1])."""
        lo, hi = np.zeros(self.dim), np.ones(self.dim)
        for f, sl in self.blocks():
            if f.kind == "continuous":
                lo[sl], hi[sl] = f.lower, f.upper
        return (torch.tensor((lo - self.mean) / self.scale, dtype=torch.float32),
                torch.tensor((hi - self.mean) / self.scale, dtype=torch.float32))

    @property
    def cont_std(self) -> np.ndarray:
        return np.array([f.std for f, _ in self.continuous], dtype=float)

    def feature_errors(self, cat_a: np.ndarray, cont_a: np.ndarray, cat_b: np.ndarray, cont_b: np.ndarray,
                       tol: float = CONT_TOL) -> np.ndarray:
        """Pairwise 0/1 feature errors [..., n_a, n_b, n_features] (categorical block first,
        then continuous): exact category match, continuous within ``tol`` σ. A NaN/Inf value or
        a category index outside the feature's list (e.g. -1) is always an error."""
        n_cats = np.array([len(f.categories) for f, _ in self.categorical], dtype=int)
        va = (cat_a >= 0) & (cat_a < n_cats)
        ce = (cat_a[..., :, None, :] != cat_b[..., None, :, :]) | ~va[..., :, None, :]
        # written as "not within tol" so that NaN (any comparison False) counts as wrong
        ne = ~(np.abs(cont_a[..., :, None, :] - cont_b[..., None, :, :]) <= tol * self.cont_std)
        return np.concatenate([ce, ne], axis=-1).astype(float)


# -- export / import (``python -m eval schema export CASE``, ``--schema FILE``) ------------------
SCHEMA_FORMAT = "gradleak-tabular-schema/1"


def schema_to_dict(schema: TabularSchema) -> dict:
    """The whole encoding as plain JSON: feature order, kinds, category order, bounds, and the
    per-encoded-column standardisation (``mean``/``scale``). A federation that encodes its rows
    with ``encode_frame`` produces exactly the inputs the case's model expects."""
    return {
        "format": SCHEMA_FORMAT,
        "label": schema.label,
        "classes": list(schema.classes),
        "dim": schema.dim,
        "features": [{"name": f.name, "kind": f.kind, "categories": list(f.categories), "lower": f.lower,
                      "upper": f.upper, "std": f.std, "integer": f.integer} for f in schema.features],
        "mean": [float(v) for v in schema.mean],
        "scale": [float(v) for v in schema.scale],
        "dropped": list(schema.dropped),
    }


def schema_from_dict(d: Mapping) -> TabularSchema:
    """Inverse of ``schema_to_dict``; ValueError naming the field when the file is not a schema."""
    if not isinstance(d, Mapping) or d.get("format") != SCHEMA_FORMAT:
        raise ValueError(f"not a tabular schema (format must be {SCHEMA_FORMAT!r}); "
                         f"write one with `python -m eval schema export CASE > schema.json`")
    try:
        feats = tuple(Feature(str(f["name"]), str(f["kind"]), tuple(str(c) for c in f.get("categories", ())),
                              float(f.get("lower", 0.0)), float(f.get("upper", 0.0)), float(f.get("std", 1.0)),
                              bool(f.get("integer", True))) for f in d["features"])
        s = TabularSchema(feats, str(d["label"]), tuple(str(c) for c in d["classes"]),
                          np.asarray(d["mean"], dtype=float), np.asarray(d["scale"], dtype=float),
                          tuple(d.get("dropped", ())))
    except (KeyError, TypeError) as e:
        raise ValueError(f"tabular schema: missing or malformed field {e}") from None
    for f in feats:
        if f.kind not in ("categorical", "continuous") or (f.kind == "categorical" and not f.categories):
            raise ValueError(f"tabular schema: feature {f.name!r} must be continuous or categorical with categories")
    if len(s.mean) != s.dim or len(s.scale) != s.dim or not np.all(np.isfinite(s.scale)) or np.any(s.scale == 0):
        raise ValueError(f"tabular schema: mean/scale must hold {s.dim} finite numbers (scale != 0)")
    if "dim" in d and int(d["dim"]) != s.dim:
        raise ValueError(f"tabular schema: dim {d['dim']} does not match its features (width {s.dim})")
    return s


def load_schema(path) -> TabularSchema:
    """Read a schema JSON written by ``python -m eval schema export``."""
    import json
    from pathlib import Path

    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"schema file {str(path)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"schema file {str(path)!r} is not JSON ({e})") from None
    return schema_from_dict(d)


def schema_fingerprint(schema: TabularSchema) -> str:
    """A short hash of the encoding (rounded statistics): equal for the same encoding."""
    import hashlib
    import json

    d = schema_to_dict(schema)
    d["mean"] = [round(v, 6) for v in d["mean"]]
    d["scale"] = [round(v, 6) for v in d["scale"]]
    d["features"] = [{**f, "lower": round(f["lower"], 6), "upper": round(f["upper"], 6), "std": round(f["std"], 6)}
                     for f in d["features"]]
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def encode_frame(df: pd.DataFrame, schema: TabularSchema) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A federation's rows -> (model inputs [n, dim], class ids [n] or None when the label column
    is absent), encoded exactly as the schema's case encodes them (``TabularSchema.encode``)."""
    x = schema.encode(df)
    y = schema.encode_labels(df) if schema.label in df.columns else None
    return x, y


def frame_for_schema(df: pd.DataFrame, schema: TabularSchema, *, source: str = "the table") -> pd.DataFrame:
    """The rows of ``df`` restricted to the schema's columns (+ its label), rows with an empty
    cell dropped, categories stripped; ValueError naming a missing column or an unknown
    category. The schema, not the table, fixes the encoding: a category absent from the table
    keeps its column, so the model width never depends on the data given."""
    need = [f.name for f in schema.features] + [schema.label]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"{source} lacks the schema's column{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(map(repr, missing))} (the label column is {schema.label!r})")
    out = df[need].dropna().reset_index(drop=True)
    for f in schema.features:
        if f.kind == "categorical":
            out[f.name] = out[f.name].astype(str).str.strip()
    out[schema.label] = _clean_label(out[schema.label])
    ids = [str(i) for i in range(len(schema.classes))]
    if not set(out[schema.label]) & set(schema.classes) and set(out[schema.label]) <= set(ids):
        out[schema.label] = [schema.classes[int(v)] for v in out[schema.label]]  # class ids -> class names
    bad = sorted(set(out[schema.label]) - set(schema.classes))
    if bad:
        raise ValueError(f"{source}: label values {bad[:3]} are not the schema's classes {list(schema.classes)}")
    schema._onehot(out)  # raises on a category outside the schema's list
    return out
