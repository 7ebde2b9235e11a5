"""Hungarian alignment of a reconstructed batch to the truth (reconstructions are order-free)."""
from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import numpy as np
from scipy.optimize import linear_sum_assignment

P = TypeVar("P")
R = TypeVar("R")


def assignment(cost: np.ndarray) -> np.ndarray:
    """For a cost matrix [n_pred, n_ref], return ``perm`` with ``perm[j]`` = the prediction
    assigned to reference j (minimum total cost). Requires n_pred >= n_ref.

    A non-finite cost (a broken, e.g. NaN, reconstruction) is worse than every finite one: such
    pairs are matched only where no all-finite assignment exists, and never crash the scorer."""
    cost = np.asarray(cost, dtype=float)
    if cost.ndim != 2:
        raise ValueError(f"cost must be a 2-D matrix, got shape {cost.shape}")
    if cost.shape[0] < cost.shape[1]:
        raise ValueError(f"need at least as many predictions ({cost.shape[0]}) as references ({cost.shape[1]})")
    bad = ~np.isfinite(cost)
    if bad.any():
        finite = cost[~bad]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        # larger than any total of finite costs: one non-finite pair outweighs every finite choice
        cost = np.where(bad, hi + (hi - lo + 1.0) * (min(cost.shape) + 1), cost)
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(cost.shape[1], dtype=int)
    perm[cols] = rows
    return perm


def align(predictions: Sequence[P], references: Sequence[R], cost: Callable[[P, R], float]) -> list[P]:
    """Reorder ``predictions`` so that ``out[j]`` is matched to ``references[j]``."""
    if len(references) == 0:
        return []
    c = np.array([[cost(p, r) for r in references] for p in predictions], dtype=float).reshape(len(predictions), len(references))
    perm = assignment(c)
    return [predictions[i] for i in perm]
