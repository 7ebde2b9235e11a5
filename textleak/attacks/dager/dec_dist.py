"""Span distances of the exact decoder search's extensions, measured in float64 only where they can matter
(an addition for speed, issue 18).

Each step of the exact decoder search (``decoder._step``) measures the layer-2 span distance of every
(path, candidate) extension in float64 (``span.span_distance`` on float64 rows: ``[N, d] x [d, r]`` float64
multiply-adds; on SmolLM2 at B=16, 110k rows in width 576 against rank 388). Only distances under tau_2 take
part in a decision: the step's gap cut looks at the distances under tau_2 alone, an extension passes only under
the cut (at most tau_2), and a path's score is the largest distance it passed. So ``Screen.distances`` first
takes the float32 distance to the span's orthogonal complement ``C`` [d, m], ``|C^T x| / |x|`` (``m = d - r``
columns, no cancellation), whose error is at most ``sqrt(m) (d + 2) u / (1 - d u)`` (``u`` the float32 unit
round-off; each component's error is at most ``gamma_d |x|`` because ``C``'s columns are unit vectors), and
recomputes in float64, exactly as ``span_distance`` does, every row whose screened distance is under
``below`` plus that bound. Every other row is farther than ``below`` and keeps its screened value (also at
least ``below``). On SmolLM2 B=16 about 1 % of the rows are recomputed.

The recomputed rows are the same bits as ``span_distance``'s: its float64 product runs over chunks of
``CHUNK`` rows, and a row's result depends on whether it falls in the last ``n mod 4`` rows of its chunk (the
matrix kernel's remainder) and, for very short chunks, on the chunk's length. ``exact_rows`` therefore stacks
the selected rows of a chunk's main part (padded with zero rows to a multiple of 4) above that chunk's
remainder rows, and computes chunks under ``SHORT`` rows whole (tested against ``span_distance`` on random
shapes).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .dec_block import ComplementDistance
from .span import _exact

CHUNK = 8192  # span.span_distance's chunk
SHORT = 16  # chunks shorter than this are recomputed whole
_U32 = 2.0 ** -24


class Screen:
    """``span_distance(basis, x)`` for the rows under a bound, float32 elsewhere (module docstring)."""

    def __init__(self, basis: Tensor) -> None:
        self.b64 = basis.to(torch.float64).cpu()
        d, r = self.b64.shape
        self.comp32 = ComplementDistance(self.b64).comp32 if r < d else None
        m = d - r
        self.err = 1.5 * math.sqrt(max(m, 1)) * (d + 2) * _U32 / (1.0 - d * _U32) + 1e-6

    def distances(self, x: Tensor, below: float) -> Tensor:
        """Distances [N] (float64) of the rows of ``x`` [N, d] (any float dtype): bit-equal to
        ``span_distance(basis, x.double())`` wherever that is under ``below``, at least ``below`` elsewhere."""
        n = x.shape[0]
        if self.comp32 is None or n == 0:  # a full-rank span: every distance is (about) zero
            return _span_distance64(self.b64, x)
        xf = x.float()
        num = (xf @ self.comp32.to(xf.device)).double().norm(dim=1)
        pre = (num / xf.double().norm(dim=1).clamp_min(1e-300)).cpu()
        out = pre.clone()
        for s in range(0, n, CHUNK):
            redo = torch.nonzero(pre[s:s + CHUNK] < below + self.err).flatten()
            if redo.numel():
                out[s + redo] = exact_rows(self.b64, x[s:s + CHUNK], redo)
        return out


def exact_rows(b64: Tensor, chunk: Tensor, idx: Tensor) -> Tensor:
    """``span._exact(b64, chunk)[idx]`` to the bit, computing only about ``len(idx)`` rows (module docstring)."""
    n = chunk.shape[0]
    if n < SHORT:
        return _exact(b64, chunk)[idx.cpu()]  # _exact computes on the CPU
    main = n - n % 4
    in_main = idx < main
    im = idx[in_main]
    pad = (-im.numel()) % 4
    rows = torch.cat([chunk[im.to(chunk.device)], chunk.new_zeros(pad, chunk.shape[1]), chunk[main:]])
    got = _exact(b64, rows)
    out = torch.empty(idx.numel(), dtype=torch.float64)
    out[in_main] = got[:im.numel()]
    out[~in_main] = got[im.numel() + pad + (idx[~in_main] - main)]
    return out


def _span_distance64(b64: Tensor, x: Tensor) -> Tensor:
    from .span import span_distance

    return span_distance(b64, x.to(torch.float64).cpu())
