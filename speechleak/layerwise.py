"""Layer-wise inversion of a FedSGD update (issue 21): each layer's input from its own weight gradient.

For a linear layer y = W h + b applied to rows h_t (frames) the weight gradient is G = Σ_t e_t h_tᵀ with
e_t = ∂loss/∂y_t: linear in the inputs once the output errors are fixed, so the inputs follow by least
squares (``linear_input_solve``). The same holds for a 1-D convolution with the patches of its input in
place of h_t (``conv_input_solve``; the first-layer case is ``speechleak.ctc.first_layer_refine``). Going
down the network, the output error of each layer is computed from the states above it, and the states
from the layer's input solve, so a known output error (softmax − CTC occupancy at the head) would give
every hidden state and finally the mel frames. ``layer_io`` records (input, output error) of every
Linear/Conv1d layer of a model at given features; ``determinacy`` tells, per layer, whether its input is
determined by its weight gradient at all (rows of the input vs the rank its output error can have).

Measured on development clips (``bench/speech_ctc_layerwise.py``, seed 0, trials 0-2 of speech/ctc-mel/fedsgd):
with the clip's own output errors the determined layers' inputs come back exactly (ff1, conv2: cosine 1.000;
qkv 0.9996+; conv1 with the silence held 0.993-1.000), but the solves are ill-conditioned: the output errors
taken at a ``speech-ctc-tts`` result (head 0.995-0.999, conv2 0.88-0.96 cosine) give the result's own states
back (no layer moves by more than +0.005), and the error has to be within cosine ~0.999 (ff1) / ~0.997 (conv2)
of the clip's before a solve beats the result. The result is a self-consistent near-solution, so the solves
are a diagnostic and an oracle tool here; no preset uses them. (Our construction for issue 21; a linear
layer's input from its weight gradient is the observation behind Geiping et al. 2020's analytic recovery
and DAGER's span check, Petrov et al. 2024.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .ctc import patch_operator

__all__ = ["LayerIO", "LayerRank", "conv_input_solve", "determinacy", "layer_io", "linear_input_solve"]


@dataclass(frozen=True)
class LayerIO:
    """One layer at given features: its input ([R, I] rows for Linear, [B, C, T] for Conv1d), its output
    error ∂loss/∂output (same layout as the output) and the weight gradient they give."""
    name: str
    module: nn.Module
    inputs: Tensor
    out_error: Tensor

    def weight_grad(self) -> Tensor:
        if isinstance(self.module, nn.Conv1d):
            return torch.autograd.grad((self.module(self.inputs) * self.out_error).sum(), self.module.weight)[0]
        return self.out_error.T @ self.inputs


def layer_io(model: nn.Module, loss_of, feats: Tensor) -> dict[str, LayerIO]:
    """(input, output error) of every nn.Linear / nn.Conv1d of ``model`` at feats: ``loss_of(feats)`` must
    run ``model`` once and return the scalar loss whose parameter gradient the client sent. Linear inputs
    and errors are flattened to rows [B·T, width]."""
    box: dict[str, tuple[nn.Module, Tensor, Tensor]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv1d)):
            hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: box.__setitem__(n, (m, i[0], o))))
    try:
        loss = loss_of(feats.detach())
    finally:
        for h in hooks:
            h.remove()
    names = list(box)
    errs = torch.autograd.grad(loss, [box[n][2] for n in names], allow_unused=True)
    out = {}
    for n, e in zip(names, errs):
        mod, inp, o = box[n]
        e = torch.zeros_like(o) if e is None else e
        if isinstance(mod, nn.Linear):
            inp, e = inp.reshape(-1, inp.shape[-1]), e.reshape(-1, e.shape[-1])
        out[n] = LayerIO(n, mod, inp.detach(), e.detach())
    return out


def _ridge_solve(a: Tensor, rhs: Tensor, prior: Tensor, ridge: float) -> Tensor:
    """argmin_X ||a X − rhs||² + ridge·mean(diag aᵀa)·||X − prior||² (a [M, N], rhs [M, K], prior [N, K])."""
    gram = a.T @ a
    lam = ridge * gram.diagonal().mean().clamp(min=1e-300)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + lam * eye, a.T @ rhs + lam * prior)


def linear_input_solve(out_error: Tensor, weight_grad: Tensor, prior: Tensor, *, ridge: float) -> Tensor:
    """Rows h [R, I] of a linear layer's input from its weight gradient G = Σ_r e_r h_rᵀ [O, I] and its output
    errors e [R, O], damped towards ``prior`` [R, I] (ridge relative to the mean diagonal of the Gram). Unique
    when rank(e) = R, i.e. at least as many output units as rows; rows with equal errors (silent frames) are
    only determined in their sum."""
    if ridge <= 0:
        raise ValueError(f"ridge must be > 0, got {ridge}")
    if out_error.shape[0] != prior.shape[0] or weight_grad.shape != (out_error.shape[1], prior.shape[1]):
        raise ValueError(f"shapes do not fit: error {tuple(out_error.shape)}, gradient {tuple(weight_grad.shape)}, "
                         f"prior {tuple(prior.shape)}")
    return _ridge_solve(out_error.T, weight_grad.to(prior.dtype), prior, ridge)


def conv_input_solve(conv: nn.Conv1d, out_error: Tensor, weight_grad: Tensor, prior: Tensor, *, ridge: float,
                     keep: Tensor | None = None) -> Tensor:
    """Input x [B, C, T] of a 1-D convolution from its weight gradient [O, C, k] and output errors δ [B, O, T']:
    G = Σ_b Σ_t δ_{b,t} ⊗ patch_t(x_b), the same linear map (``patch_operator``) for every input channel, damped
    towards ``prior`` [B, C, T]. Frames where ``keep`` [B, T] is True are held at the prior (e.g. silence)."""
    if ridge <= 0:
        raise ValueError(f"ridge must be > 0, got {ridge}")
    if conv.dilation[0] != 1 or conv.groups != 1 or not isinstance(conv.padding[0], int):
        raise ValueError("conv_input_solve handles plain Conv1d layers (dilation 1, groups 1, integer padding)")
    b, c, t = prior.shape
    k, s, p = conv.kernel_size[0], conv.stride[0], int(conv.padding[0])
    a = torch.cat([patch_operator(out_error[i].to(prior.dtype), t, kernel=k, stride=s, padding=p) for i in range(b)], 1)
    free = torch.ones(b * t, dtype=torch.bool, device=prior.device) if keep is None else ~keep.flatten()
    xf = prior.permute(1, 0, 2).reshape(c, b * t)
    g = weight_grad.to(prior.dtype).permute(0, 2, 1).reshape(-1, c)  # [(o, k), C]
    rhs = g - a[:, ~free] @ xf[:, ~free].T
    sol = _ridge_solve(a[:, free], rhs, xf[:, free].T, ridge)
    xf = xf.clone()
    xf[:, free] = sol.T
    return xf.reshape(c, b, t).permute(1, 0, 2)


@dataclass(frozen=True)
class LayerRank:
    """Whether a layer's input can be determined by its weight gradient given the output error. ``rows``: the
    unknown input rows (frames x batch; for a conv, input frames x batch per channel); ``width``: equations per
    input column (output units; output channels x kernel for a conv); ``error_rank``: the numerical rank of the
    output error (of the patch operator for a conv) at the given features. ``determined`` is the structural
    condition width >= rows; rows with equal errors (silent frames: same state, same error) are then determined
    in their sum only, which ``error_rank`` < rows shows."""
    name: str
    rows: int
    width: int
    error_rank: int

    @property
    def determined(self) -> bool:
        return self.width >= self.rows


def determinacy(io: dict[str, LayerIO]) -> list[LayerRank]:
    """:class:`LayerRank` of every layer of ``layer_io``'s result, in forward order."""
    out = []
    for n, lio in io.items():
        if isinstance(lio.module, nn.Conv1d):
            b, c, t = lio.inputs.shape
            mod = lio.module
            a = torch.cat([patch_operator(lio.out_error[i].double(), t, kernel=mod.kernel_size[0], stride=mod.stride[0],
                                          padding=int(mod.padding[0])) for i in range(b)], 1)
            out.append(LayerRank(n, b * t, a.shape[0], int(torch.linalg.matrix_rank(a))))
        else:
            e = lio.out_error.double()
            out.append(LayerRank(n, e.shape[0], e.shape[1], int(torch.linalg.matrix_rank(e))))
    return out
