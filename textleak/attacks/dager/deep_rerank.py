"""The token-set search's rerank test at a deeper block (session 14, issue 20), and the cut of a saturated span
that it shares with ``frontier.ffn_inputs``.

Past both layers' rank (GPT-2 configuration, B = 64) the token-set search (``frontier``) ranks every extension
of a path at the first block's feed-forward input and re-measures each path's shortlist through the model.
Deeper inputs mix more of the prefix into the new position, so the shortlist is re-measured at block
``FRONTIER_RERANK_TAP[0]``'s projection group ``FRONTIER_RERANK_TAP[1]`` (block 3's feed-forward input) with
its own ratio thresholds. Our addition (no paper does this); development measurements in docs/dager.md.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from common.types import Observation

from .config import FRONTIER_CUT, RANK_CUTOFF
from .span import DagerPreconditionError, LayerInputs, Span, find_tap, observed_matrix, span_of, transformer_blocks

FRONTIER_RERANK_TAP = (3, 2)  # token-set search: rerank the shortlist at this (block, projection group)'s input,
# block 3's feed-forward input (deep_inputs); (1, 0): layer 2, the rerank before session 14 (development batch, seed 0
# trial 0 of GPT-2 B=64: ROUGE-1 0.498 -> 0.532, exact sentences 9 -> 23, 153 -> 272 CPU s)
FRONTIER_DEEP_THRESHOLDS = (0.9, 0.45, 0.45)  # (continue, accept, trim) ratios with the deep rerank (with the
# layer-2 defaults 0.75 / 0.3 / 0.3 paths ended early there: ROUGE-1 0.389, 27 of 64 sentences found)


def saturated_span(mat: Tensor, *, noise_floor: float = 0.0, eps: float | None = None) -> Span:
    """The row space of ``mat``; when its rank saturates (within ``RANK_CUTOFF`` of full), the weakest
    ``max(2, FRONTIER_CUT[1] * max_rank)`` directions past that cutoff are dropped, as for layer 2."""
    sp = span_of(mat, noise_floor=noise_floor, eps=eps)
    cutoff = min(RANK_CUTOFF, max(1, sp.max_rank // 10))
    if sp.rank > sp.max_rank - cutoff:
        keep = max(1, min(sp.rank, sp.max_rank - cutoff) - max(2, round(FRONTIER_CUT[1] * sp.max_rank)))
        sp = span_of(mat, noise_floor=noise_floor, eps=eps, max_rank=keep)
    return sp


def deep_inputs(obs: Observation, model: nn.Module, probe: Tensor) -> tuple[LayerInputs, Span] | None:
    """The input of block ``FRONTIER_RERANK_TAP[0]``'s projection group ``FRONTIER_RERANK_TAP[1]`` (0: attention
    input, (1, 0) being DAGER's layer 2; 2: feed-forward input, GPT-2 ``h[k].mlp.c_fc``) as the token-set search's
    rerank test, its saturated span cut as layer 2's. Deeper taps mix more of the prefix into the new position:
    on the true prefixes of a GPT-2 B=64 development batch (seed 0, trial 0; the true token and 95 random batch
    tokens per step, ``bench/dager_frontier_layers.py``) the true extension ranked first at 84 % of steps at
    layer 2 (29 % at position 30) and at 94 % at block 3's feed-forward input (92 % at position 30). None when
    the observation lacks the projections (then layer 2 is used); a model with fewer blocks uses its last one."""
    k = min(FRONTIER_RERANK_TAP[0], len(transformer_blocks(model)) - 1)  # (the last block of a shallower model)
    try:
        tap = find_tap(model, k, probe, group=FRONTIER_RERANK_TAP[1])
        mat = observed_matrix(tap, obs.tensors)
    except DagerPreconditionError:
        return None
    src = next((obs.tensors[n] for n in tap.names if n in obs.tensors), None)
    eps = float(torch.finfo(src.dtype).eps) if src is not None and src.is_floating_point() else None
    return LayerInputs(model, tap), saturated_span(mat, eps=eps)


def token_set_rerank(obs: Observation, model: nn.Module, probe: Tensor, layer2: tuple[LayerInputs, Span]
                     ) -> tuple[tuple[LayerInputs, Span], tuple[float, float, float] | None]:
    """The token-set search's rerank test and its (continue, accept, trim) ratio thresholds: the deep tap
    (``deep_inputs``) with ``FRONTIER_DEEP_THRESHOLDS``, else ``layer2`` with the defaults (None)."""
    deep = deep_inputs(obs, model, probe) if FRONTIER_RERANK_TAP != (1, 0) else None
    return (deep, FRONTIER_DEEP_THRESHOLDS) if deep is not None else (layer2, None)
