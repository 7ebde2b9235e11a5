"""Client-side defenses. Each records its parameters (``describe``) in the update.

``stage == "update"`` defenses transform the final update (FedSGD gradient or FedAvg
delta); ``stage == "gradient"`` defenses (DP-SGD) transform every gradient the client
computes, using per-example gradients from ``torch.func``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar, Mapping

import torch
from torch import Tensor

from .functional import LossFn, per_example_gradients
from .registry import Registry
from .types import Batch


class Defense:
    name: ClassVar[str]
    stage: ClassVar[str] = "update"

    def describe(self) -> dict:
        return {"name": self.name, **asdict(self)}  # type: ignore[call-overload]

    def apply_update(self, tensors: Mapping[str, Tensor], *, generator: torch.Generator) -> dict[str, Tensor]:
        return dict(tensors)

    def apply_gradient(self, grads: dict[str, Tensor], *, model, loss_fn: LossFn, batch: Batch,
                       reduction: str, generator: torch.Generator) -> dict[str, Tensor]:
        return grads

    @property
    def strength(self) -> float:
        """One number for plots of quality versus defense strength."""
        return 0.0


def _randn_like(t: Tensor, generator: torch.Generator) -> Tensor:
    return torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)


@dataclass(frozen=True)
class GaussianNoise(Defense):
    """Add N(0, sigma^2) to every entry of the update (LAMP ``--defense_noise``, TabLeak Table 6)."""

    sigma: float
    name: ClassVar[str] = "gaussian"

    def __post_init__(self) -> None:
        if self.sigma < 0:
            raise ValueError("gaussian noise sigma must be >= 0")

    def apply_update(self, tensors, *, generator):
        return {k: v + self.sigma * _randn_like(v, generator) for k, v in tensors.items()}

    @property
    def strength(self) -> float:
        return self.sigma


@dataclass(frozen=True)
class DPSGD(Defense):
    """DP-SGD (Abadi et al. 2016): clip each example's gradient to total norm ``clip``,
    sum, add N(0, (noise_multiplier * clip)^2), then divide by B for the mean reduction."""

    clip: float
    noise_multiplier: float
    method: str = "vmap"
    name: ClassVar[str] = "dpsgd"
    stage: ClassVar[str] = "gradient"

    def apply_gradient(self, grads, *, model, loss_fn, batch, reduction, generator):
        per = per_example_gradients(model, loss_fn, batch, method=self.method)
        norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in per.values()))
        factor = (self.clip / (norms + 1e-12)).clamp(max=1.0)
        out = {}
        for k, v in per.items():
            s = (v * factor.view(-1, *[1] * (v.dim() - 1))).sum(0)
            s = s + self.noise_multiplier * self.clip * _randn_like(s, generator)
            out[k] = s / len(batch) if reduction == "mean" else s
        return out

    @property
    def strength(self) -> float:
        return self.noise_multiplier


@dataclass(frozen=True)
class TopKPruning(Defense):
    """Keep the ``keep`` fraction of largest-magnitude entries per tensor, zero the rest
    (gradient pruning as in Zhu et al. 2019, Sec. 5)."""

    keep: float
    name: ClassVar[str] = "topk"

    def __post_init__(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise ValueError("topk keep fraction must be in (0, 1]")

    def apply_update(self, tensors, *, generator):
        out = {}
        for k, v in tensors.items():
            n = v.numel()
            kk = max(1, int(math.ceil(self.keep * n)))
            if kk >= n:
                out[k] = v.clone()
                continue
            thresh = v.abs().flatten().kthvalue(n - kk + 1).values
            out[k] = torch.where(v.abs() >= thresh, v, torch.zeros_like(v))
        return out

    @property
    def strength(self) -> float:
        return 1.0 - self.keep


@dataclass(frozen=True)
class RandomMask(Defense):
    """Zero a random fraction ``p`` of update entries (dropout on the update; LAMP ``--defense_pct_mask``)."""

    p: float
    name: ClassVar[str] = "mask"

    def __post_init__(self) -> None:
        if not 0.0 <= self.p < 1.0:
            raise ValueError("mask fraction p must be in [0, 1)")

    def apply_update(self, tensors, *, generator):
        out = {}
        for k, v in tensors.items():
            keep = torch.rand(v.shape, generator=generator) >= self.p
            out[k] = v * keep.to(v.device, v.dtype)
        return out

    @property
    def strength(self) -> float:
        return self.p


@dataclass(frozen=True)
class Quantization(Defense):
    """Uniform per-tensor quantisation to ``bits`` bits (symmetric, max-abs scale) with
    optional stochastic rounding."""

    bits: int
    stochastic: bool = False
    name: ClassVar[str] = "quantize"

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 16:
            raise ValueError("quantisation bits must be in 1..16")

    def apply_update(self, tensors, *, generator):
        levels = 2 ** (self.bits - 1) - 1 if self.bits > 1 else 1
        out = {}
        for k, v in tensors.items():
            scale = v.abs().max().clamp(min=1e-30) / levels
            x = v / scale
            if self.stochastic:
                x = torch.floor(x + torch.rand(v.shape, generator=generator).to(v.device, v.dtype))
            else:
                x = torch.round(x)
            out[k] = x.clamp(-levels, levels) * scale
        return out

    @property
    def strength(self) -> float:
        return 1.0 / self.bits


DEFENSES: Registry[type[Defense]] = Registry("defense")
for _cls in (GaussianNoise, DPSGD, TopKPruning, RandomMask, Quantization):
    DEFENSES.add(_cls.name, _cls)


def build_defense(spec: Mapping) -> Defense:
    """``{"name": "gaussian", "sigma": 0.01}`` -> GaussianNoise(0.01)."""
    spec = dict(spec)
    cls = DEFENSES.get(spec.pop("name"))
    try:
        return cls(**spec)
    except TypeError as e:
        raise ValueError(f"bad parameters for defense {cls.name!r}: {e}") from None
