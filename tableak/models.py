from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class FullyConnected(nn.Module):
    """TabLeak's ``FullyConnected(d, [100, 100, 2])``: Linear-ReLU-...-Linear."""

    def __init__(self, input_dim: int, layout: Sequence[int] = (100, 100, 2), *, generator: torch.Generator | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        prev = input_dim
        for i, width in enumerate(layout):
            layers.append(nn.Linear(prev, width))
            if i < len(layout) - 1:
                layers.append(nn.ReLU())
            prev = width
        self.net = nn.Sequential(*layers)
        if generator is not None:  # PyTorch's default Linear init, drawn from an explicit generator
            for m in self.net:
                if isinstance(m, nn.Linear):
                    bound = 1.0 / m.in_features ** 0.5
                    with torch.no_grad():
                        m.weight.copy_(torch.rand(m.weight.shape, generator=generator) * 2 * bound - bound)
                        m.bias.copy_(torch.rand(m.bias.shape, generator=generator) * 2 * bound - bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @property
    def last(self) -> nn.Linear:
        return self.net[-1]
