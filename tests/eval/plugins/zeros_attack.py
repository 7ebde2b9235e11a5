"""The worked example of docs/architecture.md: a new attack is one module like this one,
one registry line (``ATTACKS`` below) and one test (tests/eval/test_architecture_example.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from common.attack import AttackInfo
from common.threat import Capability
from common.types import Reconstruction


@dataclass(frozen=True)
class ZerosConfig:
    value: float = 0.0  # every reconstructed input entry


class Zeros:
    """A floor for any case whose kit builds a 'continuous' prior: guess a constant input."""

    info: ClassVar[AttackInfo] = AttackInfo(
        "zeros", "continuous", frozenset({Capability.GRADIENTS, Capability.BATCH_SIZE}),
        "worked example (no paper)", prior="continuous")

    def __init__(self, config: ZerosConfig | None = None) -> None:
        self.config = config or ZerosConfig()

    @classmethod
    def default_config(cls) -> ZerosConfig:
        return ZerosConfig()

    def reconstruct(self, obs, model, prior, *, generator: torch.Generator) -> Reconstruction:
        b = obs.require_num_examples()
        x = torch.full((b, *prior.input_shape), self.config.value)
        return Reconstruction(x, labels=torch.zeros(b, dtype=torch.long))


ATTACKS = {"zeros": "zeros_attack:Zeros"}  # the registry line
