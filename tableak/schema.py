"""Tabular schema: feature types, one-hot encoding, standardisation, decoding.

Encoding follows TabLeak (eth-sri/tableak ``datasets/base_dataset.py``): every categorical
feature (binaries included) is one-hot, continuous features stay raw, then *all* columns
are standardised with the mean/std of the whole table (std 0 -> 1). Decoding undoes the
standardisation, takes the argmax per categorical block and rounds continuous values
(``floor(x + 0.5)``) unless the feature is marked non-integer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch


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


@dataclass(frozen=True)
class TabularSchema:
    features: tuple[Feature, ...]
    label: str
    classes: tuple[str, ...]
    mean: np.ndarray = field(repr=False)  # per encoded column
    scale: np.ndarray = field(repr=False)

    @property
    def dim(self) -> int:
        return sum(f.width for f in self.features)

    def blocks(self) -> list[tuple[Feature, slice]]:
        out, start = [], 0
        for f in self.features:
            out.append((f, slice(start, start + f.width)))
            start += f.width
        return out

    # -- build ---------------------------------------------------------------------------
    @classmethod
    def infer(cls, df: pd.DataFrame, *, label: str, categorical: list[str] | None = None,
              continuous: list[str] | None = None, max_categories: int = 64) -> "TabularSchema":
        if label not in df.columns:
            raise ValueError(f"label column {label!r} not in the table; columns: {', '.join(map(str, df.columns))}")
        labels = df[label].dropna().astype(str).str.strip().str.rstrip(".")
        classes = tuple(sorted(labels.unique()))
        if len(classes) != 2:
            raise ValueError(f"label column {label!r} must be binary, found {len(classes)} values: {list(classes)[:5]}")
        feats = []
        for col in df.columns:
            if col == label:
                continue
            s = df[col]
            is_cat = (col in (categorical or [])) or (
                col not in (continuous or []) and not pd.api.types.is_numeric_dtype(s))
            if is_cat:
                cats = tuple(sorted(s.dropna().astype(str).unique()))
                if len(cats) > max_categories:
                    raise ValueError(f"column {col!r} has {len(cats)} categories (> {max_categories}); "
                                     f"mark it continuous or drop it")
                feats.append(Feature(col, "categorical", cats))
            else:
                v = pd.to_numeric(s, errors="coerce").astype(float)
                integer = bool(np.all(np.isclose(v.dropna(), np.round(v.dropna()))))
                feats.append(Feature(col, "continuous", (), float(v.min()), float(v.max()),
                                     float(v.std(ddof=0)) or 1.0, integer))
        proto = cls(tuple(feats), label, classes, np.zeros(0), np.ones(0))
        raw = proto._onehot(df)
        mean, scale = raw.mean(0), raw.std(0)
        scale[scale == 0] = 1.0
        return cls(tuple(feats), label, classes, mean, scale)

    # -- encode / decode -------------------------------------------------------------------
    def _onehot(self, df: pd.DataFrame) -> np.ndarray:
        cols = []
        for f in self.features:
            if f.kind == "categorical":
                vals = df[f.name].astype(str).to_numpy()
                block = np.zeros((len(df), f.width))
                idx = {c: i for i, c in enumerate(f.categories)}
                for r, v in enumerate(vals):
                    if v not in idx:
                        raise ValueError(f"value {v!r} of column {f.name!r} is not a known category")
                    block[r, idx[v]] = 1.0
                cols.append(block)
            else:
                cols.append(pd.to_numeric(df[f.name], errors="coerce").to_numpy(float)[:, None])
        return np.concatenate(cols, axis=1) if cols else np.zeros((len(df), 0))

    def encode(self, df: pd.DataFrame) -> torch.Tensor:
        return torch.tensor((self._onehot(df) - self.mean) / self.scale, dtype=torch.float32)

    def encode_labels(self, df: pd.DataFrame) -> torch.Tensor:
        y = df[self.label].astype(str).str.strip().str.rstrip(".")
        return torch.tensor([self.classes.index(v) for v in y], dtype=torch.long)

    def destandardize(self, x: torch.Tensor) -> np.ndarray:
        return x.detach().cpu().double().numpy() * self.scale + self.mean

    def decode(self, x: torch.Tensor) -> pd.DataFrame:
        raw = self.destandardize(x)
        data = {}
        for f, sl in self.blocks():
            if f.kind == "categorical":
                data[f.name] = [f.categories[i] for i in raw[:, sl].argmax(1)]
            else:
                v = np.clip(raw[:, sl.start], f.lower, f.upper)
                data[f.name] = np.floor(v + 0.5) if f.integer else v
        return pd.DataFrame(data)

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-column bounds in standardised space (one-hot columns: [0, 1])."""
        lo, hi = np.zeros(self.dim), np.ones(self.dim)
        for f, sl in self.blocks():
            if f.kind == "continuous":
                lo[sl], hi[sl] = f.lower, f.upper
        return (torch.tensor((lo - self.mean) / self.scale, dtype=torch.float32),
                torch.tensor((hi - self.mean) / self.scale, dtype=torch.float32))
