"""The search loop's pieces of :mod:`speechleak.attack` (issue 21): the silent-block start, the coarse-to-fine stage and
running independent searches (the attacker-TTS voices' alignments, the ``init_tts_average`` searches) on several threads.

Threads (``search_threads``, session 19): each job runs in its own Python thread with its own deep copy of the model
(``torch.func.functional_call`` swaps a module's parameters while it runs, so one module cannot serve two threads), and
with ``max(1, torch threads // jobs at once)`` intra-op threads. The kernels are the same as in a sequential run, so at
one intra-op thread the results are the same bit for bit; only the wall time changes (the Python parts hold the GIL).
"""
from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch
from torch import Tensor, nn

from common.optim import optimise

__all__ = ["centred_block_init", "coarse_residual", "model_for_thread", "run_concurrently"]

T = TypeVar("T")
_LOCAL = threading.local()


def centred_block_init(x0: Tensor, n_chars: Tensor, frames_per_char: float, floor: float) -> Tensor:
    """x0 [R, B, F, T] with every frame outside a centred block of n_chars[b] * frames_per_char
    frames set just above the mel floor (silence); the block keeps x0."""
    t = x0.shape[-1]
    out = x0.clone()
    for k, n in enumerate(n_chars.tolist()):
        w = min(t, max(1, int(round(n * frames_per_char))))
        a = (t - w) // 2
        out[:, k, :, :a] = floor + 0.02
        out[:, k, :, a + w:] = floor + 0.02
    return out


def coarse_residual(x: Tensor, objective, *, factor: int, optimizer: str, lr: float, iterations: int,
                    extra: list[Tensor]) -> None:
    """Coarse-to-fine in time (our addition, issue 21): ``iterations`` of ``optimizer`` on a residual c [..., T/factor + 1]
    of x [..., T] held at 1/``factor`` of the frame rate, x + interp(c) with linear interpolation over time, so only
    slow temporal components move; x is updated in place to x + interp(c) (then searched frame by frame as usual)."""
    t = x.shape[-1]
    lead = x.shape[:-1]
    c = torch.zeros((*lead, t // factor + 1), dtype=x.dtype, device=x.device, requires_grad=True)

    def up(cv: Tensor) -> Tensor:
        flat = cv.reshape(-1, 1, cv.shape[-1])
        return nn.functional.interpolate(flat, size=t, mode="linear", align_corners=True).reshape(*lead, t)

    base = x.detach().clone()
    optimise([c, *extra], lambda: objective(base + up(c)), optimizer=optimizer, lr=lr, iterations=iterations,
             history_size=50)
    with torch.no_grad():
        x.copy_(base + up(c.detach()))


def model_for_thread(model: nn.Module) -> nn.Module:
    """The model a job of :func:`run_concurrently` must use: its thread's own copy, or ``model`` outside such a job."""
    copies = getattr(_LOCAL, "copies", None)
    if copies is None:
        return model
    if id(model) not in copies:
        copies[id(model)] = copy.deepcopy(model)
    return copies[id(model)]


def run_concurrently(jobs: Sequence[Callable[[], T]], threads: int) -> list[T]:
    """Every job's result, in order: sequentially when ``threads`` <= 1 (or one job), else on up to ``threads`` Python
    threads, each with its own model copies (:func:`model_for_thread`) and ``max(1, torch threads // threads)``
    intra-op threads; the caller's thread count is restored afterwards. An exception in a job propagates."""
    if threads <= 1 or len(jobs) <= 1:
        return [job() for job in jobs]
    n = min(threads, len(jobs))
    outer = torch.get_num_threads()
    inner = max(1, outer // n)

    def init() -> None:
        torch.set_num_threads(inner)
        _LOCAL.copies = {}

    try:
        with ThreadPoolExecutor(n, initializer=init) as pool:
            return list(pool.map(lambda job: job(), jobs))
    finally:
        torch.set_num_threads(outer)
