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

from .span import DagerPreconditionError, span_of, transformer_blocks

SKETCH = 192  # Gaussian sketch columns of the complement of S (relative error ~ sqrt(2 / SKETCH))
REFRESH = 48  # recompute R's basis once K has grown by this many prefixes (or 10 %)
RES_CUT = 0.03  # R saturated (rank d): drop its weakest this x d directions (as frontier.FRONTIER_CUT)
MIN_COMPLEMENT = 8  # the test needs at least this many directions outside S
EXACT_WIDTH = 1024  # activations at most this wide: the exact complement instead of the sketch
SAME = 1e-4  # a new known activation whose residual to K is under this x its norm adds no direction


class ActivationSpan:
    """``span(K) + col((I - P_K) G)`` of the first block's ``mlp.c_proj`` update (module docstring)."""

    def __init__(self, grad: Tensor, fc: nn.Module, act: nn.Module, *, seed: int = 0) -> None:
        self.g = grad.detach().double().cpu()  # [4d, d]
        self.fc, self.act = fc, act
        self.width = int(self.g.shape[0])
        self.q = torch.zeros(self.width, 0, dtype=torch.float64)  # orthonormal basis of span(K)
        self.keys: set[tuple[int, ...]] = set()
        self.pending: list[Tensor] = []
        self.n_known = 0  # prefixes in K
        self.grown = 0  # prefixes added since the last refresh
        self.res_rank = 0
        self.saturated = True
        self.gen = torch.Generator().manual_seed(seed)
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

    @torch.no_grad()
    def refresh(self, *, force: bool = False) -> bool:
        """Recompute ``S`` and the sketch of its complement when ``K`` grew by ``REFRESH`` prefixes or
        10 % (or ``force``); True when it did."""
        if not force and self.grown < max(REFRESH, 0.1 * self.n_known):
            return False
        self._absorb()
        self.grown = 0
        r = self.g - self.q @ (self.q.t() @ self.g)  # [4d, d]: the part of G no known activation explains
        d = int(r.shape[1])
        try:
            sp = span_of(r.t())  # column space of R: rank min(#missing, d) (gap rule, float32 eps)
        except DagerPreconditionError:  # every direction explained
            sp = None
        if sp is None:
            basis = torch.zeros(self.width, 0, dtype=torch.float64)
            self.res_rank, self.saturated = 0, False
        else:
            self.saturated = sp.rank >= d - max(1, d // 100)
            keep = sp.rank - max(2, round(RES_CUT * d)) if self.saturated else sp.rank
            basis = sp.basis[:, :max(1, keep)]
            self.res_rank = int(basis.shape[1])
        s = torch.cat([self.q, basis - self.q @ (self.q.t() @ basis)], 1)
        s, _ = torch.linalg.qr(s)
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
                        ds: list[Tensor], n_short: int) -> tuple[list[Tensor], float, list[dict[int, Tensor]]]:
    """Each path's ``n_short`` extensions nearest by ``ds`` (the feed-forward-input distances of every
    candidate) measured at ``aspan`` (the rest set to inf), the step's baseline (the median at ``aspan``
    of ``n_short // 2`` further extensions per path spread evenly over the remaining order: the
    population's median) and, per path, the activation of each shortlisted candidate (by its index in
    ``cands``) for ``aspan.add``. ``block``: the incremental first block (``dec_block.PreLNDecoderBlock``)
    with the tables of positions ``<= pos``."""
    out, base, acts = [], [], []
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
        acts.append({int(j): a[k] for k, j in enumerate(short.tolist())})
    b = torch.cat(base)
    med = float(b.median()) if b.numel() else float(torch.cat([x[torch.isfinite(x)] for x in out]).median())
    return out, med, acts
