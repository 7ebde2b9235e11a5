"""The order in which DAGER's encoder search tries sentence lengths (issue 18; an addition to the reference).

Every position where the separator passes layer 1 gives a candidate length, and on MiniLM at B=8 that is
~45 lengths for 8 sentences: the separator passes layer 1 almost everywhere (the span argument of
``encoder``'s docstring), and every false length costs a full beam. The embedding updates say where the
separator is. With ``e_o`` the gradient at the embedding output of occurrence ``o``, the word row of a token
is ``W[t] = sum_{o: t} e_o`` and the position row ``P[p] = sum_{o at p} e_o``. Project both onto the
orthogonal complement of the other batch tokens' word rows (``'``): for a token that occurs once, ``e_o =
W[t]`` vanishes there, so ``P'[p]`` holds the separators ending at ``p`` (plus what repeated tokens leave)
and ``W'[sep]`` all of them. The *cosine* of ``P'[p]`` with ``W'[sep]`` is the order's key.

The prior's least-squares coefficient of the separator at ``p`` (the order before) is ``<P'[p], W'[sep]> /
|W'[sep]|^2`` (Frisch-Waugh); the cosine divides out ``|P'[p]|``, which is large wherever repeated tokens
leave a residual, so positions with a large unexplained row no longer rank high for that reason alone. On
development batches (MiniLM B=8, seeds 0-2, peeling simulated) the cosine ranks the true lengths at or above
the coefficient's ranks in most states, and the remaining true lengths first once a few sentences are peeled.

Peeling rounds then try the lengths by ``cosine * FAILED_DECAY ** failures``: a length that found nothing
before is tried later, but no longer after every never-tried length (the rule before: each round then swept
through most false lengths before it came back to a true length that had failed while its lists were wide).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from common.types import Observation

from .prior import PriorFit, embedding_updates

#: peeling rounds: a length's key is multiplied by this for every earlier round in which it found nothing
FAILED_DECAY = 0.5


def separator_affinity(obs: Observation, model: nn.Module, fit: PriorFit | None, sep: int | None,
                       positions: int) -> Tensor | None:
    """``cos(P'[p], W'[sep])`` for ``p < positions`` (see the module docstring), float64; None without the
    prior's fit, the separator among its tokens, or a separator row outside the other tokens' span."""
    if fit is None or sep is None or sep not in fit[0]:
        return None
    tables = embedding_updates(obs, model)
    if tables is None:
        return None
    gw, gp = tables[0][fit[0]], tables[1][:positions]
    j = fit[0].index(sep)
    others = torch.cat([gw[:j], gw[j + 1:]])  # [n - 1, d]
    x = torch.cat([gw[j:j + 1], gp])  # [1 + positions, d]
    if others.shape[0]:
        x = x - (others.t() @ torch.linalg.lstsq(others.t(), x.t(), driver="gelsd").solution).t()
    s, rows = x[0], x[1:]
    if float(s.norm()) <= 1e-9 * float(gw[j].norm()):
        return None
    return (rows @ s) / (rows.norm(dim=1).clamp_min(1e-300) * s.norm())


def order(lengths: list[int], affinity: Tensor, failed: dict[int, int] | None) -> list[int]:
    """``lengths`` by decreasing ``affinity[length - 1]``, moved down by ``FAILED_DECAY`` per failure (a positive
    key multiplied by it, a negative one divided; stable)."""
    fails = failed or {}

    def key(n: int) -> float:
        a = float(affinity[n - 1]) if n - 1 < affinity.numel() else 0.0
        d = FAILED_DECAY ** fails.get(n, 0)
        return -(a * d if a > 0 else a / d)

    return sorted(lengths, key=key)


def longest(obs: Observation, model: nn.Module) -> int | None:
    """The longest sentence's length in ``obs``: one past the last nonzero row of the position-embedding update
    (rows of positions no sentence reaches get no gradient; peeling sets the rows it explains to exactly zero,
    ``peel.peel``); None without that update."""
    tables = embedding_updates(obs, model)
    if tables is None:
        return None
    rows = torch.nonzero(tables[1].abs().amax(1) > 0).flatten()
    return int(rows[-1]) + 1 if rows.numel() else None


def feasible(lengths: list[int], total: int, rest: int, top: int | None) -> set[int]:
    """The candidate ``lengths`` that can belong to ``rest`` sentences (lengths drawn from ``lengths``, repeats
    allowed) whose lengths sum to ``total`` and whose longest is ``top`` (None: unknown). In the exact regime
    the layer-2 rank is the batch's token count (every token's layer-2 input is distinct, padding gets no
    gradient): ``total`` is that rank less the lengths of the sentences already found."""
    if rest < 1 or total < 1:
        return set()
    cands = sorted({n for n in lengths if top is None or n <= top})
    reach = [1]  # reach[k]: bit s set when k candidate lengths can sum to s
    for _ in range(rest - 1):
        nxt = 0
        for n in cands:
            nxt |= reach[-1] << n
        reach.append(nxt & ((1 << (total + 1)) - 1))

    def can(k: int, s: int) -> bool:
        return k >= 0 and s >= 0 and bool(reach[k] >> s & 1)

    out = set()
    for n in cands:
        if top is None:
            ok = can(rest - 1, total - n)
        elif n == top:
            ok = can(rest - 1, total - n)
        else:
            ok = rest >= 2 and can(rest - 2, total - n - top)
        if ok:
            out.add(n)
    return out
