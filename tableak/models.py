from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

#: TabLeak's network-size ablation (run_network_size_variation.py): linear up to [400,400,400,2].
SIZE_LADDER = {"linear": (2,), "fc-50-2": (50, 2), "fc-100-2": (100, 2), "fc-100-100-2": (100, 100, 2),
               "fc-200x3-2": (200, 200, 200, 2), "fc-400x3-2": (400, 400, 400, 2)}


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

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's input (the last ReLU's output; x itself for a linear model)."""
        return self.net[:-1](x)

    @property
    def last(self) -> nn.Linear:
        return self.net[-1]


def train_model(model: FullyConnected, x: torch.Tensor, y: torch.Tensor, *, epochs: int, generator: torch.Generator,
                lr: float = 1e-3, batch_size: int = 256) -> FullyConnected:
    """The "trained model" option: Adam on the public table for ``epochs`` epochs (a copy)."""
    import copy

    model = copy.deepcopy(model).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(x)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()
