"""Gradient matching for text attacks on input embeddings (shared by TAG and LAMP).

Two ways to get the dummy gradient:

* ``batch_distance``: the whole padded dummy batch in one forward with the attention mask,
  differentiable w.r.t. the embeddings (``create_graph=True``), for the continuous step.
* ``sentence_grads``: per-sentence gradients of *many candidates of one sentence* in one
  vectorised call (``torch.func.vmap(torch.func.grad(...))`` over the candidate axis). A
  candidate has its sentence's exact length, so no padding or mask is needed (BERT's mask
  preparation is data-dependent and does not vmap). The batch gradient is the sum of
  per-sentence contributions (scaled by 1/B for mean reduction), so a candidate for sentence
  i is scored as ``fixed_i + g(candidate)``. ``batched=False`` scores one candidate at a time
  (the benchmark baseline).

The word-embedding matrix never enters the dummy graph (the dummy input *is* embeddings),
so its observed gradient is not matched; it is used for token-support filtering instead.

This is the text specialisation of the gradient-matching core (``common.grads``): the
config's ``loss`` names map to the core's distance kinds (``cos`` = ``layer-cosine``, ``tag``,
``l2``), :meth:`GradMatcher.reference_distance` *is* the core's ``gradient_distance`` (vmapped
over a candidate axis), and the fused :meth:`GradMatcher.distance` computes the same values
with a hand-written backward (faster on the continuous step: ``bench/textleak_lamp.py``).
FedAvg deltas are read as gradients by the core's ``observed_gradient``.
"""
from __future__ import annotations

import functools
from typing import Literal, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from common.functional import functional_losses, reduce_loss
from common.grads import gradient_distance, observed_gradient

from ..prior import TextPrior
from .ghost import Factored, GhostScorer, Unsupported, factor

__all__ = ["GradMatcher", "Loss", "DISTANCE_OF_LOSS", "VMAP_BUDGET_BYTES", "observed_gradient", "vmap_chunk"]

Loss = Literal["cos", "tag", "l2"]
#: the text configs' loss names -> the core's distance kinds (``common.grads.gradient_distance``)
DISTANCE_OF_LOSS: dict[str, str] = {"cos": "layer-cosine", "tag": "tag", "l2": "l2"}
#: bytes of per-candidate gradients one vmap call may form (``chunk`` x matched parameters x element size): a call
#: holds about three such buffers (the gradients, ``fixed + g``, the reduction's temporaries). 16 SmolLM2-135M
#: candidates were 6.8 GB per buffer and a LAMP run was OOM-killed at 21 GB RSS (issue 18); MiniLM's 16 are 0.7 GB.
VMAP_BUDGET_BYTES = 1 << 30


def vmap_chunk(requested: int, n_floats: int, *, element_size: int = 4, budget: int | None = None) -> int:
    """Candidates per ``vmap(grad)`` call: at most ``requested``, and no more than keep ``chunk x n_floats x
    element_size`` under ``budget`` (at least 1: a model too large for the budget still runs, one candidate
    at a time). ``budget`` defaults to :data:`VMAP_BUDGET_BYTES`."""
    budget = VMAP_BUDGET_BYTES if budget is None else budget
    return max(1, min(int(requested), budget // max(1, int(n_floats) * int(element_size))))


class GradMatcher:
    def __init__(self, model: nn.Module, prior: TextPrior, target: Mapping[str, Tensor], *, loss: Loss,
                 tag_factor: float = 0.01, reduction: str = "mean", batch_size: int = 1,
                 chunk: int = 16, lowrank: float | None = None) -> None:
        if loss not in DISTANCE_OF_LOSS:
            raise ValueError(f"unknown text gradient loss {loss!r}; use {', '.join(DISTANCE_OF_LOSS)}")
        self.model = model
        self.prior = prior
        self.loss = loss
        self.kind = DISTANCE_OF_LOSS[loss]  # the core's name for this distance
        self.tag_factor = tag_factor
        self.reduction = reduction
        self.batch_size = batch_size
        all_params = {n: p.detach() for n, p in model.named_parameters()}
        self.names = [n for n in target if n in all_params and n != prior.embedding_name]
        if not self.names:
            raise ValueError("the observation shares no parameter with the model besides the word embeddings")
        self._all_params, self._cloned = all_params, frozenset(self.names)
        if loss == "cos":
            # tensors whose observed gradient is (numerically) zero have no direction to match, e.g.
            # attention key biases (softmax is shift-invariant: their gradient is float noise)
            top = max(float(target[n].norm()) for n in self.names)
            self.names = [n for n in self.names if float(target[n].norm()) > 1e-7 * top]
        self.target = {n: target[n].detach() for n in self.names}
        # the vmap paths' candidates per call, capped by the per-candidate gradient size (issue 18)
        self.chunk = vmap_chunk(chunk, sum(self.target[n].numel() for n in self.names),
                                element_size=next(iter(self.target.values())).element_size())
        self._flat_target = {n: t.flatten() for n, t in self.target.items()}
        self._target_norm = {n: float(torch.linalg.vector_norm(t)) for n, t in self._flat_target.items()}
        t0 = next(iter(self.target.values()))
        self._tn = torch.tensor([self._target_norm[n] for n in self.names], dtype=t0.dtype, device=t0.device)
        self.scale = 1.0 / batch_size if reduction == "mean" else 1.0
        self._ghost: GhostScorer | None | bool = None  # built on first use; False: not applicable
        self.lowrank = lowrank  # the ghost paths' Linear targets as truncated SVDs (rtol; None: dense)
        self._ghost_mats: dict[str, Tensor | Factored] | None = None

    @functools.cached_property
    def params(self) -> dict[str, Tensor]:
        """The model's parameters for the functional paths, the matched ones as differentiable copies
        (made on first use: the ghost paths never need them, 11 M floats on MiniLM)."""
        return {n: (p.clone().requires_grad_(True) if n in self._cloned else p) for n, p in self._all_params.items()}

    # -- distances -------------------------------------------------------------------------
    def distance(self, grads: Mapping[str, Tensor], lead: int = 0) -> Tensor:
        """Gradient distance; with ``lead=1`` the grads carry a candidate axis and one value per
        candidate is returned. cos: mean over tensors of 1 − cos (LAMP ``cos``); tag: Σ ‖·‖² +
        tag_factor·‖·‖₁ (LAMP ``tag``); l2: Σ ‖·‖² (``dlg``).

        Written with reductions that allocate at most one parameter-sized temporary (``dot``,
        ``vector_norm``). When a gradient needs a graph (the continuous step) the value and its
        derivative w.r.t. the dummy gradients come from one autograd node (:class:`_Distance`)
        whose backward is two fused passes per tensor, instead of autograd through ~5 elementwise
        ops per tensor; ``reference_distance`` is the plain formula the tests compare against."""
        gs = [grads[n] for n in self.names]
        if lead == 0 and torch.is_grad_enabled() and any(g.requires_grad for g in gs):
            return _Distance.apply(self, *gs)
        return self._distance_values(gs, lead)[0]

    def _distance_values(self, gs: Sequence[Tensor], lead: int) -> tuple[Tensor, list]:
        """Distance and, per tensor, what its derivative needs (no autograd)."""
        terms, saved = [], []
        with torch.no_grad():
            for n, g in zip(self.names, gs):
                t = self._flat_target[n]
                g = g.flatten(lead)
                if self.loss == "cos":
                    dot = g @ t
                    gn = torch.linalg.vector_norm(g, dim=-1)
                    tn = self._target_norm[n]
                    terms.append(1.0 - dot / (gn * tn).clamp_min(1e-30))
                    saved.append((dot, gn, tn))
                else:
                    d = g - t
                    sq = torch.linalg.vector_norm(d, dim=-1).square()
                    terms.append(sq + self.tag_factor * torch.linalg.vector_norm(d, 1, dim=-1)
                                 if self.loss == "tag" else sq)
                    saved.append(d)
            s = torch.stack(terms)
        return (s.mean(0) if self.loss == "cos" else s.sum(0)), saved

    def reference_distance(self, grads: Mapping[str, Tensor], lead: int = 0) -> Tensor:
        """The core's ``gradient_distance`` (plain autograd; vmapped over the candidate axis when
        ``lead=1``): the tests check the fused ``distance`` against it."""
        def one(g: Mapping[str, Tensor]) -> Tensor:
            return gradient_distance(self.kind, g, self.target, names=self.names, alpha=self.tag_factor)

        if lead == 0:
            return one(grads)
        return vmap(one)({n: grads[n] for n in self.names})

    # -- batch (continuous step) ------------------------------------------------------------
    def _batch_grads(self, x: Tensor, mask: Tensor, labels: Tensor | None, targets: Tensor | None,
                     create_graph: bool) -> dict[str, Tensor]:
        batch = self.prior.build_batch(x, mask, labels, targets)
        loss = reduce_loss(functional_losses(self.model, self.prior.loss_fn, self.params, batch), self.reduction)
        gs = torch.autograd.grad(loss, [self.params[n] for n in self.names], create_graph=create_graph)
        return dict(zip(self.names, gs))

    def batch_distance(self, x: Tensor, mask: Tensor, labels: Tensor | None = None, targets: Tensor | None = None,
                       create_graph: bool = True) -> Tensor:
        return self.distance(self._batch_grads(x, mask, labels, targets, create_graph))

    def ghost_batch_distance(self, x: Tensor, mask: Tensor, labels: Tensor | None = None,
                             targets: Tensor | None = None) -> Tensor | None:
        """``batch_distance`` (same value, differentiable w.r.t. ``x`` and soft labels) from the
        ghost products of :mod:`.ghost` instead of the parameter gradients: the dummy gradient is
        never formed, only each layer's inputs and output gradients (``create_graph=True``) and,
        per ``Linear``, ``<G, T> = Σ_t δ_t·(T a_t)`` and ``|G|² = Σ_{t,s} (δ_t·δ_s)(a_t·a_s)``.
        That drops the weight-gradient products of the first backward and their double backward
        (one matrix product per ``Linear`` weight of the three the plain path takes) and every
        parameter-sized temporary. ``None`` where the ghost products do not apply (``tag`` loss,
        uncovered modules): the caller keeps :meth:`batch_distance`."""
        if not self.ghost_ready():
            return None
        n = x.shape[0]

        def forward() -> Tensor:
            b = self.prior.build_batch(x, mask, labels, targets)
            return self.prior.loss_fn(self.model, b) * self.scale

        tgt = self.ghost_target()
        mats = [tgt] if self.loss == "cos" else [{k: -t for k, t in tgt.items()}]
        try:
            dots, sq = self._ghost.products(forward, 1, n, mats, differentiable=True)
        except Unsupported:
            self._ghost = False
            return None
        # every tensor's term at once (one op per step of the formula instead of one per tensor: the
        # step's graph is dispatch-bound on a small model)
        dot = torch.stack([dots[k][0][0] for k in self.names])
        gg = torch.stack([sq[k][0] for k in self.names])
        if self.loss == "cos":
            # |G| from |G|², with the same 1e-30 floor on |G||T| as the plain formula
            return (1.0 - dot / (gg.clamp_min(0.0).sqrt() * self._tn).clamp_min(1e-30)).mean()
        return (self._tn.square() + 2.0 * dot + gg).sum()

    # -- candidates of one sentence (discrete step, initialisation) ---------------------------
    def sentence_grads(self, x: Tensor, labels: Tensor | None = None, targets: Tensor | None = None,
                       *, batched: bool = True) -> dict[str, Tensor]:
        """Per-candidate gradient contributions of one sentence: ``x [C, L, d]`` (no padding),
        ``labels [C]`` / ``[C, K]`` (encoders) or ``targets [C, L]`` (decoders)."""
        out: dict[str, list[Tensor]] = {n: [] for n in self.names}
        for g in self._grad_chunks(x, labels, targets, batched):
            for n in self.names:
                out[n].append(g[n])
        return {n: torch.cat(v) for n, v in out.items()}

    def sentence_distances(self, x: Tensor, fixed: Mapping[str, Tensor], labels: Tensor | None = None,
                           targets: Tensor | None = None, *, batched: bool = True) -> Tensor:
        """``distance(fixed + g(candidate))`` for every candidate of one sentence, chunk by chunk:
        only ``chunk`` per-candidate gradients exist at a time (``sentence_grads`` keeps all C,
        C × the parameter count)."""
        out = []
        for g in self._grad_chunks(x, labels, targets, batched):
            out.append(self.distance({n: fixed[n] + g[n] for n in self.names}, lead=1))
        return torch.cat(out)

    def ghost_ready(self) -> bool:
        """Whether :meth:`ghost_distances` applies to this loss and model (as far as known before a call)."""
        if self.loss not in ("cos", "l2"):
            return False
        if self._ghost is None:
            self._ghost = GhostScorer.build(self.model, self.names) or False
        return self._ghost is not False

    def ghost_target(self) -> dict[str, Tensor | Factored]:
        """The target as the ghost products take it: with ``lowrank`` (an rtol), each ``Linear`` weight whose
        observed gradient is of low rank up to that relative Frobenius part as its truncated SVD
        (:func:`.ghost.factor`: one client step's weight gradient has rank <= its tokens; its dot products
        with a candidate's gradient then cost ``r·(in+out)`` per token instead of ``in·out``); else the
        dense target. Built once (an SVD per weight, float64)."""
        if self._ghost_mats is None:
            mats: dict[str, Tensor | Factored] = dict(self.target)
            if self.lowrank is not None and self.ghost_ready():
                for n in self._ghost.linear_weights():
                    f = factor(self.target[n], rtol=self.lowrank)
                    if f is not None:
                        mats[n] = f
            self._ghost_mats = mats
        return self._ghost_mats

    def ghost_distances(self, x: Tensor, fixed: Mapping[str, Tensor] | None, labels: Tensor | None = None,
                        targets: Tensor | None = None, *, mask: Tensor | None = None, group: int = 1) -> Tensor | None:
        """``distance(fixed + g(candidate))`` for ``x.shape[0] // group`` candidates at once, each the
        sum of ``group`` consecutive examples of ``x [C·group, L, d]`` (``mask``: their attention
        mask), without forming per-candidate gradients (:mod:`.ghost`); ``fixed=None`` is zero.
        ``None`` when the loss (``tag``'s L1 term needs the gradient itself) or the model's modules
        are not covered; the caller then uses :meth:`sentence_distances`."""
        if not self.ghost_ready():
            return None
        count = x.shape[0] // group
        t = self._flat_target
        with torch.no_grad():
            if fixed is not None:  # sentence_grads' leading candidate axis of 1, if any
                fixed = {n: fixed[n].reshape(self.target[n].shape) for n in self.names}
            if self.loss == "cos":
                mats = [self.ghost_target()] + ([fixed] if fixed is not None else [])
                if fixed is not None:
                    ft = {n: fixed[n].reshape(-1) @ t[n] for n in self.names}
                    ff = {n: fixed[n].reshape(-1).square().sum() for n in self.names}
            else:
                diff = {n: (fixed[n] - self.target[n]) if fixed is not None else -self.target[n] for n in self.names}
                mats = [diff if fixed is not None else {n: -m for n, m in self.ghost_target().items()}]
                dd = {n: diff[n].reshape(-1).square().sum() for n in self.names}

        def forward() -> Tensor:
            b = self.prior.build_batch(x, mask, labels, targets)
            return self.prior.loss_fn(self.model, b) * self.scale

        try:
            dots, sq = self._ghost.products(forward, count, group, mats)
        except Unsupported:
            self._ghost = False
            return None
        with torch.no_grad():  # [tensors, candidates], every tensor's term at once
            dot = torch.stack([dots[n][0] for n in self.names])
            gg = torch.stack([sq[n] for n in self.names])
            if self.loss == "cos":
                if fixed is not None:
                    dot = dot + torch.stack([ft[n] for n in self.names]).unsqueeze(1)
                    gg = gg + 2.0 * torch.stack([dots[n][1] for n in self.names]) + torch.stack(
                        [ff[n] for n in self.names]).unsqueeze(1)
                return (1.0 - dot / (gg.clamp_min(0.0).sqrt() * self._tn.unsqueeze(1)).clamp_min(1e-30)).mean(0)
            return (torch.stack([dd[n] for n in self.names]).unsqueeze(1) + 2.0 * dot + gg).sum(0)

    def _grad_chunks(self, x: Tensor, labels: Tensor | None, targets: Tensor | None, batched: bool):
        params = {n: self.params[n].detach() for n in self.names}
        frozen = {n: p for n, p in self.params.items() if n not in params}
        scale = self.scale

        def one(p: dict[str, Tensor], xe: Tensor, y: Tensor | None, tg: Tensor | None) -> Tensor:
            b = self.prior.build_batch(xe.unsqueeze(0), None, None if y is None else y.unsqueeze(0),
                                       None if tg is None else tg.unsqueeze(0))
            return functional_losses(self.model, self.prior.loss_fn, {**frozen, **p}, b).sum() * scale

        c = x.shape[0]
        if batched:
            in_dims = (None, 0, None if labels is None else 0, None if targets is None else 0)
            fn = vmap(grad(one), in_dims=in_dims)
            for s in range(0, c, self.chunk):
                g = fn(params, x[s:s + self.chunk], None if labels is None else labels[s:s + self.chunk],
                       None if targets is None else targets[s:s + self.chunk])
                yield {n: g[n].detach() for n in self.names}
        else:
            gfn = grad(one)
            for i in range(c):
                g = gfn(params, x[i], None if labels is None else labels[i], None if targets is None else targets[i])
                yield {n: g[n].detach().unsqueeze(0) for n in self.names}


class _Distance(torch.autograd.Function):
    """``GradMatcher.distance`` of dummy gradients that carry a graph (value + fused backward)."""

    @staticmethod
    def forward(ctx, matcher: GradMatcher, *gs: Tensor) -> Tensor:
        value, saved = matcher._distance_values(gs, 0)
        ctx.matcher, ctx.saved = matcher, saved
        ctx.shapes = [g.shape for g in gs]
        if matcher.loss == "cos":
            ctx.save_for_backward(*gs)
        return value

    @staticmethod
    def backward(ctx, go: Tensor):
        m, out = ctx.matcher, []
        go = float(go)
        gs = ctx.saved_tensors
        for i, (n, shape) in enumerate(zip(m.names, ctx.shapes)):
            if m.loss == "cos":
                dot, gn, tn = (float(v) if torch.is_tensor(v) else v for v in ctx.saved[i])
                k = len(m.names)
                den = max(gn * tn, 1e-30)
                # d(1 - dot / (|g| |t|)) / dg = -t / (|g||t|) + dot · g / (|g|^3 |t|)
                a = go / k * dot / (den * gn * gn) if gn > 0 else 0.0
                gr = torch.add(gs[i].detach().reshape(-1) * a, m._flat_target[n], alpha=-go / k / den)
            else:
                d = ctx.saved[i]
                gr = d * (2.0 * go)
                if m.loss == "tag":
                    gr.add_(torch.sign(d), alpha=m.tag_factor * go)
            out.append(gr.view(shape))
        ctx.saved = None
        return (None, *out)
