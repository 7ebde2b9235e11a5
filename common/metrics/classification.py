from __future__ import annotations

from statistics import fmean
from typing import Sequence


def accuracy(*, predictions: Sequence, references: Sequence) -> dict[str, float]:
    """Fraction of predictions equal to their reference."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if len(references) == 0:
        raise ValueError("no references to score")
    return {"accuracy": fmean(1.0 if p == r else 0.0 for p, r in zip(predictions, references))}
