"""Log-space CTC in plain autograd (double-backward capable).

``torch.nn.functional.ctc_loss`` has no double backward (``derivative for
_ctc_loss_backward is not implemented``), so gradient matching cannot differentiate
through it. This is the forward (alpha) recursion of Graves et al. 2006 in log space, one
vectorised step per frame; it returns the same per-utterance negative log-likelihood as
``ctc_loss(..., reduction="none")`` and works under ``torch.func.grad``/``vmap``.

``ctc_nll_fast`` (what the kit's loss uses) gives the same value and first derivative from
ATen's native CTC (the occupancies γ = −∂nll/∂lp) and the second derivative, which gradient
matching needs, as a float64 central difference of two more native calls (a Hessian-vector
product): 4-6x cheaper per matching step than the Python recursion (bench/speech_ctc_profile.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

NEG = -1e5  # finite "log zero": keeps logsumexp gradients NaN-free


def _lse(stacked: Tensor) -> Tensor:
    """logsumexp over dim 0 from elementary ops (a detached max shift), so that every
    derivative order is finite; torch.logsumexp's double backward gives NaN here."""
    m = stacked.max(dim=0).values.detach()
    return m + torch.log(torch.exp(stacked - m.unsqueeze(0)).sum(0))


def ctc_nll(log_probs: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor,
            *, blank: int = 0) -> Tensor:
    """Per-utterance CTC negative log-likelihood.

    log_probs [B, T, V] (log-softmax over V, batch first); targets [B, S] (padded);
    input_lengths [B]; target_lengths [B]. Returns [B]. Unreachable alignments (T too short)
    give a huge value (about 1e5) instead of inf.
    """
    if log_probs.dim() != 3:
        raise ValueError(f"log_probs must be [B, T, V], got shape {tuple(log_probs.shape)}")
    b, t_max, _ = log_probs.shape
    s = targets.shape[1]
    L = 2 * s + 1
    ext = torch.full((b, L), blank, dtype=torch.long, device=log_probs.device)
    ext[:, 1::2] = targets.long()
    lp = torch.gather(log_probs, 2, ext.unsqueeze(1).expand(b, t_max, L))  # [B, T, L]
    prev2 = torch.cat([torch.full_like(ext[:, :2], -1), ext[:, :-2]], dim=1)
    skip_ok = (ext != blank) & (ext != prev2)
    pos = torch.arange(L, device=log_probs.device)
    neg = torch.full_like(lp[:, 0], NEG)
    alpha = torch.where(pos.unsqueeze(0) < 2, lp[:, 0], neg)
    alpha = torch.where((pos.unsqueeze(0) == 1) & (target_lengths.unsqueeze(1) == 0), neg, alpha)
    pad1 = torch.full_like(alpha[:, :1], NEG)
    pad2 = torch.full_like(alpha[:, :2], NEG)
    in_len = input_lengths.to(log_probs.device).unsqueeze(1)
    for t in range(1, t_max):
        a1 = torch.cat([pad1, alpha[:, :-1]], dim=1)
        a2 = torch.cat([pad2, alpha[:, :-2]], dim=1)
        a2 = torch.where(skip_ok, a2, neg)
        new = _lse(torch.stack([alpha, a1, a2])) + lp[:, t]
        alpha = torch.where(in_len > t, new, alpha)
    tl = target_lengths.to(log_probs.device).long()
    last = torch.gather(alpha, 1, (2 * tl).unsqueeze(1)).squeeze(1)
    before = torch.gather(alpha, 1, (2 * tl - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    before = torch.where(tl > 0, before, torch.full_like(before, NEG))
    return -_lse(torch.stack([last, before]))


# -- fast CTC: native forward-backward + a finite-difference Hessian-vector product ------------
#: relative step of the central difference in :class:`_CTCGrad` (float64: truncation ~h², round-off ~1e-16/h)
FD_STEP = 1e-5


def _occupancy(lp: Tensor, targets: Tensor, in_len: Tensor, tg_len: Tensor, blank: int) -> tuple[Tensor, Tensor]:
    """(nll [B], γ [B, T, V]) from ATen's native CTC in float64. γ_tc is the posterior occupancy of
    symbol c at frame t (∂nll/∂lp = −γ for *any* scores lp, normalised or not); ATen's backward
    returns exp(lp) − γ (the gradient w.r.t. logits through a log-softmax), hence the subtraction."""
    lpt = lp.detach().double().transpose(0, 1).contiguous()
    il, tl = [int(v) for v in in_len.tolist()], [int(v) for v in tg_len.tolist()]
    tg = targets.detach().long().cpu() if lpt.device.type == "cpu" else targets.detach().long()
    nll, log_alpha = torch.ops.aten._ctc_loss(lpt, tg, il, tl, blank, False)
    grad = torch.ops.aten._ctc_loss_backward(torch.ones_like(nll), lpt, tg, il, tl, nll, log_alpha, blank, False)
    gamma = (lpt.exp() - grad).transpose(0, 1)
    t = torch.arange(lp.shape[1], device=lp.device)
    mask = (t.unsqueeze(0) < in_len.to(lp.device).unsqueeze(1)).unsqueeze(-1)
    gamma = torch.where(mask, gamma, torch.zeros_like(gamma))
    ok = torch.isfinite(nll)  # unreachable (transcript longer than the frames allow): ~1e5 as ctc_nll, γ = 0
    gamma = torch.where(ok.view(-1, 1, 1), torch.nan_to_num(gamma), torch.zeros_like(gamma))
    nll = torch.where(ok, nll, torch.full_like(nll, -NEG))
    return nll, gamma


class _CTCGrad(torch.autograd.Function):
    """lp -> ∂nll/∂lp = −γ(lp); its backward is the Hessian-vector product H v (H symmetric),
    taken as the central difference −(γ(lp + εv) − γ(lp − εv)) / 2ε of two native CTC calls."""

    @staticmethod
    def forward(lp, neg_gamma, targets, in_len, tg_len, blank):  # noqa: D401  (neg_gamma: −γ(lp), precomputed)
        return neg_gamma.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        lp, _, targets, in_len, tg_len, blank = inputs
        ctx.save_for_backward(lp, targets, in_len, tg_len)
        ctx.blank = blank

    @staticmethod
    def backward(ctx, v):
        lp, targets, in_len, tg_len = ctx.saved_tensors
        v64 = v.detach().double()
        scale = float(v64.abs().max())
        if scale == 0.0:
            return torch.zeros_like(lp), None, None, None, None, None
        eps = FD_STEP / scale
        lp64 = lp.detach().double()
        _, gp = _occupancy(lp64 + eps * v64, targets, in_len, tg_len, ctx.blank)
        _, gm = _occupancy(lp64 - eps * v64, targets, in_len, tg_len, ctx.blank)
        return (-(gp - gm) / (2 * eps)).to(lp.dtype), None, None, None, None, None


class _CTCNLL(torch.autograd.Function):
    """Per-utterance CTC nll with the native forward-backward; differentiable twice (first
    derivative −γ exact, second through :class:`_CTCGrad`)."""

    @staticmethod
    def forward(lp, targets, in_len, tg_len, blank):
        nll, gamma = _occupancy(lp, targets, in_len, tg_len, blank)
        return nll.to(lp.dtype), (-gamma).to(lp.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        lp, targets, in_len, tg_len, blank = inputs
        ctx.save_for_backward(lp, output[1], targets, in_len, tg_len)
        ctx.blank = blank
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, g_nll, _):
        lp, neg_gamma, targets, in_len, tg_len = ctx.saved_tensors
        d = _CTCGrad.apply(lp, neg_gamma, targets, in_len, tg_len, ctx.blank)
        return g_nll.view(-1, 1, 1) * d, None, None, None, None


def ctc_nll_fast(log_probs: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor,
                 *, blank: int = 0) -> Tensor:
    """:func:`ctc_nll` through ATen's native CTC (one C++ forward-backward per call instead of a
    Python loop over frames). First derivative exact; the second (needed by gradient matching)
    by a float64 central difference of the native occupancies (relative error ~1e-10). Works
    under ``torch.func.grad`` and nested autograd; not under ``vmap`` (use :func:`ctc_nll`)."""
    if log_probs.dim() != 3:
        raise ValueError(f"log_probs must be [B, T, V], got shape {tuple(log_probs.shape)}")
    return _CTCNLL.apply(log_probs, targets, input_lengths, target_lengths, blank)[0]


# -- transcript-granted initialisation: a public TTS rendering of the transcript, time-warped ------
#: softplus(_UNIT) = 1: a zero warp increment means uniform speed
_UNIT = 0.5413248546129181


def tts_features(text: str, voice: str, frontend, *, floor: float, margin: float = 0.15) -> Tensor:
    """The attacker's own rendering of a granted transcript: ``voice`` ("engine:name", e.g.
    "espeak-ng:en-us") synthesises ``text``, the front end maps it to features [F, L], and the frames
    whose mean lies within ``margin`` of ``floor`` (silence) at either end are dropped."""
    from .data import Voice, read_wav, synthesize, trim_and_fit

    engine, _, name = voice.partition(":")
    if not engine or not name:
        raise ValueError(f"init voice {voice!r}: use 'engine:name', e.g. 'espeak-ng:en-us' or 'flite:rms'")
    wave = trim_and_fit(read_wav(synthesize(text or " ", Voice(engine, name))), None)
    with torch.no_grad():
        m = frontend(wave.unsqueeze(0).to(next(iter(frontend.buffers()), wave).device))[0]
    loud = ((m - floor).mean(0) > margin).nonzero().flatten()
    return m[:, int(loud[0]): int(loud[-1]) + 1] if len(loud) > 1 else m


class BlockWarp(torch.nn.Module):
    """A template [F, L] placed as a speech block in silence over ``n_frames`` frames: block centre
    (offset from the clip's centre, frames), log block width, a monotone piecewise-linear time warp
    with ``knots`` segments (softplus increments; zero = uniform speed) and a per-band offset. Few
    parameters, so gradient matching can align the template before the frame-wise search."""

    def __init__(self, template: Tensor, n_frames: int, *, width: float, floor: float, knots: int = 8) -> None:
        super().__init__()
        if template.dim() != 2 or template.shape[1] < 2:
            raise ValueError(f"template must be [F, L] with L >= 2, got {tuple(template.shape)}")
        dt = template.dtype
        self.register_buffer("template", template)
        self.n_frames, self.floor, self.knots = n_frames, floor, knots
        self.centre = torch.nn.Parameter(torch.zeros((), dtype=dt))
        self.log_width = torch.nn.Parameter(torch.tensor(float(max(width, 2.0)), dtype=dt).log())
        self.increments = torch.nn.Parameter(torch.zeros(knots, dtype=dt))
        self.offset = torch.nn.Parameter(torch.zeros(template.shape[0], 1, dtype=dt))

    def forward(self) -> Tensor:
        m, t_len, k = self.template, self.template.shape[1], self.knots
        width = self.log_width.exp()
        start = (self.n_frames - width) / 2 + self.centre
        cum = torch.cat([torch.zeros_like(self.increments[:1]), torch.nn.functional.softplus(self.increments + _UNIT).cumsum(0)])
        cum = cum / cum[-1]
        tt = torch.arange(self.n_frames, dtype=m.dtype, device=m.device)
        s = ((tt - start) / width).clamp(0, 1) * k  # position in the block, in warp segments
        i0 = s.detach().floor().clamp(max=k - 1).long()
        u = torch.lerp(cum[i0], cum[i0 + 1], s - i0)  # warped position in [0, 1]
        pos = u * (t_len - 1)
        j0 = pos.detach().floor().clamp(max=t_len - 2).long()
        val = torch.lerp(m[:, j0], m[:, j0 + 1], (pos - j0).unsqueeze(0)) + self.offset
        edge = torch.sigmoid(2 * (tt - start)) * torch.sigmoid(2 * (start + width - tt))  # soft block edges
        sil = self.floor + 0.02
        return sil + edge * (val - sil)


def grid_align(warps: list[BlockWarp], objective, *, points: int, centres: int = 5,
               width_range: tuple[float, float] = (0.6, 1.4), centre_fraction: float = 0.05) -> float:
    """Set every warp's block width and centre to the best point of a grid of ``points`` widths
    (``width_range`` times each warp's current width) x ``centres`` centres (within ±``centre_fraction``
    of the clip), the same factors for all warps of a batch, by the value of ``objective()``; returns it.
    The matching objective is rugged in these two parameters, so L-BFGS alone stalls off the true timing."""
    if points < 1:
        raise ValueError(f"grid points must be >= 1, got {points}")
    widths0 = [float(w.log_width.detach().exp()) for w in warps]
    factors = torch.linspace(*width_range, points).tolist() if points > 1 else [1.0]
    spans = [centre_fraction * w.n_frames for w in warps]

    def put(f: float, c: float) -> None:
        for w, w0, span in zip(warps, widths0, spans):
            w.log_width.fill_(float(torch.tensor(min(f * w0, float(w.n_frames))).log()))
            w.centre.fill_(c * span)

    best = (float("inf"), 1.0, 0.0)
    with torch.no_grad():
        for f in factors:
            for c in (torch.linspace(-1.0, 1.0, centres).tolist() if centres > 1 else [0.0]):
                put(f, c)
                score = float(objective())
                if score < best[0]:
                    best = (score, f, c)
        put(best[1], best[2])
    return best[0]


# -- first-layer refinement: the input solved from the first convolution's weight gradient ----------
def speech_block(feats: Tensor, floor: float, *, margin: float = 0.05) -> tuple[int, int]:
    """(first, last) frame of feats [F, T] whose band mean lies more than ``margin`` above ``floor``
    (the whole clip when none does)."""
    loud = ((feats - floor).mean(0) > margin).nonzero().flatten()
    return (int(loud[0]), int(loud[-1])) if len(loud) else (0, feats.shape[-1] - 1)


def output_error(layer: torch.nn.Module, loss_of, x: Tensor) -> Tensor:
    """∂loss_of(x)/∂(layer's output) at x (the loss's parameters may be detached: x carries the graph)."""
    box: dict[str, Tensor] = {}
    hook = layer.register_forward_hook(lambda m, i, o: box.__setitem__("z", o))
    try:
        loss = loss_of(x.detach().requires_grad_(True))
    finally:
        hook.remove()
    return torch.autograd.grad(loss, box["z"])[0]


def patch_operator(delta: Tensor, n_frames: int, *, kernel: int, stride: int, padding: int) -> Tensor:
    """A [(o, k), T] with A @ x_f = (Σ_t δ_{o,t} x_f[stride·t + k − padding])_{o,k}: the first 1-D
    convolution's weight gradient for one input band x_f [T], given its output error δ [O, T']."""
    o, t_out = delta.shape
    a = torch.zeros(o, kernel, n_frames + 2 * padding + kernel, dtype=delta.dtype, device=delta.device)
    idx = stride * torch.arange(t_out, device=delta.device)
    for k in range(kernel):
        a[:, k].index_add_(1, idx + k, delta)
    return a[:, :, padding: padding + n_frames].reshape(o * kernel, n_frames)


def first_layer_refine(error_fn, feats: Tensor, weight_grad: Tensor, *, kernel: int, stride: int, padding: int,
                       blocks: list[tuple[int, int]], floor: float, upper: float | None, steps: int,
                       ridge: float) -> Tensor:
    """Fixed-point refinement of feats [B, F, T] from the first convolution's observed weight gradient
    [O, F, k] (our addition, issue 21). That gradient is Σ_b Σ_t δ_{b,t} ⊗ patch_t(x_b): linear in the
    input once the convolution's output error δ (``error_fn(feats)`` -> [B, O, T']) is fixed, and the same
    linear map for every mel band. Each step takes δ at the current estimate and solves, in closed form,
    min_x ||A(δ) x − G||² + ridge·mean(diag AᵀA)·||x − x_k||² for the frames inside ``blocks`` (one
    (first, last) per utterance), every other frame held at the silence ``floor`` (which makes the
    system overdetermined). With the true δ this returns the clip (cosine > 0.999); with δ from a
    gradient-matching result it moves the speech frames towards the clip (bench/speech_ctc_fixedpoint.py)."""
    if steps < 0 or ridge <= 0:
        raise ValueError(f"first-layer refinement needs steps >= 0 and ridge > 0, got {steps}, {ridge}")
    b, f, t = feats.shape
    if len(blocks) != b:
        raise ValueError(f"one speech block per utterance: {len(blocks)} blocks for {b} utterances")
    mask = torch.zeros(b, t, dtype=torch.bool, device=feats.device)
    for i, (lo, hi) in enumerate(blocks):
        mask[i, max(0, lo): min(t, hi + 1)] = True
    m = mask.flatten()
    g = weight_grad.detach().permute(0, 2, 1).reshape(-1, f).to(feats.dtype)  # [(o, k), F]
    x = torch.where(mask.unsqueeze(1), feats.detach(), torch.full_like(feats, floor))
    for _ in range(steps):
        delta = error_fn(x).detach()
        a = torch.cat([patch_operator(delta[i], t, kernel=kernel, stride=stride, padding=padding) for i in range(b)], 1)
        xf = x.permute(1, 0, 2).reshape(f, b * t)
        a_s = a[:, m]
        rhs = g - a[:, ~m] @ xf[:, ~m].T
        gram = a_s.T @ a_s
        lam = ridge * gram.diagonal().mean().clamp(min=1e-300)
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        sol = torch.linalg.solve(gram + lam * eye, a_s.T @ rhs + lam * xf[:, m].T)
        xf = xf.clone()
        xf[:, m] = sol.T
        x = xf.reshape(f, b, t).permute(1, 0, 2).clamp(min=floor, max=upper)
    return x


# -- output shrinkage: a Gaussian blur over time of the recovered features ---------------------------
def time_blur(feats: Tensor, sigma: float) -> Tensor:
    """feats [..., F, T] convolved over time with a normalised Gaussian of ``sigma`` frames (±3σ support, edge
    frames replicated); ``sigma`` <= 0 returns feats unchanged. Used after the search as a shrinkage (issue 21):
    the update leaves the timing of the speech frames uncertain by several frames (bench/speech_ctc_diagnose.py),
    so averaging the estimate over a time jitter of that size lowers its error."""
    if sigma <= 0:
        return feats
    half = max(1, int(3 * sigma))
    t = torch.arange(-half, half + 1, dtype=feats.dtype, device=feats.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, -1)
    shape = feats.shape
    x = feats.reshape(-1, 1, shape[-1])
    x = torch.nn.functional.pad(x, (half, half), mode="replicate") if shape[-1] > 1 else x.expand(-1, -1, 2 * half + 1)
    return torch.nn.functional.conv1d(x, k).reshape(shape)
