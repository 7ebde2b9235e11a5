from __future__ import annotations

import math
from statistics import fmean
from typing import Sequence


def accuracy(*, predictions: Sequence, references: Sequence) -> dict[str, float]:
    """Fraction of predictions equal to their reference."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if len(references) == 0:
        raise ValueError("no references to score")
    return {"accuracy": fmean(1.0 if p == r else 0.0 for p, r in zip(predictions, references))}


def label_accuracy(*, predictions: Sequence, references: Sequence) -> dict[str, float]:
    """Recovered labels as a multiset (order-free): sort both, then the fraction of equal
    positions. A missing or non-finite predicted label (None, NaN) counts as wrong."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if len(references) == 0:
        raise ValueError("no references to score")
    p = sorted(as_label(x) for x in predictions)
    r = sorted(int(x) for x in references)
    return {"label_accuracy": fmean(1.0 if a == b else 0.0 for a, b in zip(p, r))}


def as_label(x) -> int | float:
    """An integer label, or +inf (sorts last, equals no label) for None / NaN / Inf / garbage."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("inf")
    return int(v) if math.isfinite(v) else float("inf")
