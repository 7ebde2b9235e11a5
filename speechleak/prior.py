"""The speech prior: public knowledge the speech attacks use (built by the kit; never holds the
client's data)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn

from common.types import Batch

from .frontend import FrontEnd


@dataclass(frozen=True)
class SpeechPrior:
    """Public knowledge the attack uses (built by the kit; never holds the client's data)."""

    task: str  # "kws" | "ctc"
    frontend: FrontEnd
    num_samples: int  # clip length in samples (public protocol fact: fixed-length clips)
    input_shape: tuple[int, int]  # feature map (F, T)
    num_classes: int
    build_batch: Callable[[Tensor, Tensor | None], Batch]  # (features [B,F,T], labels) -> Batch
    loss_fn: Callable[[nn.Module, Batch], Tensor]
    label_weight: str | None = None
    label_bias: str | None = None
    lower: float | None = None  # lower bound of the feature values (mel: log of the floor)
    upper: float | None = None  # upper bound of the (mel) feature values
