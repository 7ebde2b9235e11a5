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
    """:class:`Relaxer`'s ``softmax`` then ``sigmoid`` as a few fused ops on a permuted column
    layout, with a hand-written backward.

    The layout (``to_layout`` / ``from_layout``) puts the one-hot groups of width > 1 first,
    sorted by width, so the groups of one width are a contiguous slice viewed as ``[n_w, w]``
    (one softmax per distinct width), then the continuous columns, then the rest. The first
    layer's weight and the observed gradient are permuted the same way, so the distance is
    unchanged and no step gathers or scatters columns."""

    def __init__(self, rx: Relaxer, *, softmax: bool, temperature: float, sigmoid: bool,
                 sigmoid_temperature: float) -> None:
        dev = rx.mean.device
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
        self.gk, self.nc = len(layout), len(conts)
        layout += conts
        used = set(layout)
        layout += [c for c in range(d) if c not in used]
        self.perm = torch.tensor(layout, dtype=torch.long, device=dev)  # layout position -> column
        self.inv = torch.argsort(self.perm)  # column -> layout position
        if self.gk:
            cc = self.perm[:self.gk]
            self.s_cat, self.m_cat = rx.scale[cc], rx.mean[cc]
            self.inv_s, self.neg_ms = 1.0 / self.s_cat, -self.m_cat / self.s_cat  # (p − m)/s as one addcmul
            # block-diagonal ones: (row of exps) @ same = every column's group sum, in one GEMM
            self.same = torch.zeros((self.gk, self.gk), dtype=rx.mean.dtype, device=dev)
            for st, n, w in self.buckets:
                for g in range(n):
                    a = st + g * w
                    self.same[a:a + w, a:a + w] = 1.0
        if self.nc:
            cc = self.perm[self.gk:self.gk + self.nc]
            self.lo, self.span = rx.lo[cc], rx.hi[cc] - rx.lo[cc]

    def _group_softmax(self, raw: Tensor) -> Tensor:
        """Softmax within every group: exp(raw − row max) normalised by group sums (one GEMM); if
        a whole group underflows (it lies ≳ 69 below the row's max), the exact per-group softmax."""
        e = (raw - raw.amax(-1, keepdim=True)).exp_()
        tot = e @ self.same
        if bool(tot.amin() < 1e-30):
            return torch.cat([raw[..., st:st + n * w].unflatten(-1, (n, w)).softmax(-1).flatten(-2)
                              for st, n, w in self.buckets], -1)
        return e.div_(tot)

    def to_layout(self, x: Tensor) -> Tensor:
        return x.index_select(-1, self.perm)

    def from_layout(self, x: Tensor) -> Tensor:
        return x.index_select(-1, self.inv)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[Tensor | None, Tensor | None]]:
        """Relaxed copy of ``x`` [..., d] (layout) and what :meth:`backward` needs."""
        sm = sg = None
        gk, nc = self.gk, self.nc
        out = torch.empty_like(x)  # every piece is written into its slice (no concatenation pass)
        if gk:
            raw = torch.addcmul(self.m_cat, x[..., :gk], self.s_cat)
            if self.tau != 1.0:
                raw = raw.div_(self.tau)
            sm = self._group_softmax(raw)
            torch.addcmul(self.neg_ms, sm, self.inv_s, out=out[..., :gk])
        if nc:
            xc = x[..., gk:gk + nc]
            sg = torch.sigmoid(xc / self.temp if self.temp != 1.0 else xc)
            torch.addcmul(self.lo, sg, self.span, out=out[..., gk:gk + nc])
        if gk + nc < x.shape[-1]:
            out[..., gk + nc:] = x[..., gk + nc:]
        return out, (sm, sg)

    def backward(self, out_bar: Tensor, saved: tuple[Tensor | None, Tensor | None]) -> Tensor:
        """∂/∂x given ∂/∂(relaxed x) (in place on ``out_bar``)."""
        sm, sg = saved
        gk, nc = self.gk, self.nc
        if gk:
            prod = torch.mul(sm, out_bar[..., :gk]).mul_(self.inv_s)
            prod = prod.sub_(sm * (prod @ self.same))  # softmax Jacobian, group sums by one GEMM
            if self.tau != 1.0:
                prod = prod / self.tau
            out_bar[..., :gk] = prod.mul_(self.s_cat)
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

    def set_first_layer(self, w: Tensor, t: Tensor) -> None:
        """Replace the first layer's weight and observed gradient (the relaxation's column layout)."""
        self.w[0], self.tw[0] = w.contiguous(), t.contiguous()
        self._wt = self._wtt = None

    def _stacked(self) -> list[Tensor]:
        if getattr(self, "_wt", None) is None:  # [W_i; T_i]: forward and ⟨·, T_i⟩ in one GEMM
            self._wt = [torch.cat([w, t]).t().contiguous() for w, t in zip(self.w, self.tw)]
        return self._wt

    def _stacked_rows(self) -> list[Tensor]:
        if getattr(self, "_wtt", None) is None:
            self._wtt = [torch.cat([w, t]).contiguous() for w, t in zip(self.w, self.tw)]
        return self._wtt

    def __call__(self, x: Tensor, onehot: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` [E, B, d] relaxed candidates, ``onehot`` [E, B, C] labels -> (distance [E], ∂/∂x [E, B, d]).

        The per-member weight gradients gW_i = dz_iᵀ a_i are never formed: with Gram matrices
        A_i = a_i a_iᵀ, D_i = dz_i dz_iᵀ ([B, B]) and a_i T_iᵀ (one shared GEMM with the forward),
        ⟨gW_i, T_i⟩ = Σ dz_i ⊙ a_i T_iᵀ, ‖gW_i‖² = Σ A_i ⊙ D_i, and for ∂L/∂gW_i = α T_i + c gW_i:
        ∂/∂dz_i = α a_i T_iᵀ + c A_i dz_i, ∂/∂a_i = α dz_i T_i + c D_i a_i."""
        e, b, _ = x.shape
        n = len(self.w)
        s = 1.0 / b if self.reduction == "mean" else 1.0
        wt = self._stacked()
        # forward (shared weights: one GEMM over all members' rows, also giving a_i T_iᵀ)
        acts, masks, at = [x], [], []
        h = x.reshape(e * b, -1)
        for i in range(n):
            k = self.w[i].shape[0]
            zt = h @ wt[i]
            at.append(zt[:, k:].view(e, b, k))
            z = zt[:, :k].add_(self.b[i])
            if i < n - 1:
                h = z.clamp_min(0)  # relu
                m = torch.sign(h)  # its derivative as a float mask (1 where z > 0)
                masks.append(m)
                acts.append(h.view(e, b, -1))
            else:
                logits = z
        p = logits.softmax(-1)
        # backward: the per-row output gradients dz_i and the bias gradients
        dz = [None] * n
        dz[n - 1] = (p.view(e, b, -1) - onehot).mul_(s)
        for i in range(n - 1, 0, -1):
            dz[i - 1] = (dz[i].reshape(e * b, -1) @ self.w[i]).mul_(masks[i - 1]).view(e, b, -1)
        gb = [d.sum(1) for d in dz]
        ga = [torch.bmm(a, a.transpose(1, 2)) for a in acts]  # A_i
        gd = [torch.bmm(d, d.transpose(1, 2)) for d in dz]  # D_i
        dots = [(d * t).sum((1, 2)) + g @ tb for d, t, g, tb in zip(dz, at, gb, self.tb)]  # ⟨g_i, t_i⟩
        pns = [(A * D).sum((1, 2)) + (g * g).sum(1) for A, D, g in zip(ga, gd, gb)]  # ‖g_i‖²
        if self.loss == "cosine":
            dot, pn = sum(dots), sum(pns)
            gn = pn.sqrt()
            den = gn * self.tnorm + 1e-12
            dist = 1.0 - dot / den
            alpha = [-1.0 / den] * n  # ∂L/∂g = α·t + c·g
            coef = [dot * self.tnorm / (den * den * gn.clamp(min=1e-30))] * n
        else:  # TabLeak's l2: Σ_l mean((g_l − t_l)²), weight and bias tensors separately
            tw2 = [t.pow(2).sum() for t in self.tw]
            tb2 = [t.pow(2).sum() for t in self.tb]
            dist = 0.0
            alpha, coef = [], []
            for i in range(n):  # the weight term; the bias term is added below
                nw, nb = self.numel_w[i], self.tb[i].numel()
                dw = dots[i] - gb[i] @ self.tb[i]
                pw = pns[i] - (gb[i] * gb[i]).sum(1)
                dist = dist + (pw - 2 * dw + tw2[i]) / nw + ((gb[i] - self.tb[i]).pow(2).sum(1)) / nb
                alpha.append(torch.full((e,), -2.0 / nw, dtype=x.dtype, device=x.device))
                coef.append(torch.full((e,), 2.0 / nw, dtype=x.dtype, device=x.device))
        # double backward by hand
        dz_bar, a_gd = [], []
        for i in range(n):
            al, c = alpha[i].view(e, 1, 1), coef[i].view(e, 1, 1)
            if self.loss == "cosine":
                gb_bar = alpha[i].view(e, 1) * self.tb[i] + coef[i].view(e, 1) * gb[i]
            else:
                gb_bar = (gb[i] - self.tb[i]) * (2.0 / self.tb[i].numel())
            dz_bar.append(torch.addcmul(gb_bar.unsqueeze(1), at[i], al).baddbmm_(ga[i].mul_(c), dz[i]))
            a_gd.append(gd[i].mul_(c))
        for i in range(n - 1):  # dz_i = (dz_{i+1} W_{i+1}) ⊙ mask_i
            da = dz_bar[i].view(e * b, -1).mul_(masks[i])
            dz_bar[i + 1].view(e * b, -1).addmm_(da, self.w[i + 1].t())
        pb = dz_bar[n - 1].view(e * b, -1).mul_(s)  # dz_n = s (p − y)
        z_bar = p * (pb - (p * pb).sum(-1, keepdim=True))
        wtt = self._stacked_rows()
        for i in range(n - 1, -1, -1):  # z_i = a_i W_iᵀ + b_i and gW_i = dz_iᵀ a_i: one GEMM on [z̄ | α dz]
            k = self.w[i].shape[0]
            lhs = torch.empty((e * b, 2 * k), dtype=x.dtype, device=x.device)
            lhs[:, :k] = z_bar
            torch.mul(dz[i], alpha[i].view(e, 1, 1), out=lhs[:, k:].view(e, b, k))
            ab = (lhs @ wtt[i]).view(e, b, -1).baddbmm_(a_gd[i], acts[i])
            if i > 0:
                z_bar = ab.view(e * b, -1).mul_(masks[i - 1])
        return dist, ab


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
            _, xr_bar = obj(xr, onehot)
            return relax.backward(xr_bar, saved)

        x = run_adam(step_grad, relax.to_layout(x0), lr=self.cfg.lr, iterations=iterations, signed=self.cfg.sign)
        return relax.from_layout(x)

    def losses(self, x: Tensor, ys: Tensor) -> Tensor:
        """Distance per member of the candidates ``x`` [E, B, d] taken as they are (no relaxation)."""
        with torch.no_grad():
            return self.obj(self.relax.to_layout(x), self._onehot(ys, x))[0]


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
