"""Last-token completion for DAGER's decoders (an addition; the reference leaves the token out).

Under a next-token loss the last token of each sentence contributes no gradient to any attention
input (its output predicts padding), so no span method can see it. The output-embedding update
holds ``-e_y h^T`` (scaled) for the position predicting target ``y``: for a FedSGD gradient we
subtract the part the recovered prefixes explain (every known target, plus the softmax term
``p h^T`` of the last predicting position, computed with autograd under the kit's
per-sequence-mean next-token loss), so the residual is supported on the unknown targets' rows
only; each sentence takes the row most anti-aligned with its final hidden state, re-ranked by its
exact gradient term and fitted jointly over the batch (where ``last_exit.py`` certifies the outcome,
from the terms of only a few candidates). For FedAvg deltas the raw update is used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from common.types import Observation

from .config import LAST_TOKEN_CANDIDATES
from . import last_head
from .last_exit import certified_choice
from .span import _Stop, model_device

Terms = dict[int, Tensor]  # row of the output-embedding update -> the term's contribution


@dataclass
class Graph:
    """The packed residual forward kept for the candidates' terms: the output layer's input [R, T, d],
    the word embeddings it started from [R, T, d] (in the graph), each sentence's row and offset, and
    the sentence lengths."""
    hidden: Tensor
    embeds: Tensor
    rows: Tensor
    offs: Tensor
    lens: Tensor
    inputs: dict  # the forward's other arguments (attention mask, positions)


def complete_last(obs: Observation, model: nn.Module, sents: list[list[int]], *,
                  batched: bool = True, early_exit: bool = True) -> list[list[int]]:
    """Append the last token to every sentence (unchanged when the output embedding's update is
    not observed). ``batched``: the residual's forward on packed rows (``_residual``), and the
    candidates' input-side terms of every sentence from that same forward, in one backward per
    candidate rank over all sentences at once (``_packed_terms``); else a forward per sentence and
    one backward per (sentence, candidate) (the original). ``early_exit`` (with ``batched``): the
    certified choice of ``last_exit.py`` where it holds (the same tokens from about two backwards)."""
    out_emb = getattr(model, "get_output_embeddings", lambda: None)()
    if out_emb is None or not hasattr(out_emb, "weight"):
        return sents
    w = out_emb.weight
    name = next((n for n, p in model.named_parameters() if p is w), None)
    if name is None or name not in obs.tensors:
        return sents
    dev = model_device(model)
    exact = obs.kind == "gradient" and w.requires_grad
    g, v, denom, graph = _residual(obs, model, out_emb, obs.tensors[name], sents, exact, packed=batched)
    row_norm = g.norm(dim=1)  # (once: [V, d] in float64)
    k = LAST_TOKEN_CANDIDATES
    by_norm = row_norm.topk(min(k, g.shape[0])).indices.tolist()  # the residual's heaviest rows
    r_norm = float(row_norm.pow(2).sum().sqrt())
    hs = v  # the final hidden states (float64), before normalising them for the candidate search
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
    near = (-(g @ v.t()) / row_norm.clamp_min(1e-30).unsqueeze(1)).topk(min(k, g.shape[0]), dim=0).indices
    cands: list[list[int]] = []
    for i, s in enumerate(sents):
        cand = near[:, i].tolist()  # the rows most anti-aligned with the final hidden state
        cands.append(cand + [c for c in by_norm if c not in cand])
    if not exact or not any(len(c) > 1 for c in cands):
        return [s + [c[0]] for s, c in zip(sents, cands)]
    terms: list[list[Terms]] = []
    tied = model.get_input_embeddings().weight is w
    if early_exit and batched and graph is not None and tied:  # the exact early exit (last_exit.py), else every candidate's term
        got = certified_choice(model, graph, w, sents, cands, hs, g, r_norm, denom, row_sq=row_norm.square())
        if got is not None:
            return [s + [t] for s, t in zip(sents, got)]
    ges = _packed_terms(graph, w, sents, cands) if batched and graph is not None and tied else None
    for i, s in enumerate(sents):
        if len(cands[i]) > 1:
            if batched:
                cands[i], rows = _order(s, cands[i], hs[i], ges[i] if ges is not None else None, g, r_norm)
            else:
                cands[i], rows = _rank_last(model, w, s, cands[i], g, dev, r_norm=r_norm)
            terms.append([{r: t / (denom * len(s)) for r, t in rr.items()} for rr in rows])
    choice = _joint_fit(g, cands, terms, len(sents))
    return [s + [c[j]] for s, c, j in zip(sents, cands, choice)]


def _residual(obs: Observation, model: nn.Module, out_emb: nn.Module, update: Tensor, sents: list[list[int]],
              exact: bool, *, packed: bool = True, head: bool = True) -> tuple[Tensor, Tensor, float, Graph | None]:
    """The output-embedding update [V, d] (float64) less what the recovered prefixes explain (when
    ``exact``: a FedSGD gradient with a trainable output layer), the hidden states [n, d] at the
    output layer's input at each sentence's last position, and the loss denominator.

    ``packed``: the sentences sit end to end in rows as long as the longest one (first fit, longest
    first) with a block-diagonal causal mask and per-sentence positions, so each sees only itself as
    alone in a row (the same values up to float32 round-off) and the forward, the logits and the
    backward skip the padding of a right-padded batch (about half its positions at B=16); else the
    right-padded batch (the original). With ``packed`` and ``exact`` the forward starts from the word
    embeddings (the same values) and its graph is returned (``Graph``) for ``_packed_terms``. With ``packed``,
    ``exact`` and ``head`` the output layer's part is computed by ``last_head.packed_residual`` where the model
    allows it (the same residual up to float32 round-off, without autograd through the output layer)."""
    if packed and exact and head and last_head.supported(model, out_emb):
        return last_head.packed_residual(obs, model, out_emb, update, sents)
    w = out_emb.weight
    g = update.detach().to(torch.float64).cpu()  # [V, d]
    dev = model_device(model)
    n = len(sents)
    ids, pos, mask, rows, offs, lens = _packed_rows(model, sents, packed=packed)
    hid: list[Tensor] = []

    def hook(_m, args):
        hid.append(args[0])

    h = out_emb.register_forward_pre_hook(hook)
    inputs = {"input_ids": ids, "attention_mask": mask} | ({"position_ids": pos} if packed else {})
    keep = exact and packed
    e = None
    if keep:  # the word embeddings as an input of the graph (their gradient: the input-side terms)
        e = model.get_input_embeddings()(inputs.pop("input_ids"))
        inputs["inputs_embeds"] = e
    try:
        if exact:
            logits = model(**inputs).logits.float()
            # predicting positions with a known target: sentence i's offsets o .. o + len - 2
            per, col = _known_slots(offs, lens)
            lp = logits[rows[per], col].log_softmax(-1)  # [N, V]
            tgt = lp.gather(-1, ids[rows[per], col + 1].unsqueeze(-1)).squeeze(-1)
            loss_b = torch.zeros(n, dtype=lp.dtype, device=dev).index_add(0, per, -tgt)  # known targets
            last = logits[rows, offs + lens - 1].logsumexp(-1)  # softmax term of the last position
            loss_b = (loss_b + last) / lens.to(lp.dtype)  # the true sentence has len+1 tokens -> len targets
            denom = _loss_denom(obs, n)
            (gp,) = torch.autograd.grad(loss_b.sum() / denom, [w], retain_graph=keep)
            g = g - gp.detach().to(torch.float64).cpu()
        else:
            denom = 1.0
            with torch.no_grad():
                model(**inputs)
    finally:
        h.remove()
    graph = Graph(hid[0], e, rows, offs, lens, {k: x for k, x in inputs.items() if k != "inputs_embeds"}) if keep else None
    return g, hid[0][rows, offs + lens - 1].detach().to(torch.float64).cpu(), denom, graph


def _packed_rows(model: nn.Module, sents: list[list[int]], *, packed: bool = True):
    """``_pack`` on the model's device and dtype, each sentence's row, offset and length as tensors:
    (ids, positions, mask, rows, offsets, lengths)."""
    dev = model_device(model)
    ids, pos, mask, where = _pack(sents, dev, next(model.parameters()).dtype, packed=packed)
    rows = torch.tensor([r for r, _ in where], device=dev)
    offs = torch.tensor([o for _, o in where], device=dev)
    lens = torch.tensor([len(s) for s in sents], device=dev)
    return ids, pos, mask, rows, offs, lens


def _known_slots(offs: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:
    """The predicting positions with a known target: sentence ``per[j]`` at column ``col[j]`` (sentence i's
    offsets o .. o + len - 2)."""
    per = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens - 1)
    col = offs[per] + torch.cat([torch.arange(int(k) - 1, device=lens.device) for k in lens])
    return per, col


def _loss_denom(obs: Observation, n: int) -> float:
    """The client loss's denominator: the batch size for a mean reduction, else 1."""
    proto = obs.protocol
    return float(obs.num_examples or n) if (proto is None or proto.loss_reduction == "mean") else 1.0


def _pack(sents: list[list[int]], dev: torch.device, dtype: torch.dtype, *,
          packed: bool) -> tuple[Tensor, Tensor, Tensor, list[tuple[int, int]]]:
    """Token ids and positions [R, T], the attention mask ([R, 1, T, T] additive when ``packed``, else
    the [n, T] padding mask of one sentence per row) and each sentence's (row, offset)."""
    cap = max(len(s) for s in sents)
    if not packed:
        ids = torch.zeros(len(sents), cap, dtype=torch.long)
        mask = torch.zeros(len(sents), cap, dtype=torch.long)
        for i, s in enumerate(sents):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        return ids.to(dev), ids.to(dev), mask.to(dev), [(i, 0) for i in range(len(sents))]
    fill: list[int] = []
    where = [(0, 0)] * len(sents)
    for i in sorted(range(len(sents)), key=lambda i: -len(sents[i])):
        r = next((r for r, f in enumerate(fill) if f + len(sents[i]) <= cap), len(fill))
        if r == len(fill):
            fill.append(0)
        where[i] = (r, fill[r])
        fill[r] += len(sents[i])
    ids = torch.zeros(len(fill), cap, dtype=torch.long)
    pos = torch.zeros(len(fill), cap, dtype=torch.long)
    allow = torch.eye(cap, dtype=torch.bool).repeat(len(fill), 1, 1)  # padding sees itself
    for s, (r, o) in zip(sents, where):
        k = len(s)
        ids[r, o:o + k] = torch.tensor(s)
        pos[r, o:o + k] = torch.arange(k)
        allow[r, o:o + k, o:o + k] = torch.tril(torch.ones(k, k, dtype=torch.bool))
    mask = torch.zeros(allow.shape, dtype=dtype).masked_fill_(~allow, torch.finfo(dtype).min).unsqueeze(1)
    return ids.to(dev), pos.to(dev), mask.to(dev), where


def _rank_last(model: nn.Module, w: Tensor, s: list[int], cand: list[int], resid: Tensor,
               dev: torch.device, *, r_norm: float | None = None) -> tuple[list[int], list[Terms]]:
    """Order candidate last tokens by how well their exact gradient term explains the residual
    (``_order``), one sentence alone: its own forward (stopped at the output layer's input, so the
    backward never touches the vocabulary logits) and one backward per candidate (the original path).

    The term of target ``y`` in the update of ``w`` is ``-d logit_y / d w``: ``-h`` in row ``y``
    (output side) plus, when the input embedding is tied to ``w``, ``-d(w_y . h)/d x_t`` in the
    row of every input token ``x_t`` (input side).
    """
    emb = model.get_input_embeddings()
    tied = emb.weight is w
    ids = torch.tensor([s], device=dev)
    e = emb(ids).detach().requires_grad_(True)
    store: list[Tensor] = []

    def hook(_m, args):
        store.append(args[0])
        raise _Stop

    out_emb = model.get_output_embeddings()
    hnd = out_emb.register_forward_pre_hook(hook)
    try:
        with torch.enable_grad():
            model(inputs_embeds=e)
    except _Stop:
        pass
    finally:
        hnd.remove()
    h = store[0][0, -1]
    ges = torch.cat(_input_terms(h, e, w, cand, False)) if tied else None
    return _order(s, cand, h.detach().to(torch.float64).cpu(), ges, resid,
                  float(resid.norm()) if r_norm is None else r_norm)


def _order(s: list[int], cand: list[int], h64: Tensor, ges: Tensor | None, resid: Tensor,
           r_norm: float) -> tuple[list[int], list[Terms]]:
    """The candidates ordered by the cosine of their (unscaled) row terms with the residual, and those
    terms: ``-h64`` in row ``y`` plus ``-ges[j, t]`` [K, L, d] (``d(w_y . h) / d x_t``; None: untied)
    in the row of every input token."""
    scores, terms = [], []
    ge64 = ges.detach().to(torch.float64).cpu() if ges is not None else None
    for j, y in enumerate(cand):
        rows: Terms = {int(y): -h64.clone()}
        if ge64 is not None:
            for t, tokid in enumerate(s):
                g = -ge64[j, t]
                rows[int(tokid)] = rows[int(tokid)] + g if int(tokid) in rows else g
        terms.append(rows)
        dot = sum(float(resid[k] @ v) for k, v in rows.items())
        nrm = math.sqrt(sum(float(v @ v) for v in rows.values()))
        scores.append(dot / (r_norm * nrm + 1e-30))
    order = sorted(range(len(cand)), key=lambda j: -scores[j])
    return [cand[j] for j in order], [terms[j] for j in order]


def _packed_terms(graph: Graph, w: Tensor, sents: list[list[int]], cands: list[list[int]]) -> list[Tensor]:
    """``d(w_y . h_i) / d x_t`` [K_i, L_i, d] for every sentence ``i`` and candidate ``y`` of it, from the
    packed forward's graph: the j-th candidates of all sentences share one cotangent (each sentence's
    final hidden state gets its own candidate's row; the sentences do not see one another), so one
    backward per candidate rank gives every sentence's term, as a batch of cotangents
    (``is_grads_batched``; a loop over the ranks where an operation has no batching rule)."""
    hid, e = graph.hidden, graph.embeds
    last = graph.offs + graph.lens - 1
    kmax = max(len(c) for c in cands)
    cot = torch.zeros((kmax,) + tuple(hid.shape), dtype=hid.dtype, device=hid.device)
    for i, c in enumerate(cands):
        cot[:len(c), int(graph.rows[i]), int(last[i])] = w[c].detach().to(hid.dtype)
    try:
        if kmax == 1:  # one rank: a plain backward (the same values; vmap over one cotangent costs ~10 % more)
            ge = torch.autograd.grad(hid, [e], grad_outputs=cot[0], retain_graph=True)[0].unsqueeze(0)
        else:
            (ge,) = torch.autograd.grad(hid, [e], grad_outputs=cot, is_grads_batched=True, retain_graph=True)
    except RuntimeError:
        ge = torch.stack([torch.autograd.grad(hid, [e], grad_outputs=cot[j], retain_graph=True)[0]
                          for j in range(kmax)])
    out = []
    for i, (s, c) in enumerate(zip(sents, cands)):
        r, o = int(graph.rows[i]), int(graph.offs[i])
        out.append(ge[:len(c), r, o:o + len(s)])
    return out


def _input_terms(h: Tensor, e: Tensor, w: Tensor, cand: list[int], batched: bool) -> list[Tensor]:
    """``d(w_y . h) / d e`` [1, L, d] for every candidate ``y`` of one sentence: one backward with the
    candidates' rows as a batch of cotangents (``batched``), else one backward per candidate."""
    if batched:
        try:
            (ge,) = torch.autograd.grad(h, [e], grad_outputs=w[cand].detach(), is_grads_batched=True,
                                        retain_graph=True)
            return list(ge)
        except RuntimeError:  # an operation without a batching rule: one backward per candidate
            pass
    return [torch.autograd.grad(h @ w[y].detach(), [e], retain_graph=True)[0] for y in cand]


def _joint_fit(g: Tensor, cands: list[list[int]], terms: list[list[Terms]], n: int) -> list[int]:
    """The residual is the sum of every sentence's last-target term; choose the combination that
    explains it best (coordinate descent from the per-sentence cosine order: pair swaps, then
    single moves), so that a sentence does not take a row that another sentence's term explains.
    Returns the chosen candidate index per sentence."""
    choice = [0] * n
    resid = g.clone()
    for rr in terms:
        for r, t in rr[0].items():
            resid[r] -= t
    for _ in range(4):
        swapped = _swap_pass(resid, cands, terms, choice)
        moved = _single_pass(resid, terms, choice)
        if not (swapped or moved):
            break
    return choice


def _move(resid: Tensor, old: Terms, new: Terms) -> None:
    """Replace the term ``old`` by ``new`` in the residual (in place)."""
    for r, t in old.items():
        resid[r] += t
    for r, t in new.items():
        resid[r] -= t


def _swap_pass(resid: Tensor, cands: list[list[int]], terms: list[list[Terms]], choice: list[int]) -> bool:
    """Exchange the last tokens of every pair of sentences where that lowers the residual."""
    moved = False
    for i in range(len(terms)):
        for j in range(i + 1, len(terms)):
            got = _swap_gain(resid, cands, terms, choice, i, j)
            if got is not None and got[0] < -1e-30:
                for k, new in ((i, got[1]), (j, got[2])):
                    _move(resid, terms[k][choice[k]], terms[k][new])
                    choice[k] = new
                moved = True
    return moved


def _swap_gain(resid: Tensor, cands: list[list[int]], terms: list[list[Terms]], choice: list[int],
               i: int, j: int) -> tuple[float, int, int] | None:
    """Residual change when sentences i and j exchange their last tokens (a pair move)."""
    ci, cj = cands[i][choice[i]], cands[j][choice[j]]
    if ci == cj or cj not in cands[i] or ci not in cands[j]:
        return None
    ni, nj = cands[i].index(cj), cands[j].index(ci)
    old_t = [terms[i][choice[i]], terms[j][choice[j]]]
    new_t = [terms[i][ni], terms[j][nj]]
    rows = set().union(*old_t, *new_t)
    delta = 0.0
    for r in rows:
        e = resid[r]
        new = e + sum(t.get(r, 0.0) for t in old_t) - sum(t.get(r, 0.0) for t in new_t)
        delta += float(new @ new) - float(e @ e)
    return delta, ni, nj


def _single_pass(resid: Tensor, terms: list[list[Terms]], choice: list[int]) -> bool:
    """Move each sentence to the candidate that lowers the residual most (if any)."""
    moved = False
    for i, rr in enumerate(terms):
        cur = rr[choice[i]]
        best_j, best_delta = choice[i], 0.0
        for j, alt in enumerate(rr):
            if j == choice[i]:
                continue
            delta = 0.0
            for r in set(cur) | set(alt):
                e = resid[r]
                new = e + cur.get(r, 0.0) - alt.get(r, 0.0)
                delta += float(new @ new) - float(e @ e)
            if delta < best_delta - 1e-30:
                best_j, best_delta = j, delta
        if best_j != choice[i]:
            _move(resid, cur, rr[best_j])
            choice[i], moved = best_j, True
    return moved
