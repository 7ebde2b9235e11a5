"""Explicit randomness: library code takes a ``torch.Generator``, never the global RNG."""
from __future__ import annotations

import hashlib

import numpy as np
import torch


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts (e.g. base seed, trial, purpose)."""
    h = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def numpy_rng(generator: torch.Generator) -> np.random.Generator:
    """A NumPy generator seeded from (and advancing) a torch generator."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return np.random.default_rng(seed)
