"""Closed-form gradients of a fully connected ReLU network under softmax cross-entropy.

TabLeak's networks (``FullyConnected``: Linear-ReLU-...-Linear) are small, so the generic path
(``torch.func.vmap`` of ``torch.func.grad`` through ``functional_call``) spends most of its time
in per-op overhead. Here the backward pass is written out as batched matmuls over any leading
dimensions (ensemble members, per-epoch copies), so the gradient is an ordinary differentiable
function of the inputs: one autograd pass through it equals the generic double backward
(``tests/tableak/test_fcgrad.py`` checks values and input gradients against it). ReLU's second
derivative is zero almost everywhere, so the mask ``z > 0`` is treated as a constant, exactly as
autograd does.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def fc_gradients(weights: Sequence[Tensor], biases: Sequence[Tensor], x: Tensor, y: Tensor, *,
                 mean: bool = True) -> list[Tensor]:
    """Gradients ``[dW_0, db_0, dW_1, db_1, ...]`` of ``CE(f(x), y)`` (mean or sum over the batch).

    ``x``: ``[..., B, d]``; ``y``: ``[..., B]`` class indices; ``weights[i]``: ``[out, in]`` or
    ``[..., out, in]`` (per-member weights, e.g. during simulated local training); biases likewise.
    Every returned tensor keeps the leading dimensions of ``x``."""
    hs = [x]
    zs = []
    h = x
    last = len(weights) - 1
    for i, (w, b) in enumerate(zip(weights, biases)):
        z = h @ w.transpose(-1, -2) + b.unsqueeze(-2)
        zs.append(z)
        h = torch.relu(z) if i < last else z
        hs.append(h)
    p = torch.softmax(zs[-1], -1)
    dz = p - torch.nn.functional.one_hot(y, p.shape[-1]).to(p.dtype)
    if mean:
        dz = dz / x.shape[-2]
    out: list[Tensor] = [None] * (2 * len(weights))  # type: ignore[list-item]
    for i in range(last, -1, -1):
        out[2 * i] = dz.transpose(-1, -2) @ hs[i]
        out[2 * i + 1] = dz.sum(-2)
        if i > 0:
            dz = (dz @ weights[i]) * (zs[i - 1] > 0).to(dz.dtype)
    return out


def batched_cosine(pred: Sequence[Tensor], target: Sequence[Tensor], lead: int) -> Tensor:
    """``1 − ⟨g, g*⟩ / (‖g‖‖g*‖)`` over all tensors concatenated, one value per leading index
    (``lead`` leading dimensions are kept)."""
    dot = sum((p * t).flatten(lead).sum(-1) for p, t in zip(pred, target))
    pn = sum(p.pow(2).flatten(lead).sum(-1) for p in pred)
    tn = sum(t.pow(2).sum() for t in target)
    return 1.0 - dot / (pn.sqrt() * tn.sqrt() + 1e-12)


def batched_l2(pred: Sequence[Tensor], target: Sequence[Tensor], lead: int) -> Tensor:
    """Σ over tensors of the mean squared difference, one value per leading index."""
    return sum((p - t).pow(2).flatten(lead).mean(-1) for p, t in zip(pred, target))
