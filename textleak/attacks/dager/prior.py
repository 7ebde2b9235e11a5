"""DAGER's embedding prior for encoders (an addition): where each batch token sits, read from the
word- and position-embedding updates, and the candidate lists it allows."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from common.types import Observation
from textleak.models import max_length

from .config import PRIOR_CONCENTRATION, PRIOR_NOISE_FACTOR, PRIOR_RELATIVE, PRIOR_SHARPNESS
from .run import declared_sigma

PriorFit = tuple[list[int], Tensor]  # (batch token ids, coefficients C[position, token])



def learned_position_table(model: nn.Module) -> nn.Embedding | None:
    """The model's learned position-embedding table (an Embedding beside the word table with one row
    per position and the same width), found by identity; None for models without one (RoPE)."""
    word = model.get_input_embeddings()
    n_pos = max_length(model)
    return next((m for m in model.modules() if isinstance(m, nn.Embedding) and m is not word
                 and m.num_embeddings == n_pos and m.embedding_dim == word.embedding_dim), None)


def embedding_updates(obs: Observation, model: nn.Module) -> tuple[Tensor, Tensor] | None:
    """The observed updates of the word and learned position tables (float64, cpu), found by
    identity; None when the model has no learned position table or either update is not observed."""
    word, pos = model.get_input_embeddings(), learned_position_table(model)
    if pos is None:
        return None
    names = {id(p): n for n, p in model.named_parameters()}
    gw, gp = obs.tensors.get(names.get(id(word.weight), "")), obs.tensors.get(names.get(id(pos.weight), ""))
    if gw is None or gp is None:
        return None
    return gw.detach().double().cpu(), gp.detach().double().cpu()


def embedding_prior(obs: Observation, model: nn.Module, positions: int) -> PriorFit | None:
    """Least-squares position coefficients of every batch token from the embedding updates.

    For learned absolute positions the embedding sum ``w_t + P_p`` gets the same gradient
    ``e_o`` in the word row of ``t`` and the position row of ``p`` for every occurrence ``o``:
    ``dW_word[t] = sum_{o: t} e_o`` and ``dP[p] = sum_{o at p} e_o``. The nonzero word rows are
    the batch's token set; a token that occurs once has ``dW_word[t] = e_o`` exactly, so
    regressing each position row on the word rows gives it a coefficient near 1 at its position
    and near 0 elsewhere (the coefficients of a token sum to 1 over positions; a repeated token's
    mass is spread over its positions). Returns ``(token ids, C[position, token])`` or None when
    the model has no learned position table, the rows are not observed, or the word update is
    dense (tied output embedding, undeclared noise), so that no token set can be read from it.
    Under a declared Gaussian noise (sigma), the batch rows are those whose norm exceeds
    ``PRIOR_NOISE_FACTOR * sigma * sqrt(d)`` (a noise-only row has norm ~ sigma sqrt(d)).
    """
    tables = embedding_updates(obs, model)
    if tables is None:
        return None
    gw, gp = tables[0], tables[1][:positions]
    sigma = declared_sigma(obs)
    # a declared Gaussian noise fills every row, with norm ~ sigma sqrt(d) (relative spread
    # ~ 1 / sqrt(2d)); the batch's rows are those standing out above it
    floor = PRIOR_NOISE_FACTOR * sigma * math.sqrt(gw.shape[1])
    toks = torch.nonzero(gw.norm(dim=1) > floor).flatten()
    if toks.numel() == 0 or toks.numel() >= gw.shape[1]:
        return None
    coef = torch.linalg.lstsq(gw[toks].t(), gp.t()).solution.t()  # [positions, tokens]
    return toks.tolist(), coef


def prior_lists(fit: PriorFit | None, l1) -> list[list[int]] | None:
    """Layer-1 candidates restricted to the batch token set and to the positions the embedding
    prior allows (repeated tokens everywhere), ordered by their relative coefficient."""
    if fit is None:
        return None
    toks, coef = fit
    idx = {t: i for i, t in enumerate(toks)}
    peak = coef.max(0).values.clamp_min(1e-12)
    rel = coef / peak
    out = []
    for p, (cands, _) in enumerate(l1):
        if p >= coef.shape[0]:
            out.append([t for t in cands if t in idx])
            continue
        keep = [t for t in cands if t in idx and (float(peak[idx[t]]) < PRIOR_CONCENTRATION
                                                  or float(rel[p, idx[t]]) >= PRIOR_RELATIVE)]
        keep.sort(key=lambda t: -float(rel[p, idx[t]]))
        out.append(keep or [t for t in cands if t in idx] or list(cands))
    return out


class PriorWeight:
    """Soft-suffix weight of token ``t`` at position ``p``: ``1e-6 + max(relative coefficient, 0)
    ** PRIOR_SHARPNESS`` under the prior (1 without it), times 0.05 for a token that a clearly
    accepted sentence already holds at ``p`` (``removed``, shared with the search; ``removed_factor``
    replaces 0.05: the ranked encoder search makes it a strong penalty, see ``encoder.USED_PENALTY``)."""

    def __init__(self, fit: PriorFit | None, removed: dict[int, set[int]], *, removed_factor: float = 0.05) -> None:
        self.removed = removed
        self.factor = removed_factor
        self.idx = None if fit is None else {t: i for i, t in enumerate(fit[0])}
        self.rel = None if fit is None else (fit[1] / fit[1].max(0).values.clamp_min(1e-12)).clamp(0.0, 1.0)

    def __call__(self, p: int, t: int) -> float:
        if self.idx is None:
            return self.factor if t in self.removed.get(p, ()) else 1.0
        i = self.idx.get(t)
        w = 1e-6 + (float(self.rel[p, i]) ** PRIOR_SHARPNESS if i is not None and p < self.rel.shape[0] else 0.0)
        return w * (self.factor if t in self.removed.get(p, ()) else 1.0)
