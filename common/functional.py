"""Losses and gradients of a model with substituted parameters: the differentiable pieces that
the FL client simulation (``common.fl``), the defenses (``common.defenses``) and every
gradient-matching attack share.

A loss function has the signature ``loss_fn(model, batch) -> Tensor[B]``: one loss per
example, so that the reduction (mean or sum) is a protocol choice, and per-example gradients
(DP-SGD clipping) need no second loss definition. Parameters are dicts keyed by
``model.named_parameters()`` names.

This module imports nothing else from ``common`` but the batch type, so ``fl`` and
``defenses`` can both build on it without importing each other.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .types import Batch

LossFn = Callable[[nn.Module, Batch], Tensor]


class BoundLoss(nn.Module):
    """Binds a loss function to a model so ``functional_call`` can swap its parameters
    (the parameters are addressed as ``model.<name>``, see :func:`prefixed`)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: Batch) -> Tensor:
        return self._loss_fn(self.model, batch)


def prefixed(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Parameter names as :class:`BoundLoss` sees them."""
    return {f"model.{k}": v for k, v in params.items()}


def trainable_params(model: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def functional_losses(model: nn.Module, loss_fn: LossFn, params: Mapping[str, Tensor], batch: Batch) -> Tensor:
    """Per-example losses of ``model`` with ``params`` substituted (differentiable in both)."""
    return functional_call(BoundLoss(model, loss_fn), prefixed(params), (batch,), strict=False)


def reduce_loss(losses: Tensor, reduction: str) -> Tensor:
    if losses.dim() != 1:
        raise ValueError(f"loss_fn must return one loss per example (shape [B]), got shape {tuple(losses.shape)}")
    return losses.mean() if reduction == "mean" else losses.sum()


def batch_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    *,
    reduction: str = "mean",
    params: Mapping[str, Tensor] | None = None,
    create_graph: bool = False,
) -> dict[str, Tensor]:
    """Gradient of the reduced loss w.r.t. ``params`` (default: the model's trainable ones)."""
    if params is None:
        params = trainable_params(model)
        loss = reduce_loss(loss_fn(model, batch), reduction)
    else:
        loss = reduce_loss(functional_losses(model, loss_fn, params, batch), reduction)
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph, allow_unused=True)
    return {n: (torch.zeros_like(params[n]) if g is None else g) for n, g in zip(names, grads, strict=True)}


def functional_gradient(model: nn.Module, loss_fn: LossFn, params: Mapping[str, Tensor], batch: Batch, *,
                        reduction: str = "mean") -> dict[str, Tensor]:
    """The same gradient as :func:`batch_gradient` with ``params`` given, through
    ``torch.func.grad``: it composes with ``torch.func.vmap`` (restarts and ensemble members of
    an attack as one tensor) and stays differentiable w.r.t. the batch inputs."""
    return torch.func.grad(lambda p: reduce_loss(functional_losses(model, loss_fn, p, batch), reduction))(dict(params))


def graph_gradient(model: nn.Module, loss_fn: LossFn, params: Mapping[str, Tensor], batch: Batch, *,
                   reduction: str = "mean") -> dict[str, Tensor]:
    """:func:`functional_gradient` through plain autograd (``create_graph=True`` on detached leaves of ``params``):
    the same tensors bit for bit and differentiable w.r.t. the batch inputs, without torch.func's wrapping (a few
    per cent cheaper per gradient-matching step). Not under ``torch.func.vmap``; ``params`` are taken as constants."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    names, outer = list(leaves), torch.is_grad_enabled()
    with torch.enable_grad():  # as torch.func.grad, also under an outer no_grad (then the result carries no graph)
        loss = reduce_loss(functional_losses(model, loss_fn, leaves, batch), reduction)
        grads = torch.autograd.grad(loss, [leaves[n] for n in names], create_graph=outer,
                                    allow_unused=True)
    return {n: (torch.zeros_like(leaves[n]) if g is None else g) for n, g in zip(names, grads, strict=True)}


def per_example_gradients(
    model: nn.Module, loss_fn: LossFn, batch: Batch, *, method: str = "vmap", randomness: str = "different"
) -> dict[str, Tensor]:
    """Per-example gradients ``{name: Tensor[B, *shape]}``.

    ``method="vmap"`` uses ``torch.func.vmap(torch.func.grad(...))`` over a functional copy
    (Opacus's functorch path, no hooks); ``method="loop"`` is the obviously-correct oracle.
    """
    params = {k: v.detach() for k, v in trainable_params(model).items()}
    if method == "loop":
        per: dict[str, list[Tensor]] = {k: [] for k in params}
        for i in range(len(batch)):
            one = batch.select(torch.tensor([i]))
            g = batch_gradient(model, loss_fn, one, reduction="sum")
            for k in per:
                per[k].append(g[k].detach())
        return {k: torch.stack(v) for k, v in per.items()}
    if method != "vmap":
        raise ValueError(f"method must be 'vmap' or 'loop', got {method!r}")

    def one_loss(p: dict[str, Tensor], inputs: dict[str, Tensor], labels: Tensor | None) -> Tensor:
        single = Batch({k: v.unsqueeze(0) for k, v in inputs.items()},
                       None if labels is None else labels.unsqueeze(0), batch.meta)
        return functional_losses(model, loss_fn, p, single).sum()

    in_dims = (None, {k: 0 for k in batch.inputs}, None if batch.labels is None else 0)
    fn = torch.func.vmap(torch.func.grad(one_loss), in_dims=in_dims, randomness=randomness)
    return fn(params, batch.inputs, batch.labels)
