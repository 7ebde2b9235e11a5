"""Past the exact regime on rotary decoders (SmolLM2, Llama layout; issue 20): the saturation that NumPy's rank
rule hides, and the ranked search's guard against one-token runs (an addition, our own code).

**Saturation without a spectral gap.** DAGER's saturation test compares the update's numerical rank with the
width. The rank follows NumPy's ``matrix_rank`` rule (``s_max * max(m, d) * eps``, about 1e-4 of ``s_max`` for a
960 x 576 float32 update) unless the spectrum has a clear gap (``span.span_of``). In the exact regime it has one:
the true directions end in a drop to float32 round-off (SmolLM2 B=16, layer 2: ``s_400 / s_0`` = 3.8e-7, then
1e-9). The inputs of a pretrained model's second block decay smoothly, though, and when they are more than the
width the spectrum runs on without a gap: on a SmolLM2-135M B=32 batch (820 predicting tokens, width 576;
development measurement, seed 0 trial 0) layer 2's singular values fall smoothly to 7e-6 of ``s_0`` at index 560,
NumPy's rule cut at rank 416, and the reference's test (rank > 556) called it unsaturated. The exact search then
ran with a span that holds no true input (until its budget: ROUGE-1 0.04 in the published run).
``gapless_saturated`` calls a noise-free gradient's span saturated when more than ``max_rank - cutoff`` singular
values stand above ``ROUNDOFF_FLOOR`` of the largest, which no exact-regime span does (their weak directions are
round-off, under 1e-9 of ``s_0`` on the SmolLM2 and GPT-2 batches measured).

**One-token runs.** With rotary positions (no BOS token) a prefix made of one repeated token has the same
first-block output at every position (attention averages identical values), so ``t t t ...`` extends ``t``
perfectly at every span. The exact search caps such runs at ``MAX_RUN`` (``decoder.search``); ``RunGuard`` does the
same for the ranked search by wrapping the incremental block (such extensions get distance inf).
"""
from __future__ import annotations

import math
from typing import Callable

from torch import Tensor

from .config import MAX_RUN
from .span import Span

ROUNDOFF_FLOOR = 1e-6  # a singular value above this x s_max is signal, not float32 round-off (noise-free gradients)
NO_REPEAT = True  # ranked rotary search: an extension may not repeat the path's last token
DEEP_RERANK = False  # ranked rotary search: each path's shortlist re-measured at deep_rerank's tap


def gapless_saturated(sp: Span, cutoff: int) -> bool:
    """True when more than ``max_rank - cutoff`` singular values of ``sp`` exceed ``ROUNDOFF_FLOOR * s_max``
    (the spectrum reaches the width without a drop to round-off: saturated, whatever the numerical rank says).
    Only meaningful for a noise-free gradient (the caller's check)."""
    s = sp.singular_values.double()
    if not s.numel() or float(s[0]) <= 0.0:
        return False
    return int((s > ROUNDOFF_FLOOR * float(s[0])).sum()) > sp.max_rank - cutoff


class RunGuard:
    """The incremental first block (``RopeDecoderBlock``) with one-token runs capped: an extension ``t`` of a
    prefix of at least ``MAX_RUN`` tokens that are all ``t`` gets distance inf (``extend`` with ``reduce``)."""

    def __init__(self, block) -> None:
        self.block = block
        self.tables = block.tables

    def table(self, pos: int, ids: list[int]):
        return self.block.table(pos, ids)

    def extend(self, prefixes: list[list[int]], pos: int, cands: list[int], *,
               reduce: Callable[[Tensor], Tensor] | None = None, finish=None) -> Tensor:
        out = self.block.extend(prefixes, pos, cands, reduce=reduce, finish=finish)
        if reduce is None or pos < (1 if NO_REPEAT else MAX_RUN):
            return out
        col = {c: j for j, c in enumerate(cands)}
        if NO_REPEAT:
            hits = [(i, col[p[-1]]) for i, p in enumerate(prefixes) if p and p[-1] in col]
        else:
            hits = [(i, col[p[0]]) for i, p in enumerate(prefixes) if len(set(p)) == 1 and p[0] in col]
        if hits:
            out = out.clone()
            for i, j in hits:
                out[i, j] = math.inf
        return out

    def __getattr__(self, name: str):
        return getattr(self.block, name)

