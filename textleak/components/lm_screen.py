"""A swap round's LM scores with the float32 LM run only where a candidate can still win (``lm_screen``).

LAMP's discrete step takes the argmin of ``score_i = rec_i + coeff · (nll_i + other) / B`` over a round's
proposals (``rec``: gradient distance; ``nll``: the LM prior's mean NLL of the candidate text). The float32 LM
forward of every new text was about half of a 2,000-step ``lamp-cos`` run's time beyond its continuous steps
(issue 18). :func:`screen` first scores the texts without a float32 NLL under a cheap LM (the caller's
``rough``: the same LM under bf16 autocast, ~2x faster on CPUs with bf16 instructions, NLLs within 0.05 nats of
float32 on the development rounds), then runs the float32 LM (``exact``) only on the texts of candidates that can
still be the argmin if every rough NLL is within ``margin`` nats of its float32 value:

    lower_i = p_i − coeff · e_i / B,  upper_i = p_i + coeff · e_i / B,  kept: lower_i <= min_j upper_j

(``p``: the score with the rough or known NLL, ``e_i = margin`` for a rough one, 0 for a known one). The argmin
over the kept candidates' float32 scores is then the argmin over all of them (a candidate outside can only
win if its rough NLL is off by more than ``margin``); the caller scores the kept ones as before, the rest
``+inf``. The float32 NLLs come from a call on fewer texts than before, so they differ from the all-texts call
by float rounding only (~1e-6 nats, as :mod:`.lm_prefix`'s trie does); nothing else about the round changes.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["screen"]


def screen(rec: Tensor, texts: Sequence[str], *, exact: Callable[[list[str]], Tensor],
           rough: Callable[[list[str]], Tensor], known: Mapping[str, float], coeff: float, other: float,
           batch: int, margin: float, min_new: int = 24) -> Tensor:
    """The candidates (a bool mask over ``texts``) that can be the argmin of ``rec + coeff · (nll + other) / batch``
    if every rough NLL is within ``margin`` nats of the float32 one (see the module docstring); ``exact`` has then
    been called on the kept texts not in ``known`` (the caller's float32 cache, which ``exact`` fills), ``rough`` on
    every text not in ``known``; each on a list of distinct texts, at most once. Fewer than ``min_new`` new texts:
    no screen (``exact`` on all of them, every candidate kept): each LM call has a fixed cost (~0.2 CPU s for
    SmolLM2: the packed weights' de-quantisation and the head), which two calls on a few texts would pay twice."""
    todo = sorted({t for t in texts if t not in known})
    if len(todo) < min_new:
        if todo:
            exact(todo)
        return torch.ones(len(texts), dtype=torch.bool)
    approx = dict(zip(todo, rough(todo).tolist())) if todo else {}
    nll = torch.tensor([known[t] if t in known else approx[t] for t in texts], dtype=torch.float64)
    err = torch.tensor([0.0 if t in known else margin for t in texts], dtype=torch.float64)
    p = rec.to(torch.float64) + coeff * (nll + other) / batch
    half = coeff * err / batch
    keep = (p - half) <= (p + half).min()
    need = sorted({texts[i] for i in keep.nonzero().flatten().tolist() if texts[i] not in known})
    if need:
        exact(need)
    return keep
