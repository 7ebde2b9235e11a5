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
