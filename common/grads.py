"""The gradient-matching core shared by every modality: distances between name-keyed tensor
dicts (with optional per-layer weights), per-layer weightings, and reading a FedAvg delta as
a gradient.

Distances (``kind`` names used by every attack config):

* ``l2``: Σ_l w_l · red(‖g_l − g*_l‖²) with ``reduction="sum"`` (DLG, speech) or
  ``"mean"`` (entry mean per tensor, TabLeak's reference code);
* ``cosine``: 1 − ⟨g, g*⟩_w / (‖g‖_w ‖g*‖_w) over all tensors concatenated (Inverting
  Gradients, TabLeak);
* ``layer-cosine``: (weighted) mean over tensors of 1 − cos(g_l, g*_l) (LAMP's ``cos``);
* ``tag``: ‖g − g*‖² + α‖g − g*‖₁ summed over tensors (TAG as implemented by LAMP).

Without ``weights`` no weight enters the arithmetic; with weights of 1.0 the values are the
same (multiplying by 1.0 is exact). The fused text specialisation
(``textleak.components.gradmatch``) implements the same kinds with a hand-written backward.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from .types import FLProtocol, Observation

Weights = Mapping[str, float]


def _keys(target: Mapping[str, Tensor], names: Sequence[str] | None) -> list[str]:
    return list(names) if names is not None else list(target)


def _w(weights: Weights | None, k: str, t: Tensor) -> Tensor:
    return t if weights is None else weights[k] * t


def l2_distance(pred: Mapping[str, Tensor], target: Mapping[str, Tensor], *, names: Sequence[str] | None = None,
                weights: Weights | None = None, reduction: str = "sum") -> Tensor:
    """Σ_l w_l ‖g_l − g*_l‖² (DLG, Zhu et al. 2019); ``reduction="mean"`` averages each tensor's
    squared entries instead of summing them (TabLeak)."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"l2 reduction must be 'sum' or 'mean', got {reduction!r}")
    keys = _keys(target, names)
    sq = (lambda t: t.pow(2).sum()) if reduction == "sum" else (lambda t: t.pow(2).mean())
    return sum(_w(weights, k, sq(pred[k] - target[k])) for k in keys)


def l1_distance(pred: Mapping[str, Tensor], target: Mapping[str, Tensor], *, names: Sequence[str] | None = None,
                weights: Weights | None = None) -> Tensor:
    keys = _keys(target, names)
    return sum(_w(weights, k, (pred[k] - target[k]).abs().sum()) for k in keys)


def tag_distance(pred: Mapping[str, Tensor], target: Mapping[str, Tensor], *, alpha: float,
                 names: Sequence[str] | None = None, weights: Weights | None = None) -> Tensor:
    """‖g − g*‖² + α‖g − g*‖₁ summed over tensors (TAG as implemented by LAMP)."""
    return (l2_distance(pred, target, names=names, weights=weights)
            + alpha * l1_distance(pred, target, names=names, weights=weights))


def global_cosine_distance(pred: Mapping[str, Tensor], target: Mapping[str, Tensor], *,
                           names: Sequence[str] | None = None, weights: Weights | None = None,
                           min_norm_sq: float = 0.0) -> Tensor:
    """1 − ⟨g, g*⟩ / (‖g‖‖g*‖) over all tensors concatenated (Inverting Gradients; TabLeak).
    ``min_norm_sq > 0`` clamps ‖g‖² from below (a zero dummy gradient then has a finite
    derivative; the speech attack's L-BFGS starts from zero features)."""
    keys = _keys(target, names)
    dot = sum(_w(weights, k, (pred[k] * target[k]).sum()) for k in keys)
    pn = sum(_w(weights, k, pred[k].pow(2).sum()) for k in keys)
    tn = sum(_w(weights, k, target[k].pow(2).sum()) for k in keys)
    if min_norm_sq > 0:
        pn = pn.clamp(min=min_norm_sq)
    return 1.0 - dot / (pn.sqrt() * tn.sqrt() + 1e-12)


def layerwise_cosine_distance(pred: Mapping[str, Tensor], target: Mapping[str, Tensor], *,
                              names: Sequence[str] | None = None, weights: Weights | None = None) -> Tensor:
    """Mean over tensors of 1 − cos(g_l, g*_l) (LAMP's ``cos`` loss); with weights,
    Σ_l w_l (1 − cos_l) / Σ_l w_l."""
    keys = _keys(target, names)
    terms = [_w(weights, k, 1.0 - torch.nn.functional.cosine_similarity(pred[k].flatten(), target[k].flatten(),
                                                                         dim=0, eps=1e-12))
             for k in keys]
    if weights is None:
        return torch.stack(terms).mean()
    return torch.stack(terms).sum() / sum(weights[k] for k in keys)


DISTANCES = ("l2", "cosine", "layer-cosine", "tag")


def gradient_distance(kind: str, pred: Mapping[str, Tensor], target: Mapping[str, Tensor], *,
                      names: Sequence[str] | None = None, weights: Weights | None = None, alpha: float = 0.0,
                      reduction: str = "sum", min_norm_sq: float = 0.0) -> Tensor:
    """The distance ``kind`` (one of :data:`DISTANCES`) between dummy and observed updates.
    ``reduction`` applies to ``l2``, ``alpha`` to ``tag``, ``min_norm_sq`` to ``cosine``."""
    if kind == "l2":
        return l2_distance(pred, target, names=names, weights=weights, reduction=reduction)
    if kind == "cosine":
        return global_cosine_distance(pred, target, names=names, weights=weights, min_norm_sq=min_norm_sq)
    if kind == "layer-cosine":
        return layerwise_cosine_distance(pred, target, names=names, weights=weights)
    if kind == "tag":
        return tag_distance(pred, target, alpha=alpha, names=names, weights=weights)
    raise ValueError(f"unknown gradient distance {kind!r}; known: {', '.join(DISTANCES)}")


LAYER_WEIGHTS = ("uniform", "inverse-norm", "depth-decay")


def layer_weights(kind: str, target: Mapping[str, Tensor], names: Sequence[str], *, decay: float = 0.8) -> dict[str, float]:
    """Per-tensor weights: ``uniform`` (1), ``inverse-norm`` (1/‖g*_l‖², every layer counts the
    same) or ``depth-decay`` (decay**l in parameter order: input layers heaviest)."""
    if kind == "uniform":
        return {k: 1.0 for k in names}
    if kind == "inverse-norm":
        return {k: 1.0 / float(target[k].pow(2).sum().clamp(min=1e-20)) for k in names}
    if kind == "depth-decay":
        return {k: decay ** i for i, k in enumerate(names)}
    raise ValueError(f"unknown layer weighting {kind!r}; use {', '.join(LAYER_WEIGHTS)}")


# -- FedAvg deltas read as gradients ---------------------------------------------------------------
def delta_scale(protocol: FLProtocol) -> float:
    """``local_lr`` × the number of local SGD steps: a FedAvg delta is ≈ this times the mean
    gradient (exactly, for one step)."""
    return protocol.local_lr * (protocol.local_epochs * protocol.steps_per_epoch)


def delta_to_gradient(tensors: Mapping[str, Tensor], protocol: FLProtocol) -> dict[str, Tensor]:
    """A FedAvg delta divided by :func:`delta_scale` (a one-step approximation of the mean gradient)."""
    scale = delta_scale(protocol)
    return {k: v / scale for k, v in tensors.items()}


def observed_gradient(obs: Observation) -> dict[str, Tensor]:
    """The observed update as a gradient: FedSGD as is; a FedAvg delta through :func:`delta_to_gradient`."""
    if obs.kind == "gradient":
        return {k: v for k, v in obs.tensors.items()}
    return delta_to_gradient(obs.tensors, obs.require_protocol())


def total_variation(x: Tensor, *, dims: Sequence[int] = (-1, -2), anisotropic: bool = True) -> Tensor:
    """Mean absolute (anisotropic) total variation over ``dims`` (images, spectrograms)."""
    tv = 0.0
    for d in dims:
        diff = x.diff(dim=d)
        tv = tv + (diff.abs().mean() if anisotropic else diff.pow(2).mean())
    return tv
