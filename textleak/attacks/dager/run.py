"""The state of one DAGER reconstruction: thresholds, statistics, the deadline and the layer-1 tools.

:class:`Run` is created by ``DAGER.reconstruct`` and passed explicitly to every search step, so a
``DAGER`` instance holds only its configuration and can run several reconstructions."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from common.types import Observation

from .block import PostLNBlock
from .config import GAP_RATIO, DagerConfig
from .span import LayerInputs


@dataclass
class Run:
    config: DagerConfig
    tau: tuple[float, float]  # (tau_1, tau_2) after the spectrum-adaptive widening
    t0: float = field(default_factory=time.perf_counter)
    c0: float = field(default_factory=time.process_time)  # for budget_clock = "cpu"
    stats: dict[str, float] = field(default_factory=dict)
    timed_out: bool = False
    li1: LayerInputs | None = None  # layer-1 inputs (encoders: the beam's and the repair's token vectors)
    block: PostLNBlock | None = None  # the incremental first block (post-LN encoders with fast_block)
    fast: bool = True  # the exact speed-ups (False: the original code paths, for benchmarks and tests)
    ranked: bool = False  # the ranked search past the exact regime (frontier.py): encoders drop near-duplicates
    prior_penalty: float | None = None  # the encoder beam's prior weight (None: config.PRIOR_PENALTY)
    ffn_prefilter: Any = None  # exact decoder search: (PreLNDecoderBlock, ComplementDistance) of the feed-forward input
    l2_block: Any = None  # exact decoder search: l2_block.Layer2Stage (the second block's input, incrementally)
    l1_tokens: list[int] | None = None  # ranked rotary search: layer 1's exact candidates (certify_dec.py)

    def over_budget(self) -> bool:
        """True (and ``timed_out`` set) once ``time_budget_s`` > 0 has passed since ``t0`` (wall clock)
        or, with ``budget_clock = "cpu"``, once this process has used that many CPU seconds since ``c0``."""
        budget = self.config.time_budget_s
        used = time.process_time() - self.c0 if self.config.budget_clock == "cpu" else time.perf_counter() - self.t0
        if budget > 0 and used > budget:
            self.timed_out = True
            return True
        return False

    def tail_limit(self, score: float) -> float:
        """Largest layer-2 distance an extension of a path with max distance ``score`` may have
        (``trim_tails``): a run-on tail is above the reference tau_2 and ``GAP_RATIO`` times above
        the path so far. Unlimited unless tau_2 was widened."""
        cfg = self.config
        if not cfg.trim_tails or self.tau[1] <= cfg.l2_span_thresh:
            return math.inf
        return max(cfg.l2_span_thresh, GAP_RATIO * score)

    def gap_threshold(self, d: Tensor, layer: int = 1) -> float:
        """The threshold of one layer-1 position scan (``layer`` 0) or decoder step (``layer`` 1):
        the widened tau, lowered to a clear gap in the step's sorted distances.

        The spectrum-adaptive tau_2 is a worst case (a token whose input lies along the weakest
        kept direction); true inputs usually sit orders of magnitude lower. Between the
        reference tau (``l1_span_thresh`` / ``l2_span_thresh``) and the widened one, we cut at the
        highest ratio gap of at least ``GAP_RATIO`` between consecutive sorted distances.
        Distances under the reference tau are always accepted.
        """
        cfg = self.config
        return gap_cut(d, self.tau[layer], (cfg.l1_span_thresh, cfg.l2_span_thresh)[layer])


def gap_cut(d: Tensor, tau: float, base: float, *, upcast: bool = False) -> float:
    """``tau`` lowered to the highest ratio gap of at least ``GAP_RATIO`` between consecutive sorted distances of
    ``d`` under ``tau`` whose upper side is above ``base`` (never under ``base``); ``tau`` when there is none.
    ``upcast``: the ratios of the distances under ``tau`` in float64."""
    if tau <= base:
        return tau
    v = d[d < tau]
    v = torch.sort(v.double() if upcast else v).values
    if v.numel() < 2:
        return tau
    lo, hi = v[:-1].clamp_min(1e-12), v[1:]
    ratio = torch.where(hi > base, hi / lo, torch.zeros_like(hi))
    big = torch.nonzero(ratio >= GAP_RATIO).flatten()
    if big.numel():  # the highest clear gap (keeps every lower cluster)
        k = int(big[-1])
        return max(base, math.sqrt(float(lo[k]) * float(hi[k])))
    return tau


def declared_sigma(obs: Observation) -> float:
    """The largest Gaussian-noise sigma among the observation's declared defenses (0 if none)."""
    return max((float(d.get("sigma", 0.0)) for d in obs.defenses or () if d.get("name") == "gaussian"),
               default=0.0)
