"""TabLeak's FedSGD optimisation in closed form: the fast engine (``TabLeakConfig(engine="fast")``).

For a plain Linear/ReLU MLP trained with cross-entropy (the paper's FC networks), the whole
objective of :class:`tableak.attack.TabLeak` — relax the candidate (softmax over every one-hot
group, sigmoid bounding of every continuous column), take the client's parameter gradient of
the candidate, compare it with the observed gradient (cosine or TabLeak's mean-l2) — and its
gradient w.r.t. the candidate are written out by hand, batched over all ensemble members:

* forward and parameter gradient of the MLP: shared-weight GEMMs over ``[E·B, ·]`` rows, the
  wide layers' per-member weight gradients only through ``[B, B]`` Gram matrices (``bmm``),
  the narrow output layer's formed directly, whichever is fewer flops;
* the distance's gradient w.r.t. each member's parameter gradient in closed form
  (``∂L/∂g = α(κ·t + ρ·g)``); the observed gradient enters premultiplied by κ, α is applied
  once, in the relaxation's backward;
* the double backward (parameter gradient → candidate) by hand: ReLU masks are constants
  almost everywhere, the softmax-cross-entropy term ``s·(p − y)`` back-propagates through the
  softmax Jacobian;
* the relaxations as a few fused ops (``tableak.relax.FusedRelax``: group sums by two thin
  GEMMs, one sigmoid) and their backward;
* a wide layer's observed weight gradient through its numerical-rank factors when that is fewer
  flops (a FedSGD gradient of B rows has rank ≤ B; ``_low_rank``);
* Adam on the sign of the gradient with ``torch.optim.Adam``'s update (its fused kernel).

No autograd graph is built and every step is ~130 tensor ops for all members together, every
elementwise one on a contiguous tensor (torch's CPU kernels are ~3x slower on a column slice
of a wider matrix, which is why the wide layers' ``[z | a·tᵀ]`` products are two GEMMs, not one
stacked GEMM). The per-step cost is the arithmetic: ~100 M multiply-adds in ~10 GEMMs of the
first two layers' size and ~8 small ``bmm``. The values equal the ``vmap`` engine's within
float rounding (checked by ``tests/tableak/test_attack.py``); whole runs are compared by their
metrics, since the sign trick amplifies rounding of near-zero gradients.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .relax import FusedRelax, Relaxer


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


_relu_mask = torch.ops.aten.threshold_backward.grad_input  # grad ⊙ 1[relu output > 0], written into grad_input
_NARROW = 8  # layers with at most this many outputs stack their GEMMs (their column slices are tiny)


def _low_rank(t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """``t`` [k, d] as ``(V, S Uᵀ, U S, Vᵀ)`` of its numerical rank r (singular values above
    4·max(k, d)·eps of the largest) when r·(k + d) ≤ 0.7·k·d, else None. An observed FedSGD
    weight gradient is a sum of B outer products (rank ≤ B), so a·tᵀ = (a V)(S Uᵀ) and dz·t =
    (dz U S) Vᵀ are two thin GEMMs instead of one wide one; the dropped singular values are
    rounding noise of t itself (a noised or averaged gradient has full rank and keeps the product)."""
    k, d = t.shape
    if k <= _NARROW or not t.dtype.is_floating_point:
        return None
    u, sv, vh = torch.linalg.svd(t, full_matrices=False)
    if sv.numel() == 0 or float(sv[0]) == 0.0:
        return None
    r = int((sv > sv[0] * 4 * max(k, d) * torch.finfo(t.dtype).eps).sum())
    if r * (k + d) > 0.7 * k * d:
        return None
    us = u[:, :r] * sv[:r]
    return vh[:r].t().contiguous(), us.t().contiguous(), us.contiguous(), vh[:r].contiguous()


class MLPGradientMatch:
    """Distance between each member's client gradient and the observed one, and its gradient
    w.r.t. the (relaxed) inputs, for a Linear/ReLU MLP with (mean or sum) cross-entropy.

    Both distances are written as ∂L/∂g = α(κ t + ρ g) per parameter tensor, α and ρ per member
    (cosine: κ = 1, α = −1/(‖g‖‖t‖), ρ = −⟨g,t⟩/‖g‖²; TabLeak's per-tensor mean l2: α = 1,
    κ = −ρ = −2/|tensor|), so the observed gradient enters every step premultiplied by κ and α
    is applied once, inside the relaxation's backward. Every elementwise op reads and writes
    contiguous tensors (torch's CPU kernels run ~3x slower on a column slice of a wider matrix)."""

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
        self._built: tuple | None = None

    def set_first_layer(self, w: Tensor, t: Tensor) -> None:
        """Replace the first layer's weight and observed gradient (the relaxation's column layout)."""
        self.w[0], self.tw[0] = w.contiguous(), t.contiguous()
        self._built = None

    def _build(self) -> tuple:
        """Per layer: Wᵀ, (κ t_W)ᵀ (forward), κ t_W (backward), κ_W and the bias's κ_b, ρ_W, ρ_b
        (None: the per-member cosine ρ) and ‖t_W‖², ‖t_b‖²."""
        if self._built is None:
            cos = self.loss == "cosine"
            per = []
            for w, t, tb, nw in zip(self.w, self.tw, self.tb, self.numel_w):
                kw, kb = (1.0, 1.0) if cos else (-2.0 / nw, -2.0 / tb.numel())
                wt, tt = w.t().contiguous(), (t * kw).t().contiguous()
                per.append({"wt": wt, "tt": tt, "tk": (t * kw).contiguous(), "wtt": torch.cat([wt, tt], 1),
                            "wtk": torch.cat([w, t * kw]), "lr": _low_rank(t * kw),
                            "tbk": tb * kb, "kw": kw, "rw": None if cos else -kw, "rb": None if cos else -kb,
                            "t2": t.pow(2).sum(), "tb2": tb.pow(2).sum()})
            self._built = per
        return self._built

    def __call__(self, x: Tensor, onehot: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` [E, B, d] relaxed candidates, ``onehot`` [E, B, C] labels -> (distance [E], ∂/∂x [E, B, d])."""
        dist, bar, alpha = self.run(x, onehot)
        return dist, bar if alpha is None else bar.mul_(alpha.view(-1, 1, 1))

    def distance(self, x: Tensor, onehot: Tensor) -> Tensor:
        return self.run(x, onehot, grad=False)[0]

    def run(self, x: Tensor, onehot: Tensor, *, grad: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(distance [E], ∂/∂x / α [E, B, d], α [E] or None for 1) for ``x`` [E, B, d].

        The per-member weight gradients of the wide layers are never formed: with Gram matrices
        A = a aᵀ and D = dz dzᵀ ([B, B]), ‖g_W‖² = Σ A ⊙ D, ∂/∂dz = κ a t_Wᵀ + ρ A dz and
        ∂/∂a = κ dz t_W + ρ D a; a layer with few outputs (the last) forms g_W = dzᵀa itself
        (∂/∂dz = κ a t_Wᵀ + a (ρ g_W)ᵀ, ∂/∂a = κ dz t_W + dz (ρ g_W)), whichever is fewer flops."""
        per = self._build()
        e, b, _ = x.shape
        n, r = len(self.w), e * b
        s = 1.0 / b if self.reduction == "mean" else 1.0
        # forward: z = a Wᵀ + b (relu in place) and κ a t_Wᵀ
        acts, ats = [x.reshape(r, -1)], []
        for i in range(n):
            h, k = acts[i], self.w[i].shape[0]
            if k <= _NARROW:  # a narrow layer (the output): one GEMM for both, the halves are tiny
                zt = torch.mm(h, per[i]["wtt"])
                z, at = zt[:, :k].add_(self.b[i]), zt[:, k:]
            else:  # a wide one: two GEMMs with contiguous outputs (κ a t_Wᵀ through t_W's factors if it has low rank)
                lr = per[i]["lr"]
                z = torch.addmm(self.b[i], h, per[i]["wt"])
                at = torch.mm(h, per[i]["tt"]) if lr is None else torch.mm(torch.mm(h, lr[0]), lr[1])
            ats.append(at)
            if i < n - 1:
                acts.append(z.clamp_min_(0))
        p = (z - z.amax(-1, keepdim=True)).exp_()
        p = p.div_(p.sum(-1, keepdim=True))
        # backward: the per-row output gradients dz and the bias gradients
        dz = [None] * n
        dz[n - 1] = torch.sub(p, onehot.reshape(r, -1))
        if s != 1.0:
            dz[n - 1].mul_(s)
        for i in range(n - 1, 0, -1):
            d = torch.mm(dz[i], self.w[i])
            dz[i - 1] = _relu_mask(d, acts[i], 0, grad_input=d)
        a3 = [a.view(e, b, -1) for a in acts]
        d3 = [d.view(e, b, -1) for d in dz]
        gram = [2 * b * (a.shape[1] + d.shape[1]) <= 3 * a.shape[1] * d.shape[1] for a, d in zip(acts, dz)]
        gb = [d.sum(1) for d in d3]
        dots_w, dots_b, pns_w, pns_b, mats = [], [], [], [], []
        for i in range(n):
            dw = torch.mul(dz[i], ats[i]).view(e, -1).sum(1)
            dots_w.append(dw if per[i]["kw"] == 1.0 else dw / per[i]["kw"])  # ⟨g_W, t_W⟩
            dots_b.append(gb[i] @ self.tb[i])
            pns_b.append((gb[i] * gb[i]).sum(1))
            if gram[i]:
                A, D = torch.bmm(a3[i], a3[i].transpose(1, 2)), torch.bmm(d3[i], d3[i].transpose(1, 2))
                pns_w.append((A * D).view(e, -1).sum(1))
                mats.append((A, D))
            else:
                g = torch.bmm(d3[i].transpose(1, 2), a3[i])
                pns_w.append((g * g).view(e, -1).sum(1))
                mats.append(g)
        alpha = None
        if self.loss == "cosine":
            dot, pn = sum(dots_w) + sum(dots_b), sum(pns_w) + sum(pns_b)
            gn = pn.sqrt()
            den = gn * self.tnorm + 1e-12
            dist = 1.0 - dot / den
            alpha = -1.0 / den
            rho = -dot * self.tnorm / (den * gn.clamp(min=1e-30))
        else:  # TabLeak's l2: Σ_l mean((g_W − t_W)²) + mean((g_b − t_b)²)
            dist = sum((pns_w[i] - 2 * dots_w[i] + per[i]["t2"]) / self.numel_w[i]
                       + (pns_b[i] - 2 * dots_b[i] + per[i]["tb2"]) / self.tb[i].numel() for i in range(n))
        if not grad:
            return dist, None, None
        # double backward by hand: ∂/∂dz per layer (in place on κ a t_Wᵀ), then down the dz recursion
        rho3 = rho.view(e, 1, 1) if alpha is not None else None
        scale = []
        for i in range(n):
            rb = rho.view(e, 1) if alpha is not None else per[i]["rb"]
            bvec = torch.add(per[i]["tbk"], gb[i] * rb)  # ∂L/∂g_b / α
            dzb = ats[i].view(e, b, -1).add_(bvec.unsqueeze(1))
            sc = 1.0 if alpha is not None else per[i]["rw"]
            if gram[i]:
                A, D = mats[i]
                if rho3 is not None:
                    A.mul_(rho3), D.mul_(rho3)
                dzb.baddbmm_(A, d3[i], alpha=sc)
            else:
                if rho3 is not None:
                    mats[i].mul_(rho3)
                dzb.baddbmm_(a3[i], mats[i].transpose(1, 2), alpha=sc)
            scale.append(sc)
        for i in range(n - 1):  # dz_i = (dz_{i+1} W_{i+1}) ⊙ mask_i
            _relu_mask(ats[i], acts[i + 1], 0, grad_input=ats[i])
            ats[i + 1].addmm_(ats[i], self.w[i + 1].t())
        pb = ats[n - 1]  # dz_last = s (p − y): through the softmax Jacobian
        if s != 1.0:
            pb = pb.mul_(s)
        zb = p.mul_(pb - (p * pb).sum(-1, keepdim=True))
        for i in range(n - 1, -1, -1):  # z_i = a_i W_iᵀ + b_i and g_W = dzᵀ a
            if self.w[i].shape[0] <= _NARROW:
                ab = torch.mm(torch.cat([zb, dz[i]], 1), per[i]["wtk"])
            else:
                lr = per[i]["lr"]
                ab = torch.mm(zb, self.w[i])
                ab = ab.addmm_(dz[i], per[i]["tk"]) if lr is None else ab.addmm_(torch.mm(dz[i], lr[2]), lr[3])
            if gram[i]:
                ab.view(e, b, -1).baddbmm_(mats[i][1], a3[i], alpha=scale[i])
            else:
                ab.view(e, b, -1).baddbmm_(d3[i], mats[i], alpha=scale[i])
            if i > 0:
                zb = _relu_mask(ab, acts[i], 0, grad_input=ab)
        return dist, ab.view(e, b, -1), alpha


def _fused_adam(x: Tensor):
    """torch's fused Adam kernel if it exists and runs for ``x``'s device and dtype (probed on one element), else None."""
    fused = getattr(torch, "_fused_adam_", None)
    if fused is None or x.dtype not in (torch.float32, torch.float64) or x.device.type not in ("cpu", "cuda"):
        return None
    try:
        p, g, m, v = (torch.zeros(1, dtype=x.dtype, device=x.device) for _ in range(4))
        fused([p], [g.add_(1)], [m], [v], [], [torch.ones((), dtype=torch.float32, device=x.device)], lr=0.1,
              beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
        ok = bool(torch.isclose(p, torch.full_like(p, -0.1)).all())  # one step on a unit gradient moves by lr
    except (TypeError, RuntimeError, NotImplementedError):
        return None
    return fused if ok else None


def run_adam(step_grad, x0: Tensor, *, lr: float, iterations: int, signed: bool,
             betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> Tensor:
    """``torch.optim.Adam``'s update (default hyper-parameters) on ``x0``'s copy, with
    ``step_grad(x) -> ∂/∂x``, optionally on the gradient's sign; returns the final ``x``. Uses the
    fused Adam kernel (``torch.optim.Adam(fused=True)``: one pass instead of eight) where torch has
    it, else the single-tensor update written out; the two agree to float rounding."""
    b1, b2 = betas
    x = x0.detach().clone()
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    fused = _fused_adam(x)
    if fused is not None:
        # torch.optim.Adam(fused=True)'s kernel: the same update in one pass (the step count is a tensor)
        step = torch.zeros((), dtype=torch.float32, device=x.device)
        with torch.no_grad():
            for _ in range(iterations):
                g = step_grad(x)
                if signed:
                    g = g.sign_()
                step += 1
                fused([x], [g], [m], [v], [], [step], lr=lr, beta1=b1, beta2=b2, weight_decay=0.0, eps=eps,
                      amsgrad=False, maximize=False)
        return x
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
        self.obj.set_first_layer(self.relax.to_layout(self.obj.w[0]), self.relax.to_layout(self.obj.tw[0]))

    def _onehot(self, ys: Tensor, like: Tensor) -> Tensor:
        return torch.nn.functional.one_hot(ys.long(), self.num_classes).to(like.dtype)

    def optimise(self, x0: Tensor, ys: Tensor, iterations: int) -> Tensor:
        onehot = self._onehot(ys, x0)
        relax, obj = self.relax, self.obj

        def step_grad(x: Tensor) -> Tensor:
            xr, saved = relax.forward(x)
            _, bar, alpha = obj.run(xr, onehot)
            return relax.backward(bar, saved, alpha)  # α applied with the relaxation's per-column factors

        x = run_adam(step_grad, relax.to_layout(x0), lr=self.cfg.lr, iterations=iterations, signed=self.cfg.sign)
        return relax.from_layout(x)

    def losses(self, x: Tensor, ys: Tensor) -> Tensor:
        """Distance per member of the candidates ``x`` [E, B, d] taken as they are (no relaxation)."""
        with torch.no_grad():
            return self.obj.distance(self.relax.to_layout(x), self._onehot(ys, x))


def _cross_entropy_losses() -> tuple:
    from .kit import TabularKit  # the kit's loss is the same per-row cross-entropy
    from .prior import tabular_loss

    return (tabular_loss, TabularKit.loss_fn)


def select_engine(cfg, model: nn.Module, loss_fn, target: dict[str, Tensor], names: list[str], rx: Relaxer, *,
                  reduction: str) -> FastEngine | None:
    """The fast engine for this observation under ``cfg.engine`` (``auto``: where it applies and
    ``cfg.batched``), or None for the vmap engine; ``engine="fast"`` where it cannot apply is a
    ValueError."""
    if cfg.engine == "vmap" or (cfg.engine == "auto" and not cfg.batched):
        return None
    ok = (loss_fn in _cross_entropy_losses() and cfg.loss in ("cosine", "l2") and reduction in ("mean", "sum")
          and mlp_layers(model) is not None)
    if not ok:
        if cfg.engine == "fast":
            raise ValueError("engine='fast' needs a plain Linear/ReLU MLP with the tabular cross-entropy "
                             "and the cosine or l2 loss; use engine='vmap'")
        return None
    return FastEngine(model, target, names, rx, cfg=cfg, reduction=reduction)
