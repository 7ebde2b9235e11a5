"""First-layer span: every valid encoded row inside the row space of the first weight gradient.

For a first layer ``z = W x + b`` the weight gradient is ``dW = sum_i g_i x_i^T``, so its row space
is (for rank B) the span of the batch's standardised rows. A valid row is one one-hot block per
categorical feature plus a continuous value per continuous feature. Writing the standardised row as
``y = a + c E + t F`` (offset ``a`` = -mean/scale on the one-hot columns, ``c`` the one-hot
indicators scaled by 1/scale, ``t`` the continuous values), the distance of ``y`` to the span after
the best ``t`` is ``||z0 + sum_blocks K[chosen category]||`` with ``K`` the one-hot columns of the
orthogonal projector onto the complement, with the continuous directions projected out too. Valid
rows are therefore the choices of one category per block whose rows of ``K`` sum to ``-z0``: a
multi-dimensional subset-sum that we solve exactly by meet in the middle (all combinations of the
*present* categories of one half of the blocks against the other half, near-zero matches found with
a k-d tree and checked in full). Categories absent from the batch have an all-zero column in ``dW``
and are excluded first; this replaces the probe's big-M integer program (issue 19).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.spatial import cKDTree

from ..schema import TabularSchema
from .budget import NEVER, Deadline

FREE_TOL = 1e-3  # singular value below which a continuous direction counts as inside the span


@dataclass
class Span:
    basis: np.ndarray  # [r, d] orthonormal rows spanning the observed row space
    singular: np.ndarray  # all singular values of dW
    rank: int
    cont_identified: bool  # every continuous direction is pinned down by the span
    cont_singular: np.ndarray | None = None


@dataclass
class Candidates:
    rows: np.ndarray  # [K, d] standardised, projected (one-hot, rounded continuous) rows
    raw_rows: np.ndarray  # [K, d] the same before projection (least-squares continuous values)
    residual: np.ndarray  # [K] distance of the unprojected least-squares row to the span
    combos: int  # categorical combinations examined
    truncated: bool  # the enumeration hit a cap: the candidate list may be incomplete


def row_span(dw: np.ndarray, *, max_rank: int, rel_tol: float, floor: float = 0.0) -> Span:
    """The row space of ``dw`` ([h, d]): singular directions above ``rel_tol * s_1`` and above the
    noise ``floor``, at most ``max_rank`` of them (the batch size)."""
    _, s, vt = np.linalg.svd(dw, full_matrices=False)
    if s.size == 0 or s[0] == 0:
        return Span(np.zeros((0, dw.shape[1])), s, 0, False)
    keep = (s > rel_tol * s[0]) & (s > floor)
    r = int(min(max_rank, keep.sum()))
    return Span(vt[:r], s, r, True)


def _balanced_halves(sizes: list[int]) -> tuple[list[int], list[int]]:
    """Split block indices into two groups of similar product size (greedy on log sizes)."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    a, b, la, lb = [], [], 0.0, 0.0
    for i in order:
        if la <= lb:
            a.append(i)
            la += np.log(max(sizes[i], 1))
        else:
            b.append(i)
            lb += np.log(max(sizes[i], 1))
    return a, b


def _combos(blocks: list[np.ndarray], vecs: list[np.ndarray], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """All choices of one entry per block: (index table [n, len(blocks)], summed vectors [n, dim])."""
    idx = np.zeros((1, 0), dtype=np.int64)
    tot = np.zeros((1, dim))
    for cols, v in zip(blocks, vecs):
        n = len(cols)
        idx = np.concatenate([np.repeat(idx, n, 0), np.tile(cols, len(idx))[:, None]], 1)
        tot = (tot[:, None, :] + v[None, :, :]).reshape(-1, dim)
    return idx, tot


def enumerate_rows(schema: TabularSchema, span: Span, present: np.ndarray, *, tol: float, free_tol: float = FREE_TOL,
                   max_half: int, max_candidates: int,
                   accept: Callable[[np.ndarray], np.ndarray] | None = None, deadline: Deadline = NEVER) -> Candidates:
    """Every valid row (categories restricted to ``present`` columns) within ``tol`` of the span;
    ``accept`` (least-squares rows [n, d] -> bool mask), when given, filters each chunk as it is found,
    so that ``max_candidates`` counts the accepted rows only."""
    d = schema.dim
    mean, scale = np.asarray(schema.mean, float), np.asarray(schema.scale, float)
    proj = np.eye(d) - span.basis.T @ span.basis  # onto the complement of the span
    ci = schema.continuous_index
    pt = proj[ci] if len(ci) else np.zeros((0, d))
    if len(ci):
        u, sv, vt = np.linalg.svd(pt, full_matrices=False)
        span.cont_identified = bool(sv.size == len(ci) and sv.min() > free_tol)
        span.cont_singular = sv
        rt = np.eye(d) - np.linalg.pinv(pt) @ pt
    else:
        rt = np.eye(d)
    pr = proj @ rt
    offset = np.zeros(d)
    cat_blocks = schema.categorical
    for _, sl in cat_blocks:
        offset[sl] = -mean[sl] / scale[sl]
    z0 = offset @ pr
    # orthonormal coordinates of the range of ``pr`` (the residual lives there)
    uu, ss, _ = np.linalg.svd(pr, full_matrices=False)
    basis = uu[:, ss > 1e-9]  # [d, m]
    m = basis.shape[1]
    blocks, vecs = [], []
    for bi, (_, sl) in enumerate(cat_blocks):
        cols = np.arange(sl.start, sl.stop)[present[sl.start:sl.stop]]
        if len(cols) == 0:
            return Candidates(np.zeros((0, d)), np.zeros((0, d)), np.zeros(0), 0, False)
        v = (pr[cols] / scale[cols, None]) @ basis
        if bi == 0:
            v = v + (z0 @ basis)[None]
        blocks.append(cols)
        vecs.append(v)
    sizes = [len(c) for c in blocks]
    ha, hb = _balanced_halves(sizes)
    na, nb = int(np.prod([sizes[i] for i in ha])), int(np.prod([sizes[i] for i in hb]))
    if max(na, nb) > max_half:
        return Candidates(np.zeros((0, d)), np.zeros((0, d)), np.zeros(0), na * nb, True)
    ia, sa = _combos([blocks[i] for i in ha], [vecs[i] for i in ha], m)
    ib, sb = _combos([blocks[i] for i in hb], [vecs[i] for i in hb], m)
    if m == 0:  # the span holds every valid row of the present categories: nothing to identify
        return Candidates(np.zeros((0, d)), np.zeros((0, d)), np.zeros(0), na * nb, True)
    k = min(m, 16)
    tree = cKDTree(sa[:, :k])
    # near-zero sums in the first k residual coordinates, checked in full chunk by chunk; a flood of
    # projected hits (the span holds almost every combination) is the rank limit
    pinv_t = np.linalg.pinv(pt) if len(ci) else None

    def build(pi: np.ndarray, pj: np.ndarray) -> np.ndarray:
        cols = np.concatenate([ia[pi], ib[pj]], 1)  # [n, n_blocks] chosen one-hot columns
        raw = np.zeros((len(pi), d))
        np.put_along_axis(raw, cols, 1.0, axis=1)
        y = (raw - mean) / scale
        if len(ci):
            y[:, ci] = 0.0
            y[:, ci] = -(y @ proj) @ pinv_t  # best continuous values (standardised)
        return y

    budget, found, kept = 50 * max_candidates, [], 0
    for s0 in range(0, len(sb), 4096):
        deadline.check()
        q = -sb[s0:s0 + 4096, :k]
        budget -= int(tree.query_ball_point(q, r=tol, return_length=True).sum())
        if budget < 0:
            return Candidates(np.zeros((0, d)), np.zeros((0, d)), np.zeros(0), na * nb, True)
        hits = tree.query_ball_point(q, r=tol)
        pj = s0 + np.repeat(np.arange(len(q)), [len(x) for x in hits])
        pi = np.fromiter((i for lst in hits for i in lst), dtype=np.int64, count=len(pj))
        res = np.linalg.norm(sa[pi] + sb[pj], axis=1)
        keep = res <= tol
        if not keep.any():
            continue
        pi, pj, res = pi[keep], pj[keep], res[keep]
        for c0 in range(0, len(pi), 65536):  # bounded memory; projection only for accepted rows
            deadline.check()
            y = build(pi[c0:c0 + 65536], pj[c0:c0 + 65536])
            ok = accept(y) if accept is not None else np.ones(len(y), dtype=bool)
            found.append((project(schema, y[ok]), y[ok], res[c0:c0 + 65536][ok]))
            kept += int(ok.sum())
            if kept > max_candidates:
                return Candidates(np.zeros((0, d)), np.zeros((0, d)), np.zeros(0), na * nb, True)
    if not found:
        return Candidates(np.zeros((0, d)), np.zeros((0, d)), np.zeros(0), na * nb, False)
    return Candidates(*(np.concatenate(parts) for parts in zip(*found)), na * nb, False)

def project(schema: TabularSchema, rows: np.ndarray) -> np.ndarray:
    """TabLeak's projection (argmax, clamp, round) of standardised rows, in float64."""
    return schema.encode_arrays(*schema.decode_arrays(rows))


def free_continuous(schema: TabularSchema, span: Span, *, free_tol: float = FREE_TOL) -> np.ndarray:
    """Orthonormal basis [d, f] of the span's directions that touch only continuous columns (rows
    sharing a categorical pattern put their continuous differences there): along them the first
    layer cannot tell continuous values apart."""
    d = schema.dim
    ci = schema.continuous_index
    if span.rank == 0 or len(ci) == 0:
        return np.zeros((d, 0))
    cat = np.setdiff1d(np.arange(d), ci)
    _, s, vt = np.linalg.svd(span.basis[:, cat].T, full_matrices=True)  # null space of the categorical part
    s = np.concatenate([s, np.zeros(span.rank - len(s))]) if len(s) < span.rank else s
    a = vt[s[:span.rank] < free_tol] if len(s) else vt
    a = a[max(len(a) - len(ci), 0):]  # at most one per continuous column (noise can tilt more below free_tol)
    u = a @ span.basis  # [f, d]
    u[:, cat] = 0.0
    q, _ = np.linalg.qr(u.T) if len(u) else (np.zeros((d, 0)), None)
    return q


def unique_rows(schema: TabularSchema, rows: np.ndarray) -> np.ndarray:
    """The distinct rows after decoding (first occurrence of each kept, in order)."""
    if len(rows) == 0:
        return rows
    c, n = schema.decode_arrays(rows)
    _, idx = np.unique(np.concatenate([c, n], 1), axis=0, return_index=True)
    return rows[np.sort(idx)]


def merge_near(schema: TabularSchema, rows: np.ndarray, score: np.ndarray, *, keep: int, rel: float = 1e-3) -> np.ndarray:
    """Rows with the same categories and continuous values within ``rel`` standard deviations are one
    row found twice (rounding of a float root): the one with the lowest ``score`` stays (the first
    ``keep`` rows, the peeled ones, always stay)."""
    ci = schema.continuous_index
    cat = np.setdiff1d(np.arange(schema.dim), ci)
    order = list(range(keep)) + sorted(range(keep, len(rows)), key=lambda i: score[i])
    out: list[int] = []
    for i in order:
        if not any(np.array_equal(rows[i, cat], rows[j, cat]) and np.abs(rows[i, ci] - rows[j, ci]).max() <= rel
                   for j in out):
            out.append(i)
    return rows[sorted(out)]
