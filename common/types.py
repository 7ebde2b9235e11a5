"""Core data types shared by every modality.

``ClientUpdate`` is what a client computes; ``Observation`` is what the server sees of it
(made only by :func:`common.observe.observe`). Ground truth never travels with either:
only ``eval.pipeline`` holds the batch and the observation at the same time.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Generic, Literal, Mapping, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


@dataclass(frozen=True)
class FLProtocol:
    """How the client turns its batch into an update.

    fedsgd: one gradient of the reduced loss over the whole batch.
    fedavg: ``local_epochs`` passes of SGD with minibatches of ``local_batch_size`` and
    learning rate ``local_lr``; the update is the delta θ_before − θ_after.
    """

    kind: Literal["fedsgd", "fedavg"] = "fedsgd"
    batch_size: int | None = 1  # None only in an Observation whose threat model withholds the batch size
    local_epochs: int = 1
    local_batch_size: int | None = None  # None: the whole client batch
    local_lr: float = 1e-2
    shuffle: bool = True
    loss_reduction: Literal["mean", "sum"] = "mean"

    def __post_init__(self) -> None:
        if self.kind not in ("fedsgd", "fedavg"):
            raise ValueError(f"protocol kind must be 'fedsgd' or 'fedavg', got {self.kind!r}")
        if self.loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {self.loss_reduction!r}")
        if (self.batch_size is not None and self.batch_size < 1) or self.local_epochs < 1:
            raise ValueError("batch_size and local_epochs must be >= 1")
        if self.local_batch_size is not None and self.local_batch_size < 1:
            raise ValueError("local_batch_size must be >= 1")

    @property
    def steps_per_epoch(self) -> int:
        if self.batch_size is None:
            raise ValueError("the local steps per epoch depend on the batch size, which the threat model withholds: "
                             "grant Capability.BATCH_SIZE")
        lb = self.local_batch_size or self.batch_size
        return -(-self.batch_size // lb)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Batch:
    """A client batch: tensors whose first dimension indexes examples.

    ``inputs`` are passed to the model by the modality's loss function; ``labels`` are the
    training targets (class ids, token ids, transcripts ...). ``meta`` holds per-batch
    facts that are not tensors (e.g. sequence lengths) and travels with ``select``.
    """

    inputs: dict[str, Tensor]
    labels: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        for v in self.inputs.values():
            return int(v.shape[0])
        if self.labels is not None:
            return int(self.labels.shape[0])
        return 0

    def select(self, index: Tensor) -> "Batch":
        idx = index.to(torch.long)
        meta = dict(self.meta)
        for key, value in self.meta.items():
            if isinstance(value, (list, tuple)) and len(value) == len(self):
                meta[key] = type(value)(value[i] for i in idx.tolist())
        return Batch(
            {k: v.index_select(0, idx.to(v.device)) for k, v in self.inputs.items()},
            None if self.labels is None else self.labels.index_select(0, idx.to(self.labels.device)),
            meta,
        )

    def to(self, device: torch.device | str) -> "Batch":
        return Batch({k: v.to(device) for k, v in self.inputs.items()},
                     None if self.labels is None else self.labels.to(device), dict(self.meta))


def first_nonfinite(tensors: Mapping[str, Tensor]) -> str | None:
    """The name of the first floating tensor holding NaN or Inf, or None if all are finite."""
    for name, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return name
    return None


@dataclass(frozen=True)
class ClientUpdate:
    """Everything a client could send: the update and the facts around it."""

    kind: Literal["gradient", "delta"]
    tensors: Mapping[str, Tensor]  # keyed by model.named_parameters() names
    num_examples: int
    labels: Tensor | None
    protocol: FLProtocol
    seq_lens: tuple[int, ...] | None = None
    defenses: tuple[dict, ...] = ()


@dataclass(frozen=True)
class Observation:
    """What the server sees from one client in one round, and nothing else."""

    kind: Literal["gradient", "delta"]
    tensors: Mapping[str, Tensor]
    num_examples: int | None = None  # None unless BATCH_SIZE granted
    labels: Tensor | None = None  # None unless LABELS granted
    seq_lens: tuple[int, ...] | None = None  # None unless SEQUENCE_LENGTHS granted
    protocol: FLProtocol | None = None  # None unless LOCAL_HPARAMS granted
    defenses: tuple[dict, ...] = ()  # defenses are public protocol facts

    def require_num_examples(self) -> int:
        if self.num_examples is None:
            raise ValueError("this attack needs the batch size: grant Capability.BATCH_SIZE in the threat model")
        return self.num_examples

    def require_protocol(self) -> FLProtocol:
        if self.protocol is None:
            raise ValueError("this attack needs the local hyper-parameters: grant Capability.LOCAL_HPARAMS")
        return self.protocol


@dataclass
class Reconstruction(Generic[T]):
    """An attack's output: reconstructed data (modality-specific) plus diagnostics."""

    data: T
    labels: Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)
    confidence: list[float] | None = None  # per example, where the attack has one
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. entropy maps, candidate pools
