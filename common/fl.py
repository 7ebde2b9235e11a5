"""Federated-learning client simulation: FedSGD gradients and FedAvg weight deltas.

Every update is a dict keyed by ``model.named_parameters()`` names (trainable parameters
only). The model passed in is never mutated: FedSGD uses ``torch.autograd.grad`` and
FedAvg trains functional copies of the parameters through ``torch.func.functional_call``.
The functional pieces (losses and gradients with substituted parameters) live in
``common.functional`` and are re-exported here.

A loss function has the signature ``loss_fn(model, batch) -> Tensor[B]``: one loss per
example, so that the reduction (mean or sum) is a protocol choice made here, and
per-example gradients (DP-SGD clipping) need no second loss definition.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .functional import (LossFn, batch_gradient, functional_gradient, functional_losses, per_example_gradients,
                         reduce_loss, trainable_params)
from .types import Batch, ClientUpdate, FLProtocol

if TYPE_CHECKING:  # type only: defenses build on common.functional, not on this module
    from .defenses import Defense

__all__ = ["LossFn", "batch_gradient", "functional_gradient", "functional_losses", "per_example_gradients",
           "reduce_loss", "trainable_params", "local_training", "client_update", "GradientHook"]

GradientHook = Callable[[dict[str, Tensor], Batch], dict[str, Tensor]]


def local_training(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch | Sequence[Batch],
    protocol: FLProtocol,
    *,
    generator: torch.Generator | None = None,
    params: Mapping[str, Tensor] | None = None,
    orders: Sequence[Tensor] | None = None,
    create_graph: bool = False,
    functional: bool = False,
    gradient_hook: GradientHook | None = None,
) -> dict[str, Tensor]:
    """Run the client's local SGD functionally; return the final parameters.

    ``orders`` gives, per epoch, the permutation of example indices (drawn from
    ``generator`` when not given, or identity when ``protocol.shuffle`` is False). With
    ``create_graph=True`` the result is differentiable w.r.t. the batch inputs, which is
    what FedAvg attacks (Dimitrov et al. 2022; TabLeak) simulate. ``functional=True`` takes
    each step's gradient with ``torch.func.grad`` (:func:`functional_gradient`), so the whole
    simulation runs under ``torch.func.vmap`` (an attack's restarts or ensemble members as one
    tensor). ``batch`` may be a sequence with one batch per local epoch (attacks that keep one
    copy of the client data per epoch, TabLeak's FedAvg).
    """
    if params is None:
        params = {k: v.detach().clone().requires_grad_(True) for k, v in trainable_params(model).items()}
    per_epoch = not isinstance(batch, Batch)
    if per_epoch and len(batch) != protocol.local_epochs:
        raise ValueError(f"{len(batch)} per-epoch batches for {protocol.local_epochs} local epochs")
    current = dict(params)
    n = len(batch[0]) if per_epoch else len(batch)
    lb = protocol.local_batch_size or n
    for epoch in range(protocol.local_epochs):
        data = batch[epoch] if per_epoch else batch
        if orders is not None:
            order = orders[epoch]
        elif protocol.shuffle:
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        for start in range(0, n, lb):
            mb = data.select(order[start : start + lb])
            if functional:
                grads = functional_gradient(model, loss_fn, current, mb, reduction=protocol.loss_reduction)
            else:
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
