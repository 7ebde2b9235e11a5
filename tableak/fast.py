"""TabLeak's FedSGD optimisation in closed form: the fast engine (``TabLeakConfig(engine="fast")``).

For a plain Linear/ReLU MLP trained with cross-entropy (the paper's FC networks), the whole
objective of :class:`tableak.attack.TabLeak` — relax the candidate (softmax over every one-hot
group, sigmoid bounding of every continuous column), take the client's parameter gradient of
the candidate, compare it with the observed gradient (cosine or TabLeak's mean-l2) — and its
gradient w.r.t. the candidate are written out by hand, batched over all ensemble members:

* forward and parameter gradient of the MLP: shared-weight ``addmm`` over ``[E·B, ·]`` rows,
  per-member weight gradients as one ``bmm``;
* the distance's gradient w.r.t. each member's parameter gradient in closed form
  (``∂L/∂g_l = a·t_l + c·g_l`` for cosine);
* the double backward (parameter gradient → candidate) by hand: ReLU masks are constants
  almost everywhere, the softmax-cross-entropy term ``s·(p − y)`` back-propagates through the
  softmax Jacobian;
* the relaxations as three fused ops (a padded group softmax, one sigmoid) and their backward;
* Adam on the sign of the gradient with exactly ``torch.optim.Adam``'s single-tensor update.

No autograd graph is built and every step is ~60 tensor ops for all members together, so the
per-step cost is the arithmetic (dominated by ~12 GEMMs of the first two layers' size), not
Python dispatch. The values equal the ``vmap`` engine's within float rounding (checked by
``tests/tableak/test_attack.py``); whole runs are compared by their metrics, since the sign
trick amplifies rounding of near-zero gradients.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .relax import Relaxer


def mlp_layers(model: nn.Module) -> list[nn.Linear] | None:
    """The Linear layers of ``model`` if it is exactly Linear(-ReLU-Linear)* applied in order
    (``FullyConnected`` or a bare ``nn.Sequential``), else ``None`` (the fast engine does not apply)."""
    from .models import FullyConnected

    if isinstance(model, FullyConnected) and type(model).forward is FullyConnected.forward:
        seq = model.net
    elif type(model) is nn.Sequential:
        seq = model
    else:
        return None
    mods = list(seq)
    if not mods or len(mods) % 2 == 0:
        return None
    for i, m in enumerate(mods):
        want = nn.Linear if i % 2 == 0 else nn.ReLU
        if type(m) is not want:
            return None
    layers = [m for m in mods if isinstance(m, nn.Linear)]
    if any(m.bias is None for m in layers):
        return None
    return layers


class FusedRelax:
    """:class:`Relaxer`'s ``softmax`` then ``sigmoid`` as a few fused ops on a permuted, padded
    column layout, with a hand-written backward.

    The layout (``to_layout`` / ``from_layout``) puts every one-hot group of width > 1 into a
    ``[G, K]`` block (narrower groups padded with constant columns whose softmax weight is exactly
    0 and whose relaxed value is 0), then the continuous columns, then the rest; the first layer's
    weight and the observed gradient are mapped the same way (zero columns at the pads), so the
    relaxations are contiguous slices and the distance is unchanged."""

    def __init__(self, rx: Relaxer, *, softmax: bool, temperature: float, sigmoid: bool,
                 sigmoid_temperature: float) -> None:
        dev = rx.mean.device
        d = rx.mean.numel()
        groups = [sl for kind, sl in rx.blocks if kind == "categorical" and sl.stop - sl.start > 1] if softmax else []
        conts = [sl.start for kind, sl in rx.blocks if kind == "continuous"] if sigmoid else []
        self.tau, self.temp = float(temperature), float(sigmoid_temperature)
        k = max((sl.stop - sl.start for sl in groups), default=0)
        self.g, self.k = len(groups), k
        self.gk, self.nc = len(groups) * k, len(conts)
        layout: list[int] = []  # original column per layout position, -1 = pad
        for sl in groups:
            layout += list(range(sl.start, sl.stop)) + [-1] * (k - (sl.stop - sl.start))
        layout += conts
        used = set(layout)
        layout += [c for c in range(d) if c not in used]
        lay = torch.tensor(layout, dtype=torch.long)
        self.width = len(layout)
        self.pos = (lay >= 0).nonzero().squeeze(1).to(dev)  # layout positions of real columns
        self.cols = lay[lay >= 0].to(dev)  # their original columns
        if self.gk:
            c = lay[:self.gk]
            real = c >= 0
            cc = c.clamp(min=0).to(dev)
            real_d = real.to(dev)
            zero, one = torch.zeros((), device=dev), torch.ones((), device=dev)
            self.s_in = torch.where(real_d, rx.scale[cc], zero)  # raw = x·s_in + m_in (pads: −inf)
            self.m_in = torch.where(real_d, rx.mean[cc], torch.full((), float("-inf"), device=dev))
            self.s_out = torch.where(real_d, rx.scale[cc], one)  # out = (softmax − m_out) / s_out (pads: 0)
            self.m_out = torch.where(real_d, rx.mean[cc], zero)
        if self.nc:
            cc = torch.tensor(conts, dtype=torch.long, device=dev)
            self.lo, self.span = rx.lo[cc], rx.hi[cc] - rx.lo[cc]

    def to_layout(self, x: Tensor) -> Tensor:
        """[..., d] -> [..., width] (pads 0)."""
        out = x.new_zeros((*x.shape[:-1], self.width))
        out[..., self.pos] = x[..., self.cols]
        return out

    def from_layout(self, x: Tensor) -> Tensor:
        out = x.new_empty((*x.shape[:-1], self.cols.numel()))
        out[..., self.cols] = x[..., self.pos]
        return out

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[Tensor | None, Tensor | None]]:
        """Relaxed copy of ``x`` [..., width] (layout) and what :meth:`backward` needs."""
        sm = sg = None
        parts = []
        gk, nc = self.gk, self.nc
        if gk:
            raw = torch.addcmul(self.m_in, x[..., :gk], self.s_in)
            if self.tau != 1.0:
                raw = raw / self.tau
            sm = raw.unflatten(-1, (self.g, self.k)).softmax(-1).flatten(-2)
            parts.append((sm - self.m_out) / self.s_out)
        if nc:
            xc = x[..., gk:gk + nc]
            sg = torch.sigmoid(xc / self.temp if self.temp != 1.0 else xc)
            parts.append(torch.addcmul(self.lo, sg, self.span))
        parts.append(x[..., gk + nc:])
        return torch.cat(parts, -1), (sm, sg)

    def backward(self, out_bar: Tensor, saved: tuple[Tensor | None, Tensor | None]) -> Tensor:
        """∂/∂x given ∂/∂(relaxed x) (in place on ``out_bar``)."""
        sm, sg = saved
        gk, nc = self.gk, self.nc
        if gk:
            prod = sm * out_bar[..., :gk] / self.s_out
            tot = prod.unflatten(-1, (self.g, self.k)).sum(-1, keepdim=True)
            raw_bar = (prod.unflatten(-1, (self.g, self.k)) - sm.unflatten(-1, (self.g, self.k)) * tot).flatten(-2)
            if self.tau != 1.0:
                raw_bar = raw_bar / self.tau
            out_bar[..., :gk] = raw_bar * self.s_in
        if nc:
            g = out_bar[..., gk:gk + nc] * self.span * sg * (1 - sg)
            out_bar[..., gk:gk + nc] = g / self.temp if self.temp != 1.0 else g
        return out_bar


class MLPGradientMatch:
    """Distance between each member's client gradient and the observed one, and its gradient
    w.r.t. the (relaxed) inputs, for a Linear/ReLU MLP with (mean or sum) cross-entropy."""

    def __init__(self, layers: list[nn.Linear], names: list[tuple[str, str]], target: dict[str, Tensor], *,
                 loss: str, reduction: str) -> None:
        if loss not in ("cosine", "l2"):
            raise ValueError(f"the fast engine supports the cosine and l2 losses, not {loss!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"unknown loss reduction {reduction!r}")
        self.w = [m.weight.detach() for m in layers]
        self.b = [m.bias.detach() for m in layers]
        self.tw = [target[wn].detach() for wn, _ in names]
        self.tb = [target[bn].detach() for _, bn in names]
        self.loss, self.reduction = loss, reduction
        self.tnorm = torch.sqrt(sum(t.pow(2).sum() for t in self.tw + self.tb))
        self.numel_w = [t.numel() for t in self.tw]  # l2's per-tensor mean (before any column padding)

    def __call__(self, x: Tensor, onehot: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` [E, B, d] relaxed candidates, ``onehot`` [E, B, C] labels -> (distance [E], ∂/∂x [E, B, d])."""
        e, b, _ = x.shape
        n = len(self.w)
        s = 1.0 / b if self.reduction == "mean" else 1.0
        # forward (shared weights: one GEMM over all members' rows)
        acts, masks = [x], []
        h = x.reshape(e * b, -1)
        for i in range(n):
            z = torch.addmm(self.b[i], h, self.w[i].t())
            if i < n - 1:
                m = z > 0
                masks.append(m)
                h = z.mul_(m)  # relu (z is not needed again)
                acts.append(h.view(e, b, -1))
            else:
                logits = z
        p = logits.softmax(-1)
        # backward: per-member parameter gradients
        dz = [None] * n
        dz[n - 1] = (p.view(e, b, -1) - onehot).mul_(s)
        for i in range(n - 1, 0, -1):
            dz[i - 1] = (dz[i].reshape(e * b, -1) @ self.w[i]).mul_(masks[i - 1]).view(e, b, -1)
        gw = [torch.bmm(dz[i].transpose(1, 2), acts[i]) for i in range(n)]
        gb = [dz[i].sum(1) for i in range(n)]
        # the distance and its gradient w.r.t. every parameter gradient
        if self.loss == "cosine":
            gwf = [g.view(e, -1) for g in gw]
            dot = sum(g @ t.view(-1) for g, t in zip(gwf, self.tw)) + sum(g @ t for g, t in zip(gb, self.tb))
            pn = sum(torch.bmm(g.unsqueeze(1), g.unsqueeze(2)).view(e) for g in gwf + gb)
            gn = pn.sqrt()
            den = gn * self.tnorm + 1e-12
            dist = 1.0 - dot / den
            a = -1.0 / den  # ∂L/∂g = a·t + c·g
            c = dot * self.tnorm / (den * den * gn.clamp(min=1e-30))
            gw_bar = [g.mul_(c.view(e, 1, 1)).addcmul_(a.view(e, 1, 1), t) for g, t in zip(gw, self.tw)]
            gb_bar = [g.mul_(c.view(e, 1)).addcmul_(a.view(e, 1), t) for g, t in zip(gb, self.tb)]
        else:  # TabLeak's l2: Σ_l mean((g_l − t_l)²)
            dw = [g.sub_(t) for g, t in zip(gw, self.tw)]
            db = [g.sub_(t) for g, t in zip(gb, self.tb)]
            dist = sum(d.pow(2).sum((1, 2)) / n for d, n in zip(dw, self.numel_w)) + sum(d.pow(2).mean(1) for d in db)
            gw_bar = [d.mul_(2.0 / n) for d, n in zip(dw, self.numel_w)]
            gb_bar = [d.mul_(2.0 / d.shape[1]) for d in db]
        # double backward by hand: parameter gradients -> dz (via the backward chain) -> logits -> x
        dz_bar = [torch.baddbmm(gb_bar[i].unsqueeze(1), acts[i], gw_bar[i].transpose(1, 2)) for i in range(n)]
        a_bar = [torch.bmm(dz[i], gw_bar[i]) for i in range(n)]  # ∂/∂acts[i] through gW_i = dz_iᵀ acts[i]
        for i in range(n - 1):  # dz_i = (dz_{i+1} W_{i+1}) ⊙ mask_i
            da = dz_bar[i].reshape(e * b, -1).mul_(masks[i])
            dz_bar[i + 1].view(e * b, -1).addmm_(da, self.w[i + 1].t())
        pb = dz_bar[n - 1].reshape(e * b, -1).mul_(s)  # dz_n = s (p − y)
        z_bar = p * (pb - (p * pb).sum(-1, keepdim=True))
        for i in range(n - 1, -1, -1):  # forward chain: z_i = acts[i] W_iᵀ + b_i
            ab = a_bar[i].view(e * b, -1).addmm_(z_bar, self.w[i])
            if i > 0:
                z_bar = ab.mul_(masks[i - 1])
        return dist, a_bar[0]


def run_adam(step_grad, x0: Tensor, *, lr: float, iterations: int, signed: bool,
             betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> Tensor:
    """``torch.optim.Adam``'s single-tensor update (default hyper-parameters) on ``x0``'s copy,
    with ``step_grad(x) -> ∂/∂x``, optionally on the gradient's sign; returns the final ``x``."""
    b1, b2 = betas
    x = x0.detach().clone()
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    with torch.no_grad():
        for t in range(1, iterations + 1):
            g = step_grad(x)
            if signed:
                g = g.sign_()
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            step_size = lr / (1 - b1 ** t)
            denom = (v.sqrt() / (1 - b2 ** t) ** 0.5).add_(eps)
            x.addcdiv_(m, denom, value=-step_size)
    return x


class FastEngine:
    """The fast engine bound to one observation: :meth:`optimise` (``TabLeak._optimise`` without
    the final sigmoid) and :meth:`losses` (the distance of unrelaxed candidates, batched)."""

    def __init__(self, model: nn.Module, target: dict[str, Tensor], names: list[str], rx: Relaxer, *, cfg,
                 reduction: str) -> None:
        layers = mlp_layers(model)
        if layers is None:
            raise ValueError("engine='fast' needs a plain Linear/ReLU MLP (tableak.models.FullyConnected); "
                             "use engine='vmap'")
        pnames = {id(p): n for n, p in model.named_parameters()}
        lnames = [(pnames[id(m.weight)], pnames[id(m.bias)]) for m in layers]
        if sorted(names) != sorted(n for pair in lnames for n in pair):
            raise ValueError("engine='fast' needs the observed gradient of every parameter; use engine='vmap'")
        self.cfg = cfg
        self.num_classes = layers[-1].out_features
        self.obj = MLPGradientMatch(layers, lnames, target, loss=cfg.loss, reduction=reduction)
        self.relax = FusedRelax(rx, softmax=cfg.softmax, temperature=cfg.temperature, sigmoid=cfg.sigmoid,
                                sigmoid_temperature=cfg.sigmoid_temperature)
        # the first layer's weight and observed gradient in the relaxation's column layout
        self.obj.w[0] = self.relax.to_layout(self.obj.w[0]).contiguous()
        self.obj.tw[0] = self.relax.to_layout(self.obj.tw[0]).contiguous()

    def _onehot(self, ys: Tensor, like: Tensor) -> Tensor:
        return torch.nn.functional.one_hot(ys.long(), self.num_classes).to(like.dtype)

    def optimise(self, x0: Tensor, ys: Tensor, iterations: int) -> Tensor:
        onehot = self._onehot(ys, x0)
        relax, obj = self.relax, self.obj

        def step_grad(x: Tensor) -> Tensor:
            xr, saved = relax.forward(x)
            _, xr_bar = obj(xr, onehot)
            return relax.backward(xr_bar, saved)

        x = run_adam(step_grad, relax.to_layout(x0), lr=self.cfg.lr, iterations=iterations, signed=self.cfg.sign)
        return relax.from_layout(x)

    def losses(self, x: Tensor, ys: Tensor) -> Tensor:
        """Distance per member of the candidates ``x`` [E, B, d] taken as they are (no relaxation)."""
        with torch.no_grad():
            return self.obj(self.relax.to_layout(x), self._onehot(ys, x))[0]
