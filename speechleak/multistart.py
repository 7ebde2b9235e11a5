"""Combining several gradient-matching searches of one utterance (issue 21, our addition).

Searches from different attacker-TTS voices end at different near-solutions whose errors are partly
independent (docs/speechleak.md, "CTC recogniser"), so their mean is a better estimate than any one. Their
timings differ too, so a plain mean also blurs; :func:`dtw_average` aligns every result to a reference first
(dynamic time warping of feature frames, Sakoe & Chiba 1978, within a band) and averages on the reference's
time axis.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dtw_path", "dtw_average", "warp_to"]


def dtw_path(ref: Tensor, other: Tensor, *, band: int = 40) -> list[tuple[int, int]]:
    """The minimum-cost monotone alignment [(i, j), ...] of the frames of ref [F, T] and other [F, T'] (squared
    Euclidean frame distance; steps (1, 0), (0, 1), (1, 1); |i − j·T/T'| <= band)."""
    if ref.dim() != 2 or other.dim() != 2 or ref.shape[0] != other.shape[0]:
        raise ValueError(f"dtw_path needs two [F, T] maps with the same F, got {tuple(ref.shape)} and {tuple(other.shape)}")
    if band < 1:
        raise ValueError(f"band must be >= 1, got {band}")
    n, m = ref.shape[1], other.shape[1]
    cost = torch.cdist(ref.T.double(), other.T.double()).pow(2).tolist()
    inf = float("inf")
    acc = [[inf] * m for _ in range(n)]
    ratio = m / n
    for i in range(n):
        lo, hi = max(0, int(i * ratio) - band), min(m, int(i * ratio) + band + 1)
        row, prev, ci = acc[i], acc[i - 1] if i else None, cost[i]
        for j in range(lo, hi):
            if i == 0 and j == 0:
                best = 0.0
            else:
                best = inf
                if prev is not None:
                    best = prev[j]
                    if j and prev[j - 1] < best:
                        best = prev[j - 1]
                if j and row[j - 1] < best:
                    best = row[j - 1]
            row[j] = ci[j] + best
    if acc[n - 1][m - 1] == inf:
        raise ValueError(f"no alignment within band {band} for lengths {n} and {m}; widen the band")
    i, j, path = n - 1, m - 1, [(n - 1, m - 1)]
    while i or j:
        steps = []
        if i and j:
            steps.append((acc[i - 1][j - 1], i - 1, j - 1))
        if i:
            steps.append((acc[i - 1][j], i - 1, j))
        if j:
            steps.append((acc[i][j - 1], i, j - 1))
        _, i, j = min(steps)
        path.append((i, j))
    return path[::-1]


def warp_to(ref: Tensor, other: Tensor, *, band: int = 40) -> Tensor:
    """other [F, T'] on ref's time axis [F, T]: each ref frame gets the mean of the other's frames aligned to it."""
    path = dtw_path(ref, other, band=band)
    out = torch.zeros_like(ref)
    count = torch.zeros(ref.shape[1], dtype=ref.dtype, device=ref.device)
    ii = torch.tensor([p[0] for p in path], device=ref.device)
    jj = torch.tensor([p[1] for p in path], device=ref.device)
    out.index_add_(1, ii, other[:, jj].to(ref.dtype))
    count.index_add_(0, ii, torch.ones(len(path), dtype=ref.dtype, device=ref.device))
    return out / count


def dtw_average(results: list[Tensor], *, band: int = 40) -> Tensor:
    """The mean of results [F, T] (the first is the reference) after warping each other onto the reference's time
    axis (:func:`warp_to`)."""
    if not results:
        raise ValueError("dtw_average needs at least one result")
    ref = results[0]
    warped = [ref] + [warp_to(ref, r, band=band) for r in results[1:]]
    return torch.stack(warped).mean(0)
