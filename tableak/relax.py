"""TabLeak's relaxations, built out of place (``torch.cat`` over feature blocks).

The reference (eth-sri/tableak ``utils/*``: ``categorical_softmax``, ``continuous_sigmoid_bound``)
assigns into slices of the optimised leaf in place, which is why it only runs on PyTorch
1.7.1; here every relaxed tensor is a fresh tensor and gradients flow to the leaf.
All functions act on the last dimension and broadcast over any leading ones.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .schema import TabularSchema


class Relaxer:
    def __init__(self, schema: TabularSchema, device: torch.device | str = "cpu") -> None:
        self.schema = schema
        self.mean = torch.tensor(schema.mean, dtype=torch.float32, device=device)
        self.scale = torch.tensor(schema.scale, dtype=torch.float32, device=device)
        lo, hi = schema.bounds()
        self.lo, self.hi = lo.to(device), hi.to(device)
        self.blocks = [(f.kind, sl) for f, sl in schema.blocks()]

    def softmax(self, x: Tensor, tau: float = 1.0) -> Tensor:
        """Every categorical block of width > 1: de-standardise, softmax(·/τ), re-standardise."""
        parts = []
        for kind, sl in self.blocks:
            piece = x[..., sl]
            if kind == "categorical" and sl.stop - sl.start > 1:
                m, s = self.mean[sl], self.scale[sl]
                piece = ((piece * s + m) / tau).softmax(-1)
                piece = (piece - m) / s
            parts.append(piece)
        return torch.cat(parts, -1)

    def sigmoid(self, x: Tensor, temperature: float = 1.0) -> Tensor:
        """Every continuous column: (ub − lb)·σ(x/T) + lb with the standardised bounds."""
        parts = []
        for kind, sl in self.blocks:
            piece = x[..., sl]
            if kind == "continuous":
                lo, hi = self.lo[sl], self.hi[sl]
                piece = (hi - lo) * torch.sigmoid(piece / temperature) + lo
            parts.append(piece)
        return torch.cat(parts, -1)

    def clamp(self, x: Tensor) -> Tensor:
        """Post-processing: continuous columns clamped to their bounds (one-hot columns untouched)."""
        parts = []
        for kind, sl in self.blocks:
            piece = x[..., sl]
            if kind == "continuous":
                piece = torch.max(torch.min(piece, self.hi[sl]), self.lo[sl])
            parts.append(piece)
        return torch.cat(parts, -1)

    def probabilities(self, x: Tensor) -> list[Tensor]:
        """Per categorical block, the de-standardised block clipped at 0 and renormalised."""
        out = []
        for kind, sl in self.blocks:
            if kind == "categorical":
                p = (x[..., sl] * self.scale[sl] + self.mean[sl]).clamp(min=0)
                tot = p.sum(-1, keepdim=True)
                k = sl.stop - sl.start
                out.append(torch.where(tot > 0, p / tot.clamp(min=1e-12), torch.full_like(p, 1.0 / k)))
        return out


class FusedRelax:
    """:class:`Relaxer`'s ``softmax`` then ``sigmoid`` as a few fused ops on a permuted column
    layout, with a hand-written backward (the fast engine, ``tableak.fast``).

    The layout (``to_layout`` / ``from_layout``) puts the one-hot groups of width > 1 first,
    sorted by width (the groups of one width form a ``[n, w]`` block), then the continuous
    columns, then the rest. The first layer's weight and the observed gradient are permuted the
    same way, so the distance is unchanged and no step gathers or scatters columns.

    Group sums are two thin GEMMs through the ``[columns, groups]`` membership matrix (sum per
    group, then back to the columns with a per-column factor folded in), not one square
    block-diagonal GEMM; the one-hot block keeps ``softmax / scale`` for the backward, so
    ``(p − m)/s`` and the softmax Jacobian are one pass each."""

    def __init__(self, rx: Relaxer, *, softmax: bool, temperature: float, sigmoid: bool,
                 sigmoid_temperature: float) -> None:
        dev, dt = rx.mean.device, rx.mean.dtype
        d = rx.mean.numel()
        groups = [sl for kind, sl in rx.blocks if kind == "categorical" and sl.stop - sl.start > 1] if softmax else []
        groups.sort(key=lambda sl: sl.stop - sl.start)
        conts = [sl.start for kind, sl in rx.blocks if kind == "continuous"] if sigmoid else []
        self.tau, self.temp = float(temperature), float(sigmoid_temperature)
        layout: list[int] = []  # original column per layout position
        self.buckets: list[tuple[int, int, int]] = []  # (start, number of groups, width)
        for sl in groups:
            w = sl.stop - sl.start
            if self.buckets and self.buckets[-1][2] == w:
                st, n, _ = self.buckets[-1]
                self.buckets[-1] = (st, n + 1, w)
            else:
                self.buckets.append((len(layout), 1, w))
            layout += list(range(sl.start, sl.stop))
        self.gk, self.nc, self.d = len(layout), len(conts), d
        layout += conts
        used = set(layout)
        layout += [c for c in range(d) if c not in used]
        self.perm = torch.tensor(layout, dtype=torch.long, device=dev)  # layout position -> column
        self.inv = torch.argsort(self.perm)  # column -> layout position
        if self.gk:
            cc = self.perm[:self.gk]
            s, m = rx.scale[cc], rx.mean[cc]
            self.m_tau, self.s_tau = m / self.tau, s / self.tau  # raw = (m + x s)/τ as one addcmul
            self.inv_s, self.neg_ms = 1.0 / s, -m / s
            member = torch.zeros((self.gk, len(groups)), dtype=dt, device=dev)  # column -> its group
            at = 0
            for g, sl in enumerate(groups):
                member[at:at + sl.stop - sl.start, g] = 1.0
                at += sl.stop - sl.start
            self.member = member
            self.back_inv_s = (member / s[:, None]).t().contiguous()  # group value -> value / s per column
            self.back_s2 = (member * (s * s / self.tau)[:, None]).t().contiguous()  # group value -> value · s²/τ
        if self.nc:
            cc = self.perm[self.gk:self.gk + self.nc]
            self.lo, self.span = rx.lo[cc], rx.hi[cc] - rx.lo[cc]
            self.span_t = self.span / self.temp

    def to_layout(self, x: Tensor) -> Tensor:
        return x.index_select(-1, self.perm)

    def from_layout(self, x: Tensor) -> Tensor:
        return x.index_select(-1, self.inv)

    def _softmax_over_s(self, xc: Tensor) -> Tensor:
        """Per group softmax((m + x s)/τ), divided by the column's scale: exp(raw − row max) ·
        (1/s)/(group sum); if a whole group underflows (it lies ≳ 69 below the row's max), the
        exact per-group softmax instead."""
        raw = torch.addcmul(self.m_tau, xc, self.s_tau).view(-1, self.gk)
        e = raw.sub_(raw.amax(-1, keepdim=True)).exp_()
        tot = e @ self.member  # [rows, groups]
        if bool(tot.amin() < 1e-30):
            raw = torch.addcmul(self.m_tau, xc, self.s_tau)
            sm = torch.cat([raw[..., st:st + n * w].unflatten(-1, (n, w)).softmax(-1).flatten(-2)
                            for st, n, w in self.buckets], -1)
            return sm.mul_(self.inv_s)
        return e.mul_(tot.reciprocal_() @ self.back_inv_s).view(xc.shape)

    def forward(self, x: Tensor, out: Tensor | None = None) -> tuple[Tensor, tuple[Tensor | None, Tensor | None]]:
        """Relaxed copy of ``x`` [..., d] (layout), written into ``out`` when given (any strides,
        same shape), and what :meth:`backward` needs."""
        sm_s = sg = None
        gk, nc = self.gk, self.nc
        out = torch.empty_like(x) if out is None else out  # every piece is written into its slice
        if gk:
            sm_s = self._softmax_over_s(x[..., :gk])  # softmax / s
            torch.add(sm_s, self.neg_ms, out=out[..., :gk])  # (softmax − m)/s
        if nc:
            xc = x[..., gk:gk + nc]
            sg = torch.sigmoid(xc / self.temp if self.temp != 1.0 else xc)
            torch.addcmul(self.lo, sg, self.span, out=out[..., gk:gk + nc])
        if gk + nc < x.shape[-1]:
            out[..., gk + nc:] = x[..., gk + nc:]
        return out, (sm_s, sg)

    def backward(self, out_bar: Tensor, saved: tuple[Tensor | None, Tensor | None],
                 scale: Tensor | None = None) -> Tensor:
        """∂/∂x given ∂/∂(relaxed x) [E, B, d] (in place on ``out_bar``), times ``scale`` [E]
        per member when given (the objective's common factor, folded into the per-column ones)."""
        sm_s, sg = saved
        gk, nc = self.gk, self.nc
        sc = None if scale is None else scale.view(-1, 1, 1)
        if gk:
            ob = out_bar[..., :gk]
            v = sm_s * ob  # softmax ⊙ ∂/∂softmax
            gs = v.view(-1, gk) @ self.member  # its group sums
            if sc is not None:
                gs = gs.view(*v.shape[:-1], -1).mul_(sc)
            torch.mul(v, self.s_tau if sc is None else sc * self.s_tau, out=ob)  # (s/τ)·(softmax ⊙ ∂/∂softmax)
            ob.addcmul_(sm_s, (gs.view(-1, gs.shape[-1]) @ self.back_s2).view(v.shape), value=-1.0)
        if nc:
            ob = out_bar[..., gk:gk + nc]
            f = sg - sg * sg
            ob.mul_(f).mul_(self.span_t if sc is None else sc * self.span_t)
        if gk + nc < out_bar.shape[-1] and sc is not None:
            out_bar[..., gk + nc:].mul_(sc)
        return out_bar
