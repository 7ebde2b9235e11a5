"""Continuous values the first layer leaves open, solved on the second layer.

When rows share a whole categorical pattern their continuous differences lie in the first-layer
span, so every candidate row is only known up to ``y0 + U w`` (``U``: the free continuous
directions, ``w`` in R^f, f <= number of continuous features). The second-layer input of a true
row, ``ReLU(W1 y + b1)``, lies in the row space of the second weight gradient (rank <= B < width);
for a fixed ReLU on/off pattern that is a linear least-squares problem in ``w``. We iterate
(Gauss-Newton on the piecewise-linear residual: fix the pattern, solve, recompute the pattern) for
all candidates at once, from a few deterministic starts (the least-squares point and points spread
over the continuous bounds), and keep every distinct root with a near-zero residual. A pattern
shared by k rows has k roots; a start that misses one leaves that row to the fallback, and the
whole-gradient certificate then fails, so no missing root is ever certified by accident.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .budget import NEVER, Deadline


class ReluGaussNewton:
    """Gauss-Newton on the piecewise-linear residual ``comp ReLU(z0 + t a^T)`` over ``t`` [N, f] for many rows
    at once: with the ReLU pattern ``on`` fixed the residual ``comp diag(on) (z0 + a t)`` is linear in ``t``, so
    every step solves it exactly (least squares, ridge ``ridge``) and recomputes the pattern. The Jacobians
    ``comp diag(on_n) a`` of all rows are one GEMM ``on @ q``, ``q[h, (kc f)] = comp^T (x) a``. Shared by the
    pattern root search (``gauss_newton_roots``: no bounds, rows whose pattern stopped changing leave the loop)
    and the pursuit (``pursuit.pursue``: clipped to the continuous box, every row runs every step).

    a [h, f], comp [kc, h] orthonormal rows of the complement of the second weight gradient's row space;
    ``dtype`` of the Jacobian products and solves (the pattern and the residual stay in float64)."""

    def __init__(self, a: np.ndarray, comp: np.ndarray, *, dtype: type = np.float64):
        h, f = a.shape
        self.a, self.comp, self.f, self.kc, self.dtype = a, comp, f, comp.shape[0], dtype
        self.q = (comp.T[:, :, None] * a[:, None, :]).reshape(h, self.kc * f).astype(dtype)
        self.comp_d = comp.T.astype(dtype)

    def solve(self, z0: np.ndarray, t: np.ndarray, iterations: int, *, ridge: float, lo: np.ndarray | None = None,
              hi: np.ndarray | None = None, early_stop: bool = False, deadline: Deadline = NEVER) -> np.ndarray:
        """``t`` [N, f] after at most ``iterations`` steps from ``t`` (float64 copy); ``lo, hi``: clip every step
        to this box; ``early_stop``: a row whose pattern did not change leaves the loop (its step would repeat)."""
        dtype, f, kc = self.dtype, self.f, self.kc
        z0d = z0.astype(dtype)
        w = np.array(t, copy=True)
        live = np.arange(len(z0))
        prev = None
        eye = ridge * np.eye(f, dtype=dtype)
        for _ in range(iterations):
            deadline.check()
            on = (z0[live] + w[live] @ self.a.T) > 0
            if early_stop and prev is not None:
                moving = (on != prev).any(1)
                live, on = live[moving], on[moving]
            if len(live) == 0:
                break
            n = len(live)
            onf = on.astype(dtype)
            pm = (onf @ self.q).reshape(n, kc, f)  # [n, kc, f]
            pt = pm.transpose(0, 2, 1)
            r0 = (onf * z0d[live]) @ self.comp_d  # [n, kc]
            step = -np.linalg.solve(np.matmul(pt, pm) + eye, np.matmul(pt, r0[..., None]))[..., 0]
            w[live] = step if lo is None else np.clip(step.astype(np.float64), lo, hi)
            prev = on
        return w

    def residual(self, z0: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(second-layer inputs ``ReLU(z0 + t a^T)`` [N, h], their relative distance to the row space [N]), float64."""
        act = np.maximum(z0 + t @ self.a.T, 0.0)
        return act, np.linalg.norm(act @ self.comp.T, axis=1) / np.maximum(np.linalg.norm(act, axis=1), 1e-12)


def gauss_newton_roots(y0: np.ndarray, u: np.ndarray, w1: np.ndarray, b1: np.ndarray, basis2: np.ndarray, *,
                       starts: np.ndarray, tol: float, iterations: int = 12,
                       dtype: type = np.float64, deadline: Deadline = NEVER,
                       noise: tuple[np.ndarray, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Roots ``y = y0[k] + u w`` of ``P2perp ReLU(W1 y + b1) = 0``.

    y0 [K, d] candidate rows, u [d, f] (zero outside the continuous columns), w1 [h, d], b1 [h],
    basis2 [r2, h] orthonormal rows of the second weight gradient's row space, starts [S, K, f]
    (``w_box_starts``). Returns (rows [n, d], candidate index [n]). ``dtype=np.float32`` runs the
    iterations in single precision (about twice as fast; the residual test stays in float64): for
    finding which candidates have a root, whose rows are then solved again in float64. ``noise``
    ``(inv, c)``: declared noise widens each root's tolerance by ``noise_slack`` (per candidate)."""
    h = w1.shape[0]
    proj = np.eye(h) - basis2.T @ basis2
    uq, sq, _ = np.linalg.svd(proj)
    comp = uq[:, sq > 0.5].T  # [h - r2, h] orthonormal basis of the complement
    z0 = y0 @ w1.T + b1  # [K, h]
    gn = ReluGaussNewton(w1 @ u, comp, dtype=dtype)
    out_rows, out_idx = [], []
    for w in starts:
        w = gn.solve(z0, w, iterations, ridge=1e-12, early_stop=True, deadline=deadline)
        act, res = gn.residual(z0, w)
        good = np.flatnonzero(res <= tol + noise_slack(act, noise))
        out_rows.append(y0[good] + w[good] @ u.T)
        out_idx.append(good)
    return np.concatenate(out_rows), np.concatenate(out_idx)


def noise_slack(a: np.ndarray, noise: tuple[np.ndarray, float] | None) -> np.ndarray | float:
    """Relative distance that declared Gaussian noise puts between rows ``a`` [n, m] of a true span and
    the observed span (first-order perturbation of the right singular vectors: ``V' = V + P_perp E^T U
    S^-1``, so a row ``a = V c`` is ``||P_perp E^T U S^-1 c|| ~ sigma sqrt(m - r) ||S^-1 V^T a||`` out of it):
    ``c * ||a inv^T|| / ||a||`` with ``inv = S^-1 V^T`` [r, m] and ``c = k sigma sqrt(m - r)``; 0 without noise."""
    if noise is None:
        return 0.0
    inv, c = noise
    return c * np.linalg.norm(a @ inv.T, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-12)


def two_pass_roots(chunks: Iterable[np.ndarray], u: np.ndarray, w1: np.ndarray, b1: np.ndarray,
                   basis2: np.ndarray, lo: np.ndarray, hi: np.ndarray, ci: np.ndarray, *, starts: int,
                   more_starts: int, tol: float, deadline: Deadline = NEVER, chunk: int = 4096,
                   noise: tuple[np.ndarray, float] | None = None) -> tuple[np.ndarray, int]:
    """The root search of the span stage and of the peeling stage: pass 1 runs ``starts`` starts
    (``w_box_starts``) on every candidate of every chunk of ``chunks`` (rows y0 [k, d]); pass 2 runs
    ``more_starts`` starts on the candidates pass 1 found a root for (a pattern shared by k rows has k
    roots). Pass 1 only finds which candidates have a root when pass 2 follows (its starts include
    pass 1's: the Halton sequence is deterministic), so it runs in float32 then (about twice as fast;
    the residual test stays in float64) and its rows are dropped; otherwise it runs in float64 and its
    rows are the result. Returns (rows [n, d], candidates with a root in pass 1)."""
    fast = np.float32 if more_starts > starts else np.float64
    out, hit = [], []
    for y0 in chunks:
        deadline.check()
        rows, k = gauss_newton_roots(y0, u, w1, b1, basis2, starts=w_box_starts(y0, u, lo, hi, ci, starts),
                                     tol=tol, dtype=fast, deadline=deadline, noise=noise)
        if fast is np.float64:
            out.append(rows)
        hit.append(y0[np.unique(k)])
    found = np.concatenate(hit) if hit else np.zeros((0, u.shape[0]))
    if fast is np.float32:
        for c0 in range(0, len(found), chunk):
            y0 = found[c0:c0 + chunk]
            out.append(gauss_newton_roots(y0, u, w1, b1, basis2, starts=w_box_starts(y0, u, lo, hi, ci, more_starts),
                                          tol=tol, deadline=deadline, noise=noise)[0])
    return (np.concatenate(out) if out else np.zeros((0, u.shape[0]))), len(found)


_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53)


def _halton(i: int, base: int) -> float:
    f, r = 1.0, 0.0
    while i > 0:
        f /= base
        r += f * (i % base)
        i //= base
    return r


def w_box_starts(y0: np.ndarray, u: np.ndarray, lo: np.ndarray, hi: np.ndarray, ci: np.ndarray,
                 count: int) -> np.ndarray:
    """Starts [count, K, f]: w = 0 (the least-squares point) and then a deterministic Halton
    sequence over the box of w values that the continuous bounds allow along ``u`` (per candidate:
    the range of u_j^T (t - y0) over t in [lo, hi]; the library draws from no RNG)."""
    uc = u[ci]  # [n_cont, f]
    a, b = (lo[None] - y0[:, ci])[..., None] * uc[None], (hi[None] - y0[:, ci])[..., None] * uc[None]
    wlo, whi = np.minimum(a, b).sum(1), np.maximum(a, b).sum(1)  # [K, f]
    f = u.shape[1]
    out = [np.zeros_like(wlo)]
    for i in range(1, count):
        q = np.array([_halton(i, _PRIMES[j % len(_PRIMES)]) for j in range(f)])
        out.append(wlo + q[None] * (whi - wlo))
    return np.stack(out)
