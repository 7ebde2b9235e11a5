"""The first block's feed-forward activations as a span test past DAGER's rank limit (an addition).

GPT-2's feed-forward down-projection ``mlp.c_proj`` (Conv1D ``4d -> d``) has the weight update
``G = sum_t a_t delta_t^T`` [4d, d], with ``a_t = GELU(c_fc(LN_2(h_t)))`` the 4d-wide activation of
token ``t`` (the sum over every non-final token of the batch) and ``delta_t`` its d-wide output
gradient. Its column space lies in ``span{a_t}``, but ``G`` has only ``d`` columns: its rank
saturates at ``d`` tokens like layer 1's (measured on a GPT-2 B=64 development batch, 1576 non-final
tokens: rank 767 of 768), so on its own it is *not* an exact test past ``d`` (the true activation's
relative distance to ``col(G)`` was 0.24 in median against 0.38 for wrong ones, with overlap).

What the 4d width buys is *peeling*. If the activations ``K`` of some true tokens are known (the
prefixes the search has already accepted), ``R = (I - P_K) G = (I - P_K) sum_{t missing} a_t
delta_t^T`` has rank ``min(#missing, d)``: once fewer than ``d`` tokens are missing (and the batch has
fewer than ``4d`` tokens), ``S = span(K) + col(R)`` is exactly the span of every true activation and
the test "``a`` in ``S``" is exact again (true extensions at float32 round-off, wrong ones far), as
DAGER's test is below its limit. Wrong tokens in ``K`` only add directions to ``S`` (it stays exact
for the true ones while ``dim S`` stays under ``4d``). Development measurement (GPT-2 B=64, seed 0,
trial 0, the true tokens of positions ``< P`` as ``K``): P=15 (874 known, 702 missing) put every true
extension at ``<= 1e-5`` and every sampled wrong one at ``>= 0.12``; P=10 (963 missing) already
ranked the true one below all but 0.4 % of the wrong ones (soft, saturated ``R``).

This follows SOMP's point (Li & Li, arXiv 2603.16761: use more of the update than the first layer,
subtract what is explained) on a part of the update neither DAGER nor SOMP reads; our own code.
``ActivationSpan`` keeps ``K`` (deduplicated by prefix, orthonormalised incrementally), refreshes
``R``'s basis when ``K`` has grown, and measures distances through a Gaussian sketch of the
complement of ``S`` (``SKETCH`` columns: the relative distance to about 10 %, enough to separate
round-off from 0.1; the cost per extension is ``d * 4d`` for ``c_fc`` plus ``4d * SKETCH``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from common.types import Observation

from .span import transformer_blocks

SKETCH = 192  # Gaussian sketch columns of the complement of S (relative error ~ sqrt(2 / SKETCH))
REFRESH = 48  # recompute R's basis once K has grown by this many prefixes (or 10 %)
RES_CUT = 0.03  # R saturated (rank d): drop its weakest this x d directions (as frontier.FRONTIER_CUT)
MIN_COMPLEMENT = 8  # the test needs at least this many directions outside S
EXACT_WIDTH = 1024  # activations at most this wide: the exact complement instead of the sketch
SAME = 1e-4
TAU = 1e-3  # exact stage: an extension is accepted below this relative distance (true ones: float32 round-off,
# <= 1e-5 measured on GPT-2 B=64 and the tiny GPT-2; wrong ones >= 0.02)  # a new known activation whose residual to K is under this x its norm adds no direction


def _gap_rank(sv: Tensor, m: int, d: int, gap_min: float = 100.0) -> int:
    """Numerical rank of singular values ``sv`` (descending) of an ``m x d`` float32-derived matrix: the
    largest gap (> ``gap_min``) whose lower side is under NumPy's tolerance, else NumPy's rule (as
    ``span.span_of``)."""
    smax = float(sv[0]) if sv.numel() else 0.0
    if smax <= 0.0:
        return 0
    tol = smax * max(m, d) * float(torch.finfo(torch.float32).eps)
    rank = int((sv > tol).sum())
    lo = torch.nonzero(sv <= tol).flatten()
    if lo.numel() and int(lo[0]) > 0:
        ks = torch.arange(int(lo[0]) - 1, sv.numel() - 1)
        ratio = sv[ks] / sv[ks + 1].clamp_min(smax * 1e-30)
        j = int(ratio.argmax())
        if float(ratio[j]) > gap_min:
            rank = int(ks[j]) + 1
    return rank


class ActivationSpan:
    """``span(K) + col((I - P_K) G)`` of the first block's ``mlp.c_proj`` update (module docstring)."""

    def __init__(self, grad: Tensor, fc: nn.Module, act: nn.Module, *, seed: int = 0) -> None:
        self.g = grad.detach().double().cpu()  # [4d, d]
        self.fc, self.act = fc, act
        self.width = int(self.g.shape[0])
        self.q = torch.zeros(self.width, 0, dtype=torch.float64)  # orthonormal basis of span(K)
        self.qtg = torch.zeros(0, self.g.shape[1], dtype=torch.float64)  # Q^T G
        self.gtg = self.g.t() @ self.g
        self.keys: set[tuple[int, ...]] = set()
        self.pending: list[Tensor] = []
        self.n_known = 0  # prefixes in K
        self.grown = 0  # prefixes added since the last refresh
        self.res_rank = 0
        self.saturated = True
        self.gen = torch.Generator().manual_seed(seed)
        self.tau = TAU
        self.sketch: Tensor | None = None  # [4d, SKETCH] float32: (I - P_S) Omega / sqrt(SKETCH)
        self.refresh(force=True)

    @classmethod
    def build(cls, obs: Observation, model: nn.Module) -> ActivationSpan | None:
        """The test for a GPT-2-layout first block (``mlp.c_fc``, ``mlp.act``, ``mlp.c_proj`` as a
        ``4d x d`` Conv1D) whose ``c_proj`` weight update is in the observation; else None."""
        try:
            mlp = transformer_blocks(model)[0].mlp
            fc, act, proj = mlp.c_fc, mlp.act, mlp.c_proj
        except (AttributeError, TypeError, ValueError, IndexError):
            return None
        name = next((n for n, p in model.named_parameters() if p is proj.weight), None)
        g = obs.tensors.get(name or "")
        d = int(model.get_input_embeddings().embedding_dim)
        if g is None or g.dim() != 2 or tuple(g.shape) != (fc.weight.shape[1], d) or g.shape[0] <= d:
            return None
        if not torch.isfinite(g).all() or float(g.abs().max()) == 0.0:
            return None
        return cls(g, fc, act)

    @torch.no_grad()
    def activations(self, y: Tensor) -> Tensor:
        """The feed-forward activations ``act(c_fc(y))`` of feed-forward inputs ``y`` [..., d]."""
        return self.act(self.fc(y))

    def add(self, key: tuple[int, ...], a: Tensor) -> None:
        """Record the activation ``a`` [4d] of an accepted prefix ``key`` (once per prefix)."""
        if key in self.keys:
            return
        self.keys.add(key)
        self.pending.append(a.detach().double().cpu().reshape(-1))
        self.n_known += 1
        self.grown += 1

    def _absorb(self) -> None:
        """Orthonormalise the pending activations against span(K) and append the new directions."""
        if not self.pending:
            return
        v = torch.stack(self.pending).t()  # [4d, k]
        self.pending = []
        v = v / v.norm(dim=0, keepdim=True).clamp_min(1e-300)
        for _ in range(2):  # twice: classical Gram-Schmidt loses orthogonality once
            v = v - self.q @ (self.q.t() @ v)
        u, s, _ = torch.linalg.svd(v, full_matrices=False)
        k = int((s > SAME).sum())
        if k:
            self.q = torch.cat([self.q, u[:, :k]], 1)
            self.qtg = torch.cat([self.qtg, u[:, :k].t() @ self.g], 0)

    @torch.no_grad()
    def refresh(self, *, force: bool = False) -> bool:
        """Recompute ``S`` and the sketch of its complement when ``K`` grew by ``REFRESH`` prefixes or
        10 % (or ``force``); True when it did. ``R``'s spectrum comes from its Gram matrix
        ``G^T G - (Q^T G)^T (Q^T G)`` (d x d; ``Q^T G`` grows with ``Q``), its rank by the span's gap rule."""
        if not force and self.grown < max(REFRESH, 0.1 * self.n_known):
            return False
        self._absorb()
        self.grown = 0
        d = int(self.g.shape[1])
        gram = self.gtg - self.qtg.t() @ self.qtg
        ev, v = torch.linalg.eigh((gram + gram.t()) / 2)
        ev, v = ev.flip(0).clamp_min(0.0), v.flip(1)
        sv = ev.sqrt()
        rank = min(_gap_rank(sv, self.width, d), self.width - int(self.q.shape[1]))
        self.saturated = rank >= min(d, self.width - int(self.q.shape[1])) - max(1, d // 100)
        keep = max(1, rank - max(2, round(RES_CUT * d))) if self.saturated else rank
        self.res_rank = keep if rank > 0 else 0
        # R's column basis R V S^-1 (orthogonal to Q up to round-off: once more against Q)
        w = v[:, :self.res_rank] / sv[:self.res_rank].clamp_min(1e-300)
        basis = self.g @ w - self.q @ (self.qtg @ w)
        basis = basis - self.q @ (self.q.t() @ basis)
        basis, _ = torch.linalg.qr(basis) if basis.shape[1] else (basis, None)
        s = torch.cat([self.q, basis], 1)
        if self.width <= EXACT_WIDTH or self.width - s.shape[1] <= SKETCH:
            # small: the exact orthonormal complement (the distance itself, not a sketch)
            full, _ = torch.linalg.qr(torch.cat([s, torch.eye(self.width, dtype=torch.float64)], 1))
            self.sketch = full[:, s.shape[1]:self.width].float().contiguous()
            return True
        om = torch.randn(self.width, SKETCH, generator=self.gen, dtype=torch.float64)
        om = om - s @ (s.t() @ om)
        om = om - s @ (s.t() @ om)
        self.sketch = (om / math.sqrt(SKETCH)).float().contiguous()
        return True

    @property
    def dim(self) -> int:
        return int(self.q.shape[1]) + self.res_rank

    @property
    def exact(self) -> bool:
        """Whether ``S`` is the span of every true activation (``R`` unsaturated, complement left)."""
        return not self.saturated and self.usable and self.n_known > 0

    @property
    def usable(self) -> bool:
        """False once ``S`` leaves too little complement for a test (``dim S > 4d - MIN_COMPLEMENT``)."""
        return self.dim < self.width - MIN_COMPLEMENT

    def distance(self, a: Tensor) -> Tensor:
        """Relative distance ``|(I - P_S) a| / |a|`` (sketched) of activations ``a`` [..., 4d] (float64)."""
        assert self.sketch is not None
        lead = a.shape[:-1]
        a = a.reshape(-1, a.shape[-1]).float()
        num = (a @ self.sketch).double().norm(dim=1)
        return (num / a.double().norm(dim=1).clamp_min(1e-300)).view(lead)


def shortlist_distances(block, aspan: ActivationSpan, prefixes: list[list[int]], pos: int, cands: list[int],
                        ds: list[Tensor], n_short: int) -> tuple[list[Tensor], float]:
    """Each path's ``n_short`` extensions nearest by ``ds`` (the feed-forward-input distances of every
    candidate) measured at ``aspan`` (the rest set to inf), the step's baseline (the median at ``aspan``
    of ``n_short // 2`` further extensions per path spread evenly over the remaining order: the
    population's median). ``block``: the incremental first block (``dec_block.PreLNDecoderBlock``)
    with the tables of positions ``<= pos``."""
    out, base = [], []
    for pre, d in zip(prefixes, ds):
        o = d.argsort()
        short, rest = o[:n_short], o[n_short:]
        extra = (rest[torch.linspace(0, rest.numel() - 1, min(n_short // 2, rest.numel())).long()]
                 if rest.numel() else rest)
        idx = torch.cat([short, extra])
        a = aspan.activations(block.extend([pre], pos, [cands[j] for j in idx.tolist()])[0])
        dd = aspan.distance(a)
        full = torch.full((len(cands),), math.inf, dtype=torch.float64)
        full[short] = dd[: short.numel()]
        out.append(full)
        base.append(dd[short.numel():])
    b = torch.cat(base)
    med = float(b.median()) if b.numel() else float(torch.cat([x[torch.isfinite(x)] for x in out]).median())
    return out, med


def learn(aspan: ActivationSpan, block, keys: set[tuple[int, ...]]) -> None:
    """Add the activations of the prefixes ``keys`` (each token at its position after the rest) that
    ``aspan`` does not hold yet, one block call per parent prefix."""
    by_pre: dict[tuple[int, ...], list[int]] = {}
    for k in keys:
        if k not in aspan.keys:
            by_pre.setdefault(k[:-1], []).append(k[-1])
    for pre, toks in by_pre.items():
        a = aspan.activations(block.extend([list(pre)], len(pre), toks)[0])
        for t, ax in zip(toks, a):
            aspan.add(pre + (t,), ax)


def peel_step(aspan: ActivationSpan, block, live: list[tuple[list[int], list[float]]],
              ended: list[tuple[list[int], list[float]]], *, lag: int, below: float, trim: float) -> None:
    """One beam step's known prefixes (``frontier.search_decoder``): each live path's prefix ``lag`` tokens
    behind its end when its ratio there is under ``below`` (``lag`` 0: the roots and the exact stage,
    every live path), and the part of each path that ended (``ended``) whose ratios are under ``trim``."""
    keys = set()
    for ids, ratios in live:
        n = len(ids) - lag
        if n >= 1 and (lag == 0 or ratios[n - 1] < below):
            keys.add(tuple(ids[:n]))
    for ids, ratios in ended:
        keys.update(tuple(ids[:k]) for k in range(1, len(ids) + 1) if ratios[k - 1] < trim)
    learn(aspan, block, keys)
