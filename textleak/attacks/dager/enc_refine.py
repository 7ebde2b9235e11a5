"""Suffix exchange between the ranked encoder search's sentences (an addition, issue 20).

Under a declared Gaussian noise the encoder beam (``beam.py``) threads one sentence at a time through
per-position lists that hold every sentence's tokens. Its typical error on MiniLM at B=4, sigma=1e-5
(development batches, seed 0) is a *stitch*: the prefix of one sentence continued by the suffix of
another, e.g. ``a portrait of alienation so perfect, it will certainly succeed - baseball - playing monkey
was worse.``, with the matching error in the sentence that got the other suffix. Single-token repairs
cannot undo it. Here every pair of accepted sentences is tried with their suffixes exchanged at every cut
``c`` (``s1[:c] + s2[c:]`` and ``s2[:c] + s1[c:]``; the lengths travel with the suffixes), and an exchange
is kept when it lowers the pair's summed squared layer-2 distance (the same positions are scored before
and after, so the sums compare across lengths). This uses the whole batch jointly, in the spirit of
SOMP's and TIGER's joint fits (Li & Li, arXiv 2603.16761; Kalikman et al., arXiv 2606.18312); it is our
own rule, not theirs.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor

from .beam import repair
from .deep import DEEP_REFINE, DeepScore, refine
from .run import Run
from .span import LayerInputs, Span, model_device, span_distance

EXCHANGE_SWEEPS = 3  # passes over all pairs at most


def sq_scores(li2: LayerInputs, span2: Span, seqs: list[list[int]]) -> Tensor:
    """Summed squared layer-2 distance of each sequence (any lengths; grouped by length)."""
    out = torch.zeros(len(seqs), dtype=torch.float64)
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        by_len.setdefault(len(s), []).append(i)
    dev = model_device(li2.model)
    for idx in by_len.values():
        for k in range(0, len(idx), 128):
            part = idx[k:k + 128]
            x = li2(torch.tensor([seqs[i] for i in part], device=dev))  # [n, L, d]
            d = span_distance(span2.basis, x.reshape(-1, x.shape[-1])).view(x.shape[0], x.shape[1])
            out[torch.tensor(part)] = d.double().pow(2).sum(1).cpu()
    return out


def layer2_scorer(li2: LayerInputs, span2: Span) -> Callable[[list[list[int]]], Tensor]:
    """The summed squared layer-2 distance as an ``exchange_suffixes`` scorer."""
    return lambda seqs: sq_scores(li2, span2, seqs)


def exchange_suffixes(run: Run, scorer: Callable[[list[list[int]]], Tensor], sents: list[list[int]], *,
                      allowed: Callable[[list[list[int]]], bool] | None = None) -> tuple[list[list[int]], int]:
    """Exchange suffixes between pairs of ``sents`` while the pair's summed score drops (``scorer``: summed
    squared distances per sequence, e.g. ``layer2_scorer`` or ``deep.DeepScore.sums``; see the module
    docstring); an exchange whose result ``allowed`` refuses (the whole set) is not made. Returns the sentences and
    how many exchanges were made."""
    cur = [list(s) for s in sents]
    if len(cur) < 2:
        return cur, 0
    own = scorer(cur)
    made = 0
    for _ in range(EXCHANGE_SWEEPS):
        changed = False
        for i in range(len(cur)):
            for j in range(i + 1, len(cur)):
                if run.over_budget():
                    return cur, made
                a, b = cur[i], cur[j]
                # a cut where the prefixes agree (the shared [CLS], say) would only swap the two sentences
                cuts = [c for c in range(1, min(len(a), len(b)) - 1) if a[c:] != b[c:] and a[:c] != b[:c]]
                if not cuts:
                    continue
                trial = [x for c in cuts for x in (a[:c] + b[c:], b[:c] + a[c:])]
                sc = scorer(trial).view(len(cuts), 2).sum(1)
                k = int(sc.argmin())
                c = cuts[k]
                ni, nj = a[:c] + b[c:], b[:c] + a[c:]
                if allowed is not None and not allowed(cur[:i] + [ni] + cur[i + 1:j] + [nj] + cur[j + 1:]):
                    continue
                if float(sc[k]) < float(own[i] + own[j]) * (1.0 - 1e-9):
                    cur[i], cur[j] = ni, nj
                    own[i], own[j] = scorer([cur[i], cur[j]])
                    made += 1
                    changed = True
        if not changed:
            break
    return cur, made


def finish_ranked(run: Run, li2: LayerInputs, span2: Span, deep: DeepScore | None, sents: list[list[int]],
                  wide_for: Callable[[int], list[list[int]]], *, repairs: bool = True) -> tuple[list[list[int]], int]:
    """The ranked encoder search's last step on its accepted ``sents``: with the deep attention-context score
    (``deep.py``: declared Gaussian noise) and ``deep.DEEP_REFINE`` suffix exchanges and repairs by that score,
    else suffix exchanges by the layer-2 score and (``repairs``) single-token repairs to no further layer-2 gain.
    Returns the sentences and how many changes were made (``run.stats``: ``suffix_exchanges``, ``deep_refine``)."""
    if DEEP_REFINE and deep:
        c0 = time.process_time()
        new, made = refine(run, deep, sents, wide_for, exchange_suffixes)
        run.stats.update(deep_refine=float(made), deep_refine_cpu_s=time.process_time() - c0,
                         deep_scored=float(deep.scored), deep_tokens=float(deep.tokens))
        return new, made
    new, made = exchange_suffixes(run, layer2_scorer(li2, span2), sents)
    run.stats["suffix_exchanges"] = float(made)
    if repairs:  # single-token repairs run to the end (no distance certifies a sentence here)
        tau, run.tau = run.tau, (run.tau[0], 0.0)
        fixed = [repair(run, s, wide_for(len(s)), li2, span2)[0] for s in new]
        run.tau = tau
        made += sum(a != b for a, b in zip(fixed, new))
        new = fixed
    return new, made
