"""Generic gradient-matching baselines for continuous inputs: DLG, iDLG, Inverting Gradients.

Built on the gradient-matching core: ``common.grads`` (distances), ``common.functional``
(gradients of substituted parameters) and ``common.optim`` (the Adam / L-BFGS loop).

All restarts of an attack run as one tensor: the per-restart gradient distance is computed
with ``torch.func.vmap(torch.func.grad(...))`` over a functional copy of the model, so R
restarts cost one vectorised pass instead of R Python-level ones (``batched=False`` keeps
the sequential loop for benchmarks).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ..attack import AttackInfo
from ..functional import functional_gradient, trainable_params
from ..grads import gradient_distance, total_variation
from ..kit import ContinuousPrior
from ..labels import recover_labels
from ..optim import optimise, step_decay
from ..threat import Capability
from ..types import Observation, Reconstruction


@dataclass(frozen=True)
class GradientMatchingConfig:
    RANGES: ClassVar[dict[str, str]] = {  # checked by common.attack.validate_config
        "lr": ">0", "iterations": ">=1", "restarts": ">=1"}
    distance: Literal["l2", "cosine", "layer-cosine", "tag"] = "l2"
    optimizer: Literal["lbfgs", "adam"] = "lbfgs"
    lr: float = 1.0
    iterations: int = 300
    restarts: int = 1
    tv_weight: float = 0.0
    tv_dims: tuple[int, ...] = (-1,)
    signed_grad: bool = False
    lr_schedule: bool = False  # IG: step decay at 3/8, 5/8, 7/8 of the iterations (x0.1)
    labels: Literal["observed", "optimize", "idlg"] = "observed"
    init: Literal["randn", "uniform"] = "randn"
    init_scale: float = 1.0
    clamp_to_bounds: bool = True
    batched: bool = True


def _matching_target(obs: Observation) -> dict[str, Tensor]:
    if obs.kind != "gradient":
        raise ValueError("this baseline matches FedSGD gradients; the observation is a FedAvg delta")
    return {k: v for k, v in obs.tensors.items()}


class GradientMatchingAttack:
    """Shared engine of DLG / iDLG / IG (subclasses set ``info`` and the config defaults)."""

    info: ClassVar[AttackInfo]

    def __init__(self, config: GradientMatchingConfig | None = None) -> None:
        self.config = config or type(self).default_config()

    @classmethod
    def default_config(cls) -> GradientMatchingConfig:
        return GradientMatchingConfig()

    # -- labels -----------------------------------------------------------------------
    def _labels(self, obs: Observation, prior: ContinuousPrior, model: nn.Module, b: int,
                generator: torch.Generator) -> Tensor | None:
        mode = self.config.labels
        if obs.labels is not None:
            return obs.labels.clone()
        if mode == "observed":
            raise ValueError(f"{self.info.name} needs the labels: grant Capability.LABELS or use --set labels=idlg")
        if mode == "optimize":
            return None
        mean_probs = None
        if prior.sample_inputs is not None:
            x = prior.sample_inputs(64, generator)
            with torch.no_grad():
                logits = functional_call(model, dict(model.named_parameters()), (x,))
                mean_probs = logits.softmax(-1).mean(0)
        return recover_labels(obs.tensors, num_examples=b, weight=prior.label_weight, bias=prior.label_bias,
                              mean_probs=mean_probs,
                              reduction=obs.protocol.loss_reduction if obs.protocol else "mean")

    # -- main -------------------------------------------------------------------------
    def reconstruct(self, obs: Observation, model: nn.Module, prior: ContinuousPrior, *,
                    generator: torch.Generator) -> Reconstruction[Tensor]:
        cfg = self.config
        t0 = time.perf_counter()
        b = obs.require_num_examples()
        target = _matching_target(obs)
        device = next(iter(target.values())).device
        params = {k: v.detach() for k, v in trainable_params(model).items()}
        names = [k for k in target if k in params]
        labels = self._labels(obs, prior, model, b, generator)
        reduction = obs.protocol.loss_reduction if obs.protocol else "mean"
        shape = (cfg.restarts, b, *prior.input_shape)
        if cfg.init == "uniform":
            x0 = (torch.rand(shape, generator=generator) * 2 - 1) * cfg.init_scale
        else:
            x0 = torch.randn(shape, generator=generator) * cfg.init_scale
        x = x0.to(device).requires_grad_(True)
        variables = [x]
        y_logits = None
        if labels is None:
            y_logits = torch.randn((cfg.restarts, b, prior.num_classes), generator=generator).to(device).requires_grad_(True)
            variables.append(y_logits)
        else:
            labels = labels.to(device)

        def distance_one(xr: Tensor, yr: Tensor | None) -> Tensor:
            y = labels if yr is None else yr.softmax(-1)
            g = functional_gradient(model, prior.loss_fn, params, prior.build_batch(xr, y), reduction=reduction)
            d = gradient_distance(cfg.distance, g, target, names=names)
            if cfg.tv_weight > 0:
                d = d + cfg.tv_weight * total_variation(xr, dims=cfg.tv_dims)
            return d

        def losses(xv: Tensor, yv: Tensor | None) -> Tensor:
            if cfg.batched:
                if yv is None:
                    return vmap(lambda a: distance_one(a, None))(xv)
                return vmap(distance_one)(xv, yv)
            return torch.stack([distance_one(xv[r], None if yv is None else yv[r]) for r in range(xv.shape[0])])

        def clamp(_: int) -> None:
            with torch.no_grad():
                x.data = torch.max(torch.min(x.data, prior.upper.to(device)), prior.lower.to(device))

        optimise(variables, lambda: losses(x, y_logits).sum(), optimizer=cfg.optimizer, lr=cfg.lr,
                 iterations=cfg.iterations, signed=cfg.signed_grad,
                 schedule=step_decay(cfg.iterations) if cfg.lr_schedule else None,
                 after_step=clamp if cfg.clamp_to_bounds and prior.lower is not None else None)
        with torch.no_grad():
            final = losses(x, y_logits).detach()
        best = int(torch.argmin(torch.nan_to_num(final, nan=float("inf"))).item())
        out_x = x.detach()[best]
        out_y = labels if y_logits is None else y_logits.detach()[best].argmax(-1)
        return Reconstruction(
            data=out_x,
            labels=out_y.detach().cpu() if out_y is not None else None,
            stats={"final_grad_loss": float(final[best].item()), "restarts": float(cfg.restarts),
                   "attack_s": time.perf_counter() - t0},
        )


class DLG(GradientMatchingAttack):
    """Deep Leakage from Gradients (Zhu, Liu, Han, NeurIPS 2019).

    L2 gradient distance, dummy inputs *and* soft labels optimised jointly with L-BFGS
    (lr 1, as in the reference ``main.py``). Deviations: L-BFGS runs ``iterations`` inner
    iterations with a strong-Wolfe line search (the reference calls ``step`` 300 times with
    the default 20 inner iterations and no line search); labels observed when granted.
    """

    info = AttackInfo("dlg", "continuous", frozenset({Capability.GRADIENTS, Capability.BATCH_SIZE}),
                      "Zhu, Liu, Han. Deep Leakage from Gradients. NeurIPS 2019", prior="continuous")

    @classmethod
    def default_config(cls) -> GradientMatchingConfig:
        return GradientMatchingConfig(distance="l2", optimizer="lbfgs", lr=1.0, iterations=300, labels="optimize")


class IDLG(GradientMatchingAttack):
    """improved DLG (Zhao, Mopuri, Bilen, arXiv 2001.02610, 2020).

    As DLG, but the label is read off the last layer's gradient first (the only negative
    entry), and only the inputs are optimised. For B > 1 labels come from the
    label-count rule of Geng et al. 2021 (an extension; iDLG itself is B = 1 only).
    """

    info = AttackInfo("idlg", "continuous", frozenset({Capability.GRADIENTS, Capability.BATCH_SIZE}),
                      "Zhao, Mopuri, Bilen. iDLG: Improved Deep Leakage from Gradients. arXiv 2001.02610", prior="continuous")

    @classmethod
    def default_config(cls) -> GradientMatchingConfig:
        return GradientMatchingConfig(distance="l2", optimizer="lbfgs", lr=1.0, iterations=300, labels="idlg")


class InvertingGradients(GradientMatchingAttack):
    """Inverting Gradients (Geiping, Bauermeister, Dröge, Moeller, NeurIPS 2020).

    Global cosine distance + total variation, Adam (lr 0.1) on the *signed* gradient with
    step decay at 3/8, 5/8, 7/8, inputs clamped to the data bounds, restarts keep the
    lowest-loss candidate. Paper default 4800 iterations x 8 restarts on images; we default
    to 2000 x 8 and TV 0 for non-image inputs (set ``tv_weight`` for images/spectrograms).
    """

    info = AttackInfo("inverting-gradients", "continuous", frozenset({Capability.GRADIENTS, Capability.BATCH_SIZE}),
                      "Geiping et al. Inverting Gradients - How easy is it to break privacy in federated learning? NeurIPS 2020",
                      prior="continuous")

    @classmethod
    def default_config(cls) -> GradientMatchingConfig:
        return GradientMatchingConfig(distance="cosine", optimizer="adam", lr=0.1, iterations=2000, restarts=8,
                                      signed_grad=True, lr_schedule=True, labels="idlg")


