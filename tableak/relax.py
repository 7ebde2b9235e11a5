"""TabLeak's relaxations, built out of place (``torch.cat`` over feature blocks).

The reference (eth-sri/tableak ``utils/*``: ``categorical_softmax``, ``continuous_sigmoid_bound``)
assigns into slices of the optimised leaf in place, which is why it only runs on PyTorch
1.7.1; here every relaxed tensor is a fresh tensor and gradients flow to the leaf.
All functions act on the last dimension and broadcast over any leading ones.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .schema import TabularSchema


class Relaxer:
    def __init__(self, schema: TabularSchema, device: torch.device | str = "cpu") -> None:
        self.schema = schema
        self.mean = torch.tensor(schema.mean, dtype=torch.float32, device=device)
        self.scale = torch.tensor(schema.scale, dtype=torch.float32, device=device)
        lo, hi = schema.bounds()
        self.lo, self.hi = lo.to(device), hi.to(device)
        self.blocks = [(f.kind, sl) for f, sl in schema.blocks()]

    def softmax(self, x: Tensor, tau: float = 1.0) -> Tensor:
        """Every categorical block of width > 1: de-standardise, softmax(·/τ), re-standardise."""
        parts = []
        for kind, sl in self.blocks:
            piece = x[..., sl]
            if kind == "categorical" and sl.stop - sl.start > 1:
                m, s = self.mean[sl], self.scale[sl]
                piece = ((piece * s + m) / tau).softmax(-1)
                piece = (piece - m) / s
            parts.append(piece)
        return torch.cat(parts, -1)

    def sigmoid(self, x: Tensor, temperature: float = 1.0) -> Tensor:
        """Every continuous column: (ub − lb)·σ(x/T) + lb with the standardised bounds."""
        parts = []
        for kind, sl in self.blocks:
            piece = x[..., sl]
            if kind == "continuous":
                lo, hi = self.lo[sl], self.hi[sl]
                piece = (hi - lo) * torch.sigmoid(piece / temperature) + lo
            parts.append(piece)
        return torch.cat(parts, -1)

    def clamp(self, x: Tensor) -> Tensor:
        """Post-processing: continuous columns clamped to their bounds (one-hot columns untouched)."""
        parts = []
        for kind, sl in self.blocks:
            piece = x[..., sl]
            if kind == "continuous":
                piece = torch.max(torch.min(piece, self.hi[sl]), self.lo[sl])
            parts.append(piece)
        return torch.cat(parts, -1)

    def probabilities(self, x: Tensor) -> list[Tensor]:
        """Per categorical block, the de-standardised block clipped at 0 and renormalised."""
        out = []
        for kind, sl in self.blocks:
            if kind == "categorical":
                p = (x[..., sl] * self.scale[sl] + self.mean[sl]).clamp(min=0)
                tot = p.sum(-1, keepdim=True)
                k = sl.stop - sl.start
                out.append(torch.where(tot > 0, p / tot.clamp(min=1e-12), torch.full_like(p, 1.0 / k)))
        return out
