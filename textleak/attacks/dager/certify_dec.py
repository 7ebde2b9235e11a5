"""Certificates for the ranked decoder search's sentences on rotary models (issue 20, an addition; our own code).

Past the rank limit (``frontier.py``) no span test is exact, so no sentence of the ranked search was certified.
When only layer 2 is saturated, layer 1 is not: on a rotary model (position-free first layer) its observed update
``M = sum_i g_i x_i^T`` (``g_i`` the Q/K/V output gradients at position ``i``, ``x_i`` the normalised word row of its
token) is ``sum_t C_t x_t^T`` over the batch's distinct predicting tokens ``t``, whose rows ``x_t`` are linearly
independent (fewer than the width), so each token's coefficient ``C_t = M pinv(X)`` is read exactly (on a SmolLM2
B=32 development batch the 493 token directions explain ``M`` to a relative 1.3e-8).

Under FedSGD the client's loss is the mean over the batch of per-sentence losses, so a sentence ``s`` adds
``D_s / B`` to those coefficients, ``D_{s,t}`` the sum of its own ``g_i`` at the positions holding ``t``, computed
by one forward and backward of ``s`` alone. If ``s`` is a sentence of the batch and ``t`` occurs in no other,
``C_t - D_{s,t} / B`` vanishes up to the client's float32 round-off; any other sentence changes every ``g_i`` of
its own (causal attention: a different later token, end, or length changes the backward at every earlier position),
so no coefficient vanishes. ``certify`` accepts a sentence when one of its tokens' relative residual
``|C_t - D_{s,t}/B| / |C_t|`` is under ``CERT_TOL``, subtracts its terms (tokens shared with an accepted sentence
can then vanish for the other), and repeats until nothing more is accepted.

Development measurement (SmolLM2-135M B=32, seed 0 trial 0, float64 terms, ``bench/dager_peel_oracle.py``): the 32
true sentences score 3.3e-6 to 3.5e-5 (every one holds a token of its own: 3 to 27); near misses score at least
2.7e-2 (the true sentence one token short: 2.7e-2 to 0.26; with another last token: 3.5e-2 to 0.14; two tokens
swapped: 7.9e-2 to 0.53), and the 28 wrong sentences of the ranked search 0.21 to 2.5. ``CERT_TOL`` = 1e-3 sits
between them. A sentence whose tokens all occur in other sentences that are not accepted stays uncertified.

Applies to decoders under a noise-free FedSGD gradient (no declared defense) with the batch size, a rotary (position-
free) first layer and an unsaturated layer 1; elsewhere every flag is False (as before).
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from common.types import Batch, Observation

from .span import LayerInputs, first_layer_vectors, model_device, observed_matrix

CERT_TOL = 1e-3  # a token's relative residual under this certifies its sentence (true: <= 3.5e-5; wrong: >= 2.7e-2)


def applies(obs: Observation, prior: Any, stats: dict[str, float], kind: str, position_free: bool) -> bool:
    """A decoder, a noise-free FedSGD gradient with the batch size, a rotary first layer that is not saturated."""
    return (kind != "encoder" and obs.kind == "gradient" and not obs.defenses and obs.num_examples is not None
            and position_free and not stats.get("saturated_l1") and getattr(prior, "loss_fn", None) is not None)


def flags(c: Any, l1, sents: list[list[int]]) -> list[bool]:
    """``certify`` where it ``applies`` and ``DagerConfig.certify`` is on (``c``: the attack's context, ``l1``: layer 1's
    exact candidate lists), else every flag False."""
    if not l1 or not c.run.config.certify or not applies(c.obs, c.prior, c.run.stats, c.kind, c.position_free):
        return [False] * len(sents)
    c.run.l1_tokens = list(l1[0][0])
    return certify(c.obs, c.model, c.prior, c.li1, c.run.l1_tokens, sents, c.run.stats)


def certify(obs: Observation, model: nn.Module, prior: Any, li1: LayerInputs, tokens: list[int],
            sents: list[list[int]], stats: dict[str, float] | None = None) -> list[bool]:
    """Per sentence of ``sents``: certified (module docstring). ``tokens``: the batch's predicting tokens (layer 1's
    exact candidate list). ``stats`` gets ``cert_accepted`` and the largest accepted / smallest rejected score."""
    c0 = time.process_time()
    flags = [False] * len(sents)
    todo = [i for i, s in enumerate(sents) if len(s) >= 2]
    if not tokens or not todo:
        return flags
    col = {t: j for j, t in enumerate(tokens)}
    mods = [(m, n) for m, n in zip(li1.tap.modules, li1.tap.names) if n and n in obs.tensors]
    x = first_layer_vectors(li1, torch.tensor(tokens), 0).double()  # [T, d]
    coef = observed_matrix(li1.tap, obs.tensors) @ torch.linalg.pinv(x.t()).t()  # [out, T]
    proto = obs.protocol
    scale = 1.0 / float(obs.num_examples) if proto is None or proto.loss_reduction == "mean" else 1.0
    terms = _terms(model, prior, mods, [sents[i] for i in todo], col, scale)
    score = {}

    def rel(i: int) -> float:
        cols, d = terms[i]
        if cols is None:
            return float("inf")
        c = coef[:, cols]
        return float(((c - d).norm(dim=0) / c.norm(dim=0).clamp_min(1e-300)).min())

    pending = list(range(len(todo)))
    accepted: list[float] = []
    while pending:
        score = {i: rel(i) for i in pending}
        new = sorted((i for i in pending if score[i] < CERT_TOL), key=lambda i: score[i])
        if not new:
            break
        for i in new:
            r = rel(i)
            if r < CERT_TOL:  # (again: an earlier acceptance may have taken its token)
                accepted.append(r)
                cols, d = terms[i]
                coef[:, cols] -= d
                flags[todo[i]] = True
                pending.remove(i)
    if stats is not None:
        stats["cert_accepted"] = float(sum(flags))
        stats["cert_cpu_s"] = time.process_time() - c0
        stats["cert_accepted_max"] = max(accepted, default=0.0)
        stats["cert_rejected_min"] = min((v for i, v in score.items() if i in pending), default=float("inf"))
    return flags


def _terms(model: nn.Module, prior: Any, mods: list[tuple[nn.Module, str]], sents: list[list[int]],
           col: dict[int, int], scale: float) -> list[tuple[Tensor | None, Tensor | None]]:
    """Per sentence: the columns of its predicting tokens and their terms ``scale * D_{s,t}`` [out, n] (float64),
    from one batched forward and backward (right padding; sentences do not interact), through hooks on the
    tapped projections' outputs. (None, None) for a sentence holding a token outside ``col``."""
    dev = model_device(model)
    n, width = len(sents), max(len(s) for s in sents)
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, s in enumerate(sents):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    outs: list[Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _a, o: outs.append(o)) for m, _ in mods]
    try:
        with torch.enable_grad():
            embeds = model.get_input_embeddings()(ids.to(dev)).detach().requires_grad_(True)  # (a graph without
            # trainable parameters still reaches the projections' outputs)
            batch = Batch({"inputs_embeds": embeds, "attention_mask": mask.to(dev), "targets": ids.to(dev)})
            loss = prior.loss_fn(model, batch).sum() * scale
            grads = torch.autograd.grad(loss, outs[: len(mods)])
    finally:
        for h in hooks:
            h.remove()
    # the update of W (out x in) is sum_i g_i x_i^T: g of each module in the tap's stacking order
    g = torch.cat(grads, -1).double().cpu()  # [n, width, out] (a projection's output is in the update's row order)
    out: list[tuple[Tensor | None, Tensor | None]] = []
    for i, s in enumerate(sents):
        pred = s[:-1]  # the last position predicts nothing: its terms are zero
        if any(t not in col for t in pred):
            out.append((None, None))
            continue
        uniq = sorted(set(pred))
        where = {t: k for k, t in enumerate(uniq)}
        d = torch.zeros(len(uniq), g.shape[-1], dtype=torch.float64).index_add_(
            0, torch.tensor([where[t] for t in pred]), g[i, : len(pred)])
        out.append((torch.tensor([col[t] for t in uniq]), d.t()))
    return out

