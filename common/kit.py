"""What a modality package provides to the runner (a "kit"), and the generic continuous prior."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn

from .case import Case
from .fl import LossFn
from .types import Batch, Reconstruction


class Kit(Protocol):
    """A modality's loader, loss, prior builder and scorer.

    Only the runner calls ``sample``/``score`` (they touch ground truth); attacks see the
    prior returned by ``make_prior`` and never the truth.
    """

    modality: str

    def load_model(self, case: Case, *, device: torch.device, generator: torch.Generator) -> nn.Module: ...

    def load_pool(self, case: Case, *, data_path: str | None) -> Any: ...  # a datasets.Dataset

    def sample(self, pool: Any, case: Case, *, model: nn.Module, device: torch.device,
               generator: torch.Generator) -> tuple[Batch, Any]: ...  # (batch, ground truth)

    def loss_fn(self, model: nn.Module, batch: Batch) -> Tensor: ...  # per-example losses

    def make_prior(self, case: Case, model: nn.Module, prior_kind: str, *, device: torch.device) -> Any: ...

    def score(self, reconstruction: Reconstruction, truth: Any, *, case: Case) -> tuple[dict[str, float], str]: ...


@dataclass(frozen=True)
class ContinuousPrior:
    """Public knowledge for the generic continuous-input baselines (DLG, iDLG, IG).

    ``build_batch(x, y)`` turns dummy inputs ``x [B, *input_shape]`` and labels ``y`` (class
    ids [B] or probabilities [B, C]) into a Batch for ``loss_fn``. ``label_weight`` and
    ``label_bias`` name the last layer's parameters (found by identity by the kit).
    """

    input_shape: tuple[int, ...]
    num_classes: int
    build_batch: Callable[[Tensor, Tensor], Batch]
    loss_fn: LossFn
    label_weight: str | None = None
    label_bias: str | None = None
    lower: Tensor | None = None  # per-feature bounds in input space (broadcast to input_shape)
    upper: Tensor | None = None
    sample_inputs: Callable[[int, torch.Generator], Tensor] | None = None  # public random inputs (label-count estimate)
