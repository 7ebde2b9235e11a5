"""Peeling for DAGER's encoders under FedSGD (explain-away, an addition to the reference).

Each time the encoder search clearly accepts sentences, their exact gradient (one float64
per-example backward, the label chosen by the rank drop it causes) is subtracted from the observed
update and the remaining B - k sentences are searched with the embedding prior of the residual.
There the found sentences' tokens are gone, so tokens that were repeated across sentences become
unique, the batch token set shrinks, and the candidate lists with it (on MiniLM at B=8 from ~20
per position to ~2 after six sentences).

The spans and layer-1 lists stay those of the observed update: the residual also holds the
client's own float32 round-off of each peeled sentence (~1e-6 of its gradient, in that sentence's
input directions), which on some batches sits at the level of the weakest true singular values
and would make the residual's numerical rank, and so its span, unreliable.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable

import torch
from torch import nn

from common.types import Batch, Observation

from . import encoder
from .run import Run
from .span import LayerInputs, Span, Tap, model_device, observed_matrix, span_of


def can_peel(obs: Observation, prior: Any) -> bool:
    """Peeling needs the exact FedSGD gradient of a known loss: a gradient observation whose only
    declared defense (if any) is additive Gaussian noise, the batch size, and the prior's loss."""
    return (obs.kind == "gradient" and obs.num_examples is not None
            and getattr(prior, "loss_fn", None) is not None
            and all(d.get("name") == "gaussian" for d in obs.defenses or ()))


def search(run: Run, obs: Observation, model: nn.Module, li2: LayerInputs, span2: Span, l1, prior: Any,
           b: int | None, tap1: Tap, f64: Callable[[], nn.Module]) -> encoder.Found:
    """The encoder search, peeling clearly recovered sentences while it can (``can_peel``); ``f64`` gives the
    float64 copy of the model (made once, when first needed)."""
    if not can_peel(obs, prior):
        return encoder.search(run, obs, model, li2, span2, l1, prior, b)
    pool: dict[tuple[int, ...], float] = {}
    peeled: list[list[int]] = []
    failed: dict[int, int] = {}
    cur = obs
    while True:
        rest = None if b is None else b - len(peeled)
        sents, scores = encoder.search(run, cur, model, li2, span2, l1, prior, rest, stop_early=True,
                                       failed=failed, exclude=frozenset(tuple(x) for x in peeled))
        for x, v in zip(sents, scores):
            pool[tuple(x)] = min(v, pool.get(tuple(x), math.inf))
        clear = [x for x, v in sorted(zip(sents, scores), key=lambda z: z[1])
                 if v <= 0.1 * run.tau[1]]  # (peeled sentences are excluded by the search)
        if not clear or run.over_budget() or (rest is not None and len(clear) >= rest):
            break
        # per-example gradients in float64, so that the residual carries only the client's own
        # round-off, not ours as well
        nxt = peel(cur, f64(), prior, clear, tap1)
        if nxt is None:
            break
        cur, done = nxt
        peeled.extend(done)
        run.stats["peeled"] = float(len(peeled))
    sents = [list(x) for x in pool]
    return sents, [pool[tuple(x)] for x in sents]


def peel(obs: Observation, gmodel: nn.Module, prior: Any, seqs: list[list[int]],
         tap1: Tap) -> tuple[Observation, list[list[int]]] | None:
    """Subtract the exact per-example gradients of ``seqs`` (computed on ``gmodel``, the float64
    copy of the model) from ``obs``; returns the residual observation and the sentences peeled,
    or None when no sentence lowers the rank of the layer-1 update (``tap1``).

    The label of a sentence is the class whose gradient, subtracted, leaves the lowest layer-1
    rank (the true label removes the sentence's own input directions; a wrong one leaves a
    difference term in the same directions). Embedding-table rows that the subtraction explains
    (residual under 1e-4 of the subtracted row: float round-off) are set to exactly zero, so
    the embedding prior reads the remaining token set."""
    params = dict(gmodel.named_parameters())
    names = [n for n in obs.tensors if n in params and params[n].requires_grad]
    scale = loss_scale(obs)
    tables = embedding_tables(gmodel, names)
    n_labels = int(getattr(prior, "num_labels", None) or 2)
    tensors = dict(obs.tensors)
    rank = span_of(observed_matrix(tap1, tensors)).rank
    tap_names = [n for n in tap1.names if n and n in tensors]
    done: list[list[int]] = []
    for seq in seqs:
        best = None
        for y in range(n_labels):
            # the label's test needs the tap's rows only (issue 18: the whole residual, every parameter in
            # float64, is formed once, for the label chosen; the tap's rows are computed as there)
            g_by = example_grads(gmodel, prior, seq, y, names, scale)
            mat = observed_matrix(tap1, {**tensors, **_residual(tensors, g_by, tap_names, tables)})
            r_rank = span_of(mat).rank
            key = (r_rank, float(mat.norm()))
            if best is None or key < best[0]:
                best = (key, g_by)
        if best is None or best[0][0] >= rank:
            continue
        tensors, rank = {**tensors, **_residual(tensors, best[1], names, tables)}, best[0][0]
        done.append(seq)
    if not done:
        return None
    return replace(obs, tensors=tensors), done


def loss_scale(obs: Observation) -> float:
    """The factor of one example's loss in the observed FedSGD gradient: 1 / B under a mean reduction."""
    proto = obs.protocol
    return 1.0 / obs.num_examples if proto is None or proto.loss_reduction == "mean" else 1.0


def embedding_tables(gmodel: nn.Module, names: list[str]) -> set[str]:
    """The parameters among ``names`` that are ``nn.Embedding`` tables of ``gmodel``."""
    params = dict(gmodel.named_parameters())
    return {n for n in names if any(m.weight is params[n] for m in gmodel.modules() if isinstance(m, nn.Embedding))}


def example_grads(gmodel: nn.Module, prior: Any, seq: list[int], y: int, names: list[str], scale: float) -> dict:
    """The exact gradient of one example ``seq`` with label ``y`` (``scale`` times its loss) for the parameters
    ``names`` of ``gmodel`` (the float64 copy of the model)."""
    params = dict(gmodel.named_parameters())
    dev = model_device(gmodel)
    batch = Batch({"input_ids": torch.tensor([seq], device=dev),
                   "attention_mask": torch.ones(1, len(seq), dtype=torch.long, device=dev)},
                  torch.tensor([y], device=dev))
    with torch.enable_grad():
        loss = prior.loss_fn(gmodel, batch).sum() * scale
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    return dict(zip(names, grads))


def _residual(tensors: dict, grads: dict, names: list[str], tables: set[str]) -> dict:
    """``tensors[n] - grads[n]`` (float64, stored in the observation's dtype) for ``names``; embedding-table
    rows that the subtraction explains (residual under 1e-4 of the subtracted row) set to exactly zero."""
    out = {}
    for n in names:
        g = grads.get(n)
        if g is None:
            continue
        t = tensors[n]
        g = g.detach().to(t.device).double()
        r = t.double() - g
        if n in tables:
            sub = g.norm(dim=-1)
            r[(sub > 0) & (r.norm(dim=-1) <= 1e-4 * sub)] = 0.0
        out[n] = r.to(t.dtype)
    return out
