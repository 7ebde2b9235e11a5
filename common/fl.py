"""Federated-learning client simulation: FedSGD gradients and FedAvg weight deltas.

Every update is a dict keyed by ``model.named_parameters()`` names (trainable parameters
only). The model passed in is never mutated: FedSGD uses ``torch.autograd.grad`` and
FedAvg trains functional copies of the parameters through ``torch.func.functional_call``.

A loss function has the signature ``loss_fn(model, batch) -> Tensor[B]``: one loss per
example, so that the reduction (mean or sum) is a protocol choice made here, and
per-example gradients (DP-SGD clipping) need no second loss definition.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .types import Batch, ClientUpdate, FLProtocol

if TYPE_CHECKING:  # defenses import this module
    from .defenses import Defense

LossFn = Callable[[nn.Module, Batch], Tensor]


class _Bound(nn.Module):
    """Binds a loss function to a model so ``functional_call`` can swap its parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: Batch) -> Tensor:
        return self._loss_fn(self.model, batch)


def trainable_params(model: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def functional_losses(model: nn.Module, loss_fn: LossFn, params: Mapping[str, Tensor], batch: Batch) -> Tensor:
    """Per-example losses of ``model`` with ``params`` substituted (differentiable in both)."""
    bound = _Bound(model, loss_fn)
    return functional_call(bound, {f"model.{k}": v for k, v in params.items()}, (batch,), strict=False)


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


GradientHook = Callable[[dict[str, Tensor], Batch], dict[str, Tensor]]


def local_training(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    protocol: FLProtocol,
    *,
    generator: torch.Generator | None = None,
    params: Mapping[str, Tensor] | None = None,
    orders: Sequence[Tensor] | None = None,
    create_graph: bool = False,
    gradient_hook: GradientHook | None = None,
) -> dict[str, Tensor]:
    """Run the client's local SGD functionally; return the final parameters.

    ``orders`` gives, per epoch, the permutation of example indices (drawn from
    ``generator`` when not given, or identity when ``protocol.shuffle`` is False). With
    ``create_graph=True`` the result is differentiable w.r.t. the batch inputs, which is
    what FedAvg attacks (Dimitrov et al. 2022; TabLeak) simulate.
    """
    if params is None:
        params = {k: v.detach().clone().requires_grad_(True) for k, v in trainable_params(model).items()}
    current = dict(params)
    n = len(batch)
    lb = protocol.local_batch_size or n
    for epoch in range(protocol.local_epochs):
        if orders is not None:
            order = orders[epoch]
        elif protocol.shuffle:
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        for start in range(0, n, lb):
            mb = batch.select(order[start : start + lb])
            grads = batch_gradient(model, loss_fn, mb, reduction=protocol.loss_reduction,
                                   params=current, create_graph=create_graph)
            if gradient_hook is not None:
                grads = gradient_hook(grads, mb)
            current = {k: current[k] - protocol.local_lr * grads[k] for k in current}
            if not create_graph:
                current = {k: v.detach().requires_grad_(True) for k, v in current.items()}
    return current


def client_update(
    model: nn.Module,
    batch: Batch,
    loss_fn: LossFn,
    protocol: FLProtocol,
    *,
    defenses: Sequence[Defense] = (),
    generator: torch.Generator,
) -> ClientUpdate:
    """Simulate one honest client round. Never mutates ``model``.

    Defenses with ``stage == "gradient"`` (DP-SGD) act on every gradient the client computes;
    the others (noise, pruning, quantisation, masking) act on the final update.
    """
    if len(batch) != protocol.batch_size:
        raise ValueError(f"batch has {len(batch)} examples but the protocol says batch_size={protocol.batch_size}")
    grad_defs = [d for d in defenses if d.stage == "gradient"]
    upd_defs = [d for d in defenses if d.stage != "gradient"]

    def hook(grads: dict[str, Tensor], mb: Batch) -> dict[str, Tensor]:
        for d in grad_defs:
            grads = d.apply_gradient(grads, model=model, loss_fn=loss_fn, batch=mb,
                                     reduction=protocol.loss_reduction, generator=generator)
        return grads

    if protocol.kind == "fedsgd":
        tensors = {k: v.detach() for k, v in batch_gradient(model, loss_fn, batch, reduction=protocol.loss_reduction).items()}
        tensors = hook(tensors, batch) if grad_defs else tensors
        kind = "gradient"
    else:
        before = {k: v.detach() for k, v in trainable_params(model).items()}
        after = local_training(model, loss_fn, batch, protocol, generator=generator,
                               gradient_hook=hook if grad_defs else None)
        tensors = {k: (before[k] - after[k]).detach() for k in before}
        kind = "delta"
    for d in upd_defs:
        tensors = d.apply_update(tensors, generator=generator)
    seq_lens = batch.meta.get("seq_lens")
    return ClientUpdate(
        kind=kind,
        tensors=tensors,
        num_examples=len(batch),
        labels=None if batch.labels is None else batch.labels.detach(),
        protocol=protocol,
        seq_lens=tuple(int(s) for s in seq_lens) if seq_lens is not None else None,
        defenses=tuple(d.describe() for d in defenses),
    )
