"""Gradient-matching distances over name-keyed tensor dicts, shared by every modality."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor


def _keys(target: Mapping[str, Tensor], names: Sequence[str] | None) -> list[str]:
    return list(names) if names is not None else list(target)


def l2_distance(pred: Mapping[str, Tensor], target: Mapping[str, Tensor], *, names=None, weights=None) -> Tensor:
    """Σ_l w_l ‖g_l − g*_l‖² (DLG, Zhu et al. 2019)."""
    keys = _keys(target, names)
    return sum((1.0 if weights is None else weights[k]) * (pred[k] - target[k]).pow(2).sum() for k in keys)


def l1_distance(pred, target, *, names=None, weights=None) -> Tensor:
    keys = _keys(target, names)
    return sum((1.0 if weights is None else weights[k]) * (pred[k] - target[k]).abs().sum() for k in keys)


def tag_distance(pred, target, *, alpha: float, names=None) -> Tensor:
    """‖g − g*‖² + α‖g − g*‖₁ summed over tensors (TAG as implemented by LAMP)."""
    return l2_distance(pred, target, names=names) + alpha * l1_distance(pred, target, names=names)


def global_cosine_distance(pred, target, *, names=None) -> Tensor:
    """1 − ⟨g, g*⟩ / (‖g‖‖g*‖) over all tensors concatenated (Inverting Gradients; TabLeak)."""
    keys = _keys(target, names)
    dot = sum((pred[k] * target[k]).sum() for k in keys)
    pn = sum(pred[k].pow(2).sum() for k in keys)
    tn = sum(target[k].pow(2).sum() for k in keys)
    return 1.0 - dot / (pn.sqrt() * tn.sqrt() + 1e-12)


def layerwise_cosine_distance(pred, target, *, names=None) -> Tensor:
    """Mean over tensors of 1 − cos(g_l, g*_l) (LAMP's ``cos`` loss)."""
    keys = _keys(target, names)
    terms = [1.0 - torch.nn.functional.cosine_similarity(pred[k].flatten(), target[k].flatten(), dim=0, eps=1e-12)
             for k in keys]
    return torch.stack(terms).mean()


DISTANCES = {
    "l2": l2_distance,
    "cosine": global_cosine_distance,
    "layer-cosine": layerwise_cosine_distance,
}


def gradient_distance(kind: str, pred, target, *, names=None, alpha: float = 0.0) -> Tensor:
    if kind == "tag":
        return tag_distance(pred, target, alpha=alpha, names=names)
    try:
        fn = DISTANCES[kind]
    except KeyError:
        raise ValueError(f"unknown gradient distance {kind!r}; known: tag, {', '.join(DISTANCES)}") from None
    return fn(pred, target, names=names)


def total_variation(x: Tensor, *, dims: Sequence[int] = (-1, -2), anisotropic: bool = True) -> Tensor:
    """Mean absolute (anisotropic) total variation over ``dims`` (images, spectrograms)."""
    tv = 0.0
    for d in dims:
        diff = x.diff(dim=d)
        tv = tv + (diff.abs().mean() if anisotropic else diff.pow(2).mean())
    return tv
