"""The one optimiser loop of the gradient-matching attacks (generic baselines, TabLeak, speech,
TAG/LAMP): Adam, optionally on the sign of the gradient and with a learning-rate schedule,
with per-step callbacks (gradient clipping, best-point tracking, projection, clamping,
discrete steps), or L-BFGS with a strong-Wolfe line search driven by a closure.

One Adam step is: zero the gradients, evaluate the objective, back-propagate into the
variables only, ``on_gradient(it, loss)``, sign the gradients (``signed``), ``opt.step()``,
``scheduler.step()``, ``after_step(it)``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

Schedule = Callable[[torch.optim.Optimizer], "torch.optim.lr_scheduler.LRScheduler"]
Objective = Callable[[], Tensor]


def step_decay(iterations: int, *, gamma: float = 0.1) -> Schedule:
    """× ``gamma`` at 3/8, 5/8 and 7/8 of the iterations (Inverting Gradients' schedule)."""
    n = iterations
    return lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3 * n // 8, 5 * n // 8, 7 * n // 8],
                                                            gamma=gamma)


def step_lr(step_size: int, gamma: float) -> Schedule:
    """× ``gamma`` every ``step_size`` steps (LAMP's StepLR)."""
    return lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)


def adam(variables: Sequence[Tensor], objective: Objective, *, lr: float, iterations: int, signed: bool = False,
         schedule: Schedule | None = None, on_gradient: Callable[[int, Tensor], None] | None = None,
         after_step: Callable[[int], None] | None = None) -> None:
    """``iterations`` Adam steps on ``variables`` (in place) minimising ``objective()``."""
    variables = list(variables)
    opt = torch.optim.Adam(variables, lr=lr)
    sched = schedule(opt) if schedule is not None else None
    for it in range(iterations):
        opt.zero_grad(set_to_none=True)
        loss = objective()
        loss.backward(inputs=variables)
        if on_gradient is not None:
            on_gradient(it, loss)
        if signed:
            for v in variables:
                v.grad.sign_()
        opt.step()
        if sched is not None:
            sched.step()
        if after_step is not None:
            after_step(it)


def lbfgs(variables: Sequence[Tensor], objective: Objective, *, lr: float = 1.0, iterations: int,
          history_size: int = 100) -> None:
    """One ``torch.optim.LBFGS.step`` of up to ``iterations`` inner iterations with a strong-Wolfe
    line search and tight tolerances (gradient matching reaches distances far below the defaults)."""
    variables = list(variables)
    opt = torch.optim.LBFGS(variables, lr=lr, max_iter=iterations, history_size=history_size,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        total = objective()
        total.backward(inputs=variables)
        return total

    opt.step(closure)


def optimise(variables: Sequence[Tensor], objective: Objective, *, optimizer: str, lr: float, iterations: int,
             signed: bool = False, schedule: Schedule | None = None, history_size: int = 100,
             on_gradient: Callable[[int, Tensor], None] | None = None,
             after_step: Callable[[int], None] | None = None) -> None:
    """:func:`adam` or :func:`lbfgs` by name. L-BFGS takes no per-step options: ``signed``,
    ``schedule``, ``on_gradient`` and ``after_step`` apply to Adam only (an attack that must
    stay in bounds under L-BFGS reparameterises instead, as the speech attack does)."""
    if optimizer == "adam":
        adam(variables, objective, lr=lr, iterations=iterations, signed=signed, schedule=schedule,
             on_gradient=on_gradient, after_step=after_step)
    elif optimizer == "lbfgs":
        lbfgs(variables, objective, lr=lr, iterations=iterations, history_size=history_size)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; use adam or lbfgs")
