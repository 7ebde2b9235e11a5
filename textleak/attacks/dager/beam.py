"""DAGER's encoder beam and repair (deviations from the reference, whose exhaustive search is
infeasible on long sentences): a left-to-right beam over the per-position candidates with a soft
suffix, scored on the incremental first block (``block.PostLNBlock``) or the model's own forward,
and single-token repairs of a sentence from wider candidate lists."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .block import PostLNBlock, Rows
from .config import ENCODER_BEAM, ENCODER_REFINE, PRIOR_PENALTY
from .run import Run
from .span import LayerInputs, Span, first_layer_vectors, model_device, span_distance

Weight = Callable[[int, int], float]  # (position, token) -> soft-suffix weight (prior.PriorWeight)


def score_seqs(li2: LayerInputs, span2: Span, seqs: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Mean and max layer-2 distance of each sequence (equal lengths) through the model's forward."""
    dev = model_device(li2.model)
    means, maxs = [], []
    for s in range(0, len(seqs), 256):
        ids = torch.tensor(seqs[s:s + 256], device=dev)
        x = li2(ids)  # [n, L, d]
        d = span_distance(span2.basis, x.reshape(-1, x.shape[-1])).view(x.shape[0], x.shape[1])
        means.append(d.mean(1))
        maxs.append(d.max(1).values)
    return torch.cat(means), torch.cat(maxs)


def sq_span_dist(basis: Tensor, x: Tensor) -> Tensor:
    """Squared distance ``1 - |R^T v|^2`` of each normalised row of ``x`` [..., d] to span(basis), in
    ``x``'s dtype (the beam's ranking score; acceptance uses ``span_distance``)."""
    v = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return (1.0 - (v @ basis).pow(2).sum(-1)).clamp_min(0.0)


def beam(run: Run, per: list[list[int]], li2: LayerInputs, span2: Span, word: Tensor, weight: Weight,
         wide: list[list[int]], penalise: bool = True, *,
         preselect: int | None = None, passes: int | None = None) -> list[tuple[list[int], float]]:
    """Left-to-right beam over the per-position candidates ``per`` (see ``encoder.search``); returns
    the final beams of every pass with their max layer-2 distance.

    Pass 1 fills the positions after the prefix with a soft suffix: the candidates' word
    embeddings weighted by ``weight`` (the embedding prior, else uniform). Each further pass
    (``ENCODER_REFINE``) uses the previous pass's best sentence as a hard suffix instead: a
    suffix with a third of its tokens wrong still ranks the true next token first (measured on
    MiniLM at B=8), so each pass repairs what the last one got wrong. Stops at a clear pass.
    With ``penalise`` the embedding prior breaks ties (``PRIOR_PENALTY``). ``preselect`` replaces the
    config's ``encoder_preselect`` in the beam steps (the encoder search's second try, ``encoder.ESCALATE``);
    ``passes`` replaces ``ENCODER_REFINE`` (the encoder search's quick first tries, ``encoder.QUICK_PASSES``).
    """
    dev = word.device
    rows = []
    for p, c in enumerate(per):
        w = torch.tensor([weight(p, t) for t in c], dtype=word.dtype, device=dev)
        rows.append((w[:, None] * word[torch.tensor(c, device=dev)]).sum(0) / w.sum())
    suffix = torch.stack(rows)  # [L, d]
    lam = (PRIOR_PENALTY if run.prior_penalty is None else run.prior_penalty) if penalise else 0.0
    pen = [{t: -math.log(weight(p, t)) for t in c} for p, c in enumerate(per)] if lam > 0 else None
    basis = span2.basis.to(device=dev, dtype=word.dtype)
    xtab, pos_of, rtab = None, None, None
    if run.block is not None:  # layer-1 inputs of every candidate at its position, computed once
        xtab = [first_layer_vectors(run.li1, torch.tensor(c), p) for p, c in enumerate(per)]
        pos_of = [{t: i for i, t in enumerate(c)} for c in per]
        if run.fast:  # and their projections (block.Rows), gathered by every beam step
            rtab = [run.block.rows(x) for x in xtab]

    out: dict[tuple[int, ...], float] = {}
    last = None  # the hard suffix of the pass just run
    repaired: dict[tuple[int, ...], tuple[list[int], float]] = {}
    for _ in range(ENCODER_REFINE if passes is None else passes):
        beams = _pass(run, per, li2, word, suffix, basis, pen, lam, xtab, pos_of, rtab,
                      run.config.encoder_preselect if preselect is None else preselect)
        if beams is None:  # over the time budget
            break
        mean, mx = score_seqs(li2, span2, beams)
        mx = mx.tolist()
        for bm, v in zip(beams, mx):
            out[tuple(bm)] = v
        if min(mx) <= 0.1 * run.tau[1]:
            break
        start = tuple(beams[int(mean.argmin())])
        if start not in repaired or not run.fast:  # (deterministic: the same best beam is repaired alike)
            repaired[start] = repair(run, list(start), wide, li2, span2)
        best, v = repaired[start]
        out[tuple(best)] = min(v, out.get(tuple(best), math.inf))
        if v <= 0.1 * run.tau[1]:
            break
        if run.fast and best == last:  # the next pass would repeat this one (same suffix): nothing new
            break
        last = best
        suffix = word[torch.tensor(best, device=dev)]
    return [(list(k), v) for k, v in out.items()]


def _pass(run: Run, per: list[list[int]], li2: LayerInputs, word: Tensor, suffix: Tensor, basis: Tensor,
          pen: list[dict[int, float]] | None, lam: float, xtab, pos_of, rtab, preselect: int) -> list[list[int]] | None:
    """One left-to-right pass of the beam with ``suffix`` [L, d] (word embeddings) after the prefix;
    returns the final beams, or None once the time budget is over."""
    blk = run.block
    beams: list[list[int]] = [[]]
    xsuf = run.li1.from_embeds(suffix.unsqueeze(0))[0] if blk is not None else None  # [L, d]
    rsuf = blk.rows(xsuf, ov=False) if rtab is not None else None
    for p in range(len(per)):
        if run.over_budget():
            return None
        ext = [bm + [t] for bm in beams for t in per[p]]
        if len(ext) <= ENCODER_BEAM and p < len(per) - 1:
            beams = ext
            continue
        if blk is not None:
            near_pen = None if pen is None else lam * torch.tensor([pen[p][t] for t in per[p]])
            ext, sc = beam_step(blk, beams, p, per[p], xtab, pos_of, xsuf, basis, near_pen,
                                preselect=preselect, rtab=rtab, rsuf=rsuf)
        else:
            sc = generic_step(li2, word, suffix, ext, p, basis)
        if pen is not None:  # the embedding prior as a tie-breaker (see PRIOR_PENALTY)
            sc = sc + lam * torch.tensor([sum(pen[q][t] for q, t in enumerate(e)) for e in ext],
                                         dtype=sc.dtype)
        order = sc.argsort()[:ENCODER_BEAM].tolist()
        beams = [ext[i] for i in order]
    return beams


def generic_step(li2: LayerInputs, word: Tensor, suffix: Tensor, ext: list[list[int]], p: int,
                 basis: Tensor) -> Tensor:
    """Beam-step scores through the model's own forward (no incremental block): each extension
    fills positions 0..p, the soft ``suffix`` [L, d] the rest; the sum of squared layer-2 distances
    over the prefix."""
    scores = []
    for s in range(0, len(ext), 128):
        chunk = torch.tensor(ext[s:s + 128], device=word.device)
        emb = suffix.unsqueeze(0).repeat(chunk.shape[0], 1, 1)
        emb[:, :p + 1] = word[chunk]
        scores.append(sq_span_dist(basis, li2.from_embeds(emb)[:, :p + 1]).sum(1).cpu())
    return torch.cat(scores)


def beam_step(blk: PostLNBlock, beams: list[list[int]], p: int, cands: list[int], xtab, pos_of,
              xsuf: Tensor, basis: Tensor, near_pen: Tensor | None, *,
              preselect: int, rtab: list[Rows] | None = None, rsuf: Rows | None = None) -> tuple[list[list[int]], Tensor]:
    """One beam step on the incremental block: every beam is a shared base (its prefix, a slot at
    ``p``, the soft suffix) and the candidates vary the slot. With ``preselect`` (the config's
    ``encoder_preselect``) > 0 the candidates of each beam are first ranked by the layer-2 distance
    at ``p`` alone (plus the prior penalty ``near_pen`` of the candidate), and only the best
    ``preselect`` get the full score (sum of squared layer-2 distances over the prefix, as the
    generic path). Returns the scored extensions and their scores. With the per-position tables
    ``rtab`` / ``rsuf`` (``PostLNBlock.rows`` of ``xtab`` / ``xsuf``) the same scores come from
    :func:`_table_step`."""
    if rtab is not None and rsuf is not None:
        return _table_step(blk, beams, p, cands, rtab, pos_of, rsuf, basis, near_pen, preselect=preselect)
    nb, k = len(beams), len(cands)
    base = xsuf.unsqueeze(0).repeat(nb, 1, 1)
    for q in range(p):
        base[:, q] = xtab[q][torch.tensor([pos_of[q][bm[q]] for bm in beams])]
    m = preselect
    if 0 < m < k:
        near = torch.cat([sq_span_dist(basis, blk.vary(base, p, xtab[p][s:s + 256], [p]))[..., 0]
                          for s in range(0, k, 256)], 1)  # [nb, k]
        if near_pen is not None:
            near = near + near_pen.to(near)
        sel = near.topk(m, dim=1, largest=False).indices  # [nb, m]
    else:
        sel = torch.arange(k).unsqueeze(0).expand(nb, k)
    sc = torch.cat([sq_span_dist(basis, blk.vary(base, p, xtab[p][sel[:, s:s + 16]], list(range(p + 1)))).sum(-1)
                    for s in range(0, sel.shape[1], 16)], 1)  # [nb, m]
    ext = [beams[b] + [cands[int(j)]] for b in range(nb) for j in sel[b]]
    return ext, sc.flatten().cpu()


def _table_step(blk: PostLNBlock, beams: list[list[int]], p: int, cands: list[int], rtab: list[Rows], pos_of,
                rsuf: Rows, basis: Tensor, near_pen: Tensor | None, *,
                preselect: int) -> tuple[list[list[int]], Tensor]:
    """:func:`beam_step` on gathered projections (issue 18): the bases' queries, keys and values are
    gathered from the per-position tables instead of projected again at every step, the candidates'
    from the table of ``p``; the distance at ``p`` itself is computed once (the preselection's) and
    reused in the full score, which then evaluates the positions before ``p`` only. The same
    extensions in the same order and the same scores to float round-off."""
    nb, k = len(beams), len(cands)
    idx = torch.tensor([[pos_of[q][bm[q]] for q in range(p)] for bm in beams], dtype=torch.long).view(nb, p)
    fields = ("x", "q", "k", "v")
    base = Rows(*(torch.cat([getattr(rtab[q], f)[idx[:, q]].unsqueeze(1) for q in range(p)]
                            + [getattr(rsuf, f)[p:].expand(nb, *getattr(rsuf, f)[p:].shape)], 1)
                  for f in fields))  # [nb, L]: the prefixes from the tables, the suffix after them
    tab = rtab[p]
    near = torch.cat([sq_span_dist(basis, blk.vary_rows(base, p, tab.take(torch.arange(s, min(s + 256, k))).expand(nb),
                                                        [p]))[..., 0]
                      for s in range(0, k, 256)], 1)  # [nb, k]
    m = preselect
    if 0 < m < k:
        rank = near if near_pen is None else near + near_pen.to(near)
        sel = rank.topk(m, dim=1, largest=False).indices  # [nb, m]
    else:
        sel = torch.arange(k, device=near.device).unsqueeze(0).expand(nb, k)
    sc = near.gather(1, sel)
    if p > 0:
        before = list(range(p))
        sc = sc + torch.cat([sq_span_dist(basis, blk.vary_rows(base, p, tab.take(sel[:, s:s + 64]), before)).sum(-1)
                             for s in range(0, sel.shape[1], 64)], 1)  # [nb, m]
    ext = [beams[b] + [cands[int(j)]] for b in range(nb) for j in sel[b]]
    return ext, sc.flatten().cpu()


def _dists(li2: LayerInputs, span2: Span, seqs: list[list[int]]) -> Tensor:
    """Layer-2 distances [n, L] of equal-length sequences through the model's forward."""
    dev = model_device(li2.model)
    out = []
    for s in range(0, len(seqs), 128):
        x = li2(torch.tensor(seqs[s:s + 128], device=dev))
        out.append(span_distance(span2.basis, x.reshape(-1, x.shape[-1])).view(x.shape[0], x.shape[1]))
    return torch.cat(out)


def repair(run: Run, seq: list[int], wide: list[list[int]], li2: LayerInputs, span2: Span) -> tuple[list[int], float]:
    """Single-token replacements from the wide lists, worst position first, while the mean layer-2
    distance drops: a sentence with a few wrong tokens shows them as its largest distances, and
    the true replacement removes most of the error (the beam's lists can miss the weak
    occurrences of repeated tokens). Returns the sentence and its max layer-2 distance."""
    blk = run.block
    cur = list(seq)
    d = _dists(li2, span2, [cur])[0]
    tried: set[int] = set()
    for _ in range(2 * len(cur)):
        if run.over_budget() or float(d.max()) <= 0.1 * run.tau[1]:
            break
        p = next((int(q) for q in d.argsort(descending=True).tolist()
                  if int(q) not in tried and len(wide[int(q)]) > 1), None)
        if p is None:
            break
        toks = [t for t in wide[p] if t != cur[p]]
        if blk is None:
            trial = [cur[:p] + [t] + cur[p + 1:] for t in toks]
            dt = _dists(li2, span2, trial)
        else:
            dt, toks = _repair_trials(run, blk, cur, p, toks, span2)
            trial = [cur[:p] + [t] + cur[p + 1:] for t in toks]
        j = int(dt.mean(1).argmin())
        if float(dt[j].mean()) < float(d.mean()):
            cur, d = trial[j], dt[j]
            tried.clear()
        tried.add(p)
    return cur, float(d.max())


def _repair_trials(run: Run, blk: PostLNBlock, cur: list[int], p: int, toks: list[int],
                   span2: Span) -> tuple[Tensor, list[int]]:
    """Layer-2 distances [n, L] of ``cur`` with position ``p`` replaced by each of ``toks`` on the
    incremental block; with ``encoder_preselect`` > 0 only the (2 x preselect) replacements
    nearest to the span at ``p`` itself get the full evaluation. Returns the distances and the
    replacements evaluated."""
    dev = model_device(blk.q)
    base = run.li1(torch.tensor([cur], device=dev))  # [1, L, d]
    cand = first_layer_vectors(run.li1, torch.tensor(toks), p)  # [k, d]
    m = 2 * run.config.encoder_preselect
    if run.fast:
        return _repair_rows(blk, base, p, cand, toks, m, span2)
    if 0 < m < len(toks):
        x = blk.vary(base, p, cand, [p])[0, :, 0]  # [k, d]
        keep = span_distance(span2.basis, x).topk(m, largest=False).indices
        cand, toks = cand[keep.to(cand.device)], [toks[int(i)] for i in keep]
    every = list(range(len(cur)))
    out = []
    for s in range(0, len(toks), 16):
        x = blk.vary(base, p, cand[s:s + 16], every)[0]  # [m, L, d]
        out.append(span_distance(span2.basis, x.reshape(-1, x.shape[-1])).view(x.shape[0], x.shape[1]))
    return torch.cat(out), toks


def _repair_rows(blk: PostLNBlock, base: Tensor, p: int, cand: Tensor, toks: list[int], m: int,
                 span2: Span) -> tuple[Tensor, list[int]]:
    """:func:`_repair_trials` on projected rows (``PostLNBlock.vary_rows``): the same trials and
    distances to float round-off, the sentence's and the candidates' projections computed once."""
    rb, rc = blk.rows(base, ov=False), blk.rows(cand).expand(1)  # [1, L], [1, k]
    if 0 < m < len(toks):
        x = blk.vary_rows(rb, p, rc, [p])[0, :, 0]  # [k, d]
        keep = span_distance(span2.basis, x).topk(m, largest=False).indices
        rc, toks = rc.take((slice(None), keep.to(cand.device))), [toks[int(i)] for i in keep]
    every = list(range(base.shape[1]))
    out = []
    for s in range(0, len(toks), 64):
        x = blk.vary_rows(rb, p, rc.take((slice(None), slice(s, s + 64))), every)[0]  # [m, L, d]
        out.append(span_distance(span2.basis, x.reshape(-1, x.shape[-1])).view(x.shape[0], x.shape[1]))
    return torch.cat(out), toks
