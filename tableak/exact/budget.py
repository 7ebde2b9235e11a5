"""The exact stage's time budget (``TabularExactConfig.time_budget``).

Every loop of the exact stage whose length depends on the update (span enumeration chunks, root
search starts and iterations, peeling rounds, per-example gradients) calls ``Deadline.check``; past
the budget it raises ``OutOfTime``, which ``TabularExact.reconstruct`` turns into the TabLeak
fallback seeded with the rows certified so far (a declared-noise update used to run for > 9 minutes
on one Adult B = 32 batch with no bound at all).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass


class OutOfTime(Exception):
    """The exact stage ran past its time budget."""


@dataclass(frozen=True)
class Deadline:
    end: float = math.inf  # ``time.perf_counter()`` value past which ``check`` raises

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.perf_counter() + seconds)

    @property
    def expired(self) -> bool:
        return time.perf_counter() > self.end

    def check(self) -> None:
        if self.expired:
            raise OutOfTime


NEVER = Deadline()
