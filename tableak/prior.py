"""The tabular prior: what the tabular attacks get from the kit (never the client's rows)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from torch import Tensor, nn

from common.types import Batch

from .schema import TabularSchema


def tabular_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Per-row cross-entropy of the classifier on ``batch.inputs["x"]`` (the tabular kit's loss)."""
    return nn.functional.cross_entropy(model(batch.inputs["x"]), batch.labels, reduction="none")


@dataclass(frozen=True)
class TabularPrior:
    """Public knowledge the tabular attacks get from the kit (never the client's rows)."""

    schema: TabularSchema
    forward: Callable[[dict[str, Tensor], Tensor], Tensor]  # functional logits f(params, x)
    penultimate: Callable[[Tensor], Tensor]  # last layer's input for x (label-count rule)
    last_weight: str
    last_bias: str
    marginals: dict[str, np.ndarray]  # categorical: probabilities over categories
    histograms: dict[str, tuple[np.ndarray, np.ndarray]]  # continuous: (bin edges, probabilities), ≤ 100 bins
    loss_fn: Callable[[nn.Module, Batch], Tensor] = tabular_loss  # per-row loss the client trains with
