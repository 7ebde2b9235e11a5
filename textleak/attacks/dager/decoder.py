"""DAGER's decoder search: greedy breadth extension over the layer-1 candidates (the reference's
``filter_decoder``), then the choice of B sentences by set cover. The last token of each sentence
(unobservable in attention-input spans under a next-token loss) is added by ``last_token.py``."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import FFN_PREFILTER, MAX_RUN
from .dec_dist import Screen
from .run import Run, gap_cut
from .span import LayerInputs, Span, decoder_last_inputs, span_distance


# the feed-forward-input prefilter is dropped once it has kept more than this fraction of the extensions
# (the remaining steps then skip its cost; the layer-2 test decides in every case). On the GPT-2
# configuration at B=16 it keeps about 0.4 %; on SmolLM2 (pretrained) wrong extensions lie as close to the
# feed-forward input's span as to layer 2's (development seed 0, B=16: median 0.03 at both), and it kept 87 %.
PREFILTER_USEFUL = 0.5
# ... but only judged once it has kept more extensions than the true ones alone could make up (at most B per step,
# PREFILTER_JUDGE B in all): at the first step the layer-1 candidates can all be true first tokens (development
# GPT-2 configuration B=16, seed 0 trial 0: 9 of 9 kept), and the prefilter was then dropped for the whole search
PREFILTER_JUDGE = 2
# (rotary decoders, session 19) the prefilter's threshold lowered from FFN_PREFILTER to a clear gap in the step's
# feed-forward-input distances (``_ffn_cut``, the rule of ``Run.gap_threshold`` with tau FFN_PREFILTER and base
# tau_2's reference value); where it finds one, the survivors' layer-2 inputs come from rows of the prefix and the
# survivors (not the full rows of every candidate). On SmolLM2 B=16 (development seed 0, trial 0) the 437 true
# extensions lie under 1e-4 from that span and the 169 false ones that layer 2 accepted (under its widened tau_2,
# 0.029) at >= 3e-3: 0.6 % of the pairs go on to layer 2 instead of every one. Not bit-exact:
# the survivors' layer-2 distances move at float32 round-off (confidences ~1e-5 relative), and false extensions
# that layer 2 accepted under a widened tau_2 are no longer explored. False: the full rows of sessions 12-18.
ROPE_FFN_GAP = True


@dataclass
class _Path:
    ids: list[int]
    score: float  # max layer-2 distance along the path


def search(run: Run, li2: LayerInputs, span2: Span, l1, b: int | None, max_len: int,
           position_free: bool) -> tuple[list[list[int]], list[float]]:
    """Greedy breadth extension (the reference's ``filter_decoder``); returns every finished path
    and its max layer-2 distance.

    Rotary models without a BOS token have one degenerate case: a sequence made of a single
    repeated token has the same layer-2 input at every position (attention averages identical
    values), so ``t``, ``t t``, ``t t t`` ... all pass. Runs of one token at the start are
    therefore capped at ``MAX_RUN``.

    With a widened tau_2 (``adaptive_tau``), false extensions of frequent tokens can continue
    past a sentence's true end: on SmolLM2 at B=8/16 the true tokens' layer-2 distances stay
    under ~1e-5 while such a tail's are far above. ``trim_tails`` (a deviation) therefore
    rejects an extension whose distance exceeds both the reference tau_2 and ``GAP_RATIO``
    times the largest distance along the path so far (``Run.tail_limit``).
    """
    cap = 4 * (b or 8) + 16  # prefixes kept per step
    # (fast) the extensions' distances in float64 only where they can matter (dec_dist.py; the same decisions)
    screen = Screen(span2.basis) if run.fast else None
    live = [_Path([], 0.0)]
    finished: list[_Path] = []
    for p in range(max_len):
        if not live:
            break
        if run.over_budget():
            break
        cands = l1[p][0] if p < len(l1) else []
        if not cands:
            break
        live = _step(run, li2, span2, live, cands, finished, position_free, screen=screen, b=b or 8)[:cap]
    finished.extend(x for x in live if x.ids)
    return [f.ids for f in finished], [f.score for f in finished]


def _step(run: Run, li2: LayerInputs, span2: Span, live: list[_Path], cands: list[int],
          finished: list[_Path], position_free: bool, *, screen: Screen | None = None, b: int = 8) -> list[_Path]:
    """Extend every live path by every passing candidate; paths with no passing extension are
    finished (appended to ``finished``). Returns the extensions sorted by score. With ``screen`` the
    distances at or above tau_2 (which take part in no decision) are float32 values above it (``dec_dist.py``)."""
    per_path = [cands] * len(live)
    cols: list[list[int]] | None = None
    tight = False
    if run.ffn_prefilter is not None:
        # the first block's feed-forward input (exact below the rank limit as well) on the incremental block:
        # only extensions under FFN_PREFILTER there go through the model to layer 2
        blk, dist = run.ffn_prefilter
        blk.table(len(live[0].ids), cands)
        if run.fast and hasattr(blk, "ffn_distances"):  # the projections folded into the values (issue 18)
            dpre = blk.ffn_distances([x.ids for x in live], len(live[0].ids), cands, dist)
        else:
            dpre = blk.extend([x.ids for x in live], len(live[0].ids), cands, reduce=dist)
        cut = _ffn_cut(run, dpre) if position_free and ROPE_FFN_GAP else FFN_PREFILTER
        tight = cut < FFN_PREFILTER
        if tight:
            run.stats["prefilter_gap_steps"] = run.stats.get("prefilter_gap_steps", 0.0) + 1
        cols = [torch.nonzero(r < cut).flatten().tolist() for r in dpre]
        per_path = [[cands[j] for j in c] for c in cols]
        run.stats["prefilter_kept"] = run.stats.get("prefilter_kept", 0.0) + sum(map(len, cols))
        run.stats["prefilter_total"] = run.stats.get("prefilter_total", 0.0) + len(cands) * len(live)
        kept = run.stats["prefilter_kept"]
        if kept > PREFILTER_USEFUL * run.stats["prefilter_total"] and kept > PREFILTER_JUDGE * b:
            run.ffn_prefilter = None  # not discriminative here: the next steps go to layer 2 directly
            run.stats["prefilter_dropped"] = 1.0
    l2 = run.l2_block if run.fast else None
    if l2 is not None and (cols is None or position_free):
        # the second block's input on the incremental first block (l2_block.py): every path's row of
        # candidates, as the model forward's full rows (prefiltered: the survivors' distances of it)
        pos = len(live[0].ids)
        run.stats["l2_block_paths"] = run.stats.get("l2_block_paths", 0.0) + len(live)
        # only distances under tau_2 take part in a decision (the gap cut looks at those alone): the float32
        # distance decides the rest (it exceeds the true one by at most sqrt(n u) ~ 6e-3 in width 576, u the
        # float32 unit round-off), the float64 one every distance near or under tau_2
        low = min(0.1, 1.5 * run.tau[1] + 0.01)
        if cols is None:
            ds = list(l2.distances([x.ids for x in live], pos, cands, span2.basis, exact_below=low))
        else:
            idx = [i for i, c in enumerate(cols) if c]
            got = l2.distances([live[i].ids for i in idx], pos, cands, span2.basis, exact_below=low) if idx else None
            ds = [torch.zeros(0, dtype=torch.float64) for _ in live]
            for k, i in enumerate(idx):
                ds[i] = got[k, cols[i]]
    else:
        dt = None if screen is not None else torch.float64  # (screened: the rows as the model gave them)
        if cols is None:
            xs = decoder_last_inputs(li2, [x.ids for x in live], per_path, dtype=dt)
        elif position_free and not tight:
            xs = _full_rows(li2, live, cands, cols, dtype=dt)
        else:
            xs = _inputs(li2, live, per_path, dtype=dt)
        if screen is not None:  # every distance under tau_2 as span_distance's, to the bit
            ds = list(screen.distances(torch.cat(xs), run.tau[1]).split([x.shape[0] for x in xs]))
        elif run.fast:  # one span-distance call over every path's extensions (same distances)
            ds = list(span_distance(span2.basis, torch.cat(xs)).split([x.shape[0] for x in xs]))
        else:
            ds = [span_distance(span2.basis, x) for x in xs]
    thr = run.gap_threshold(torch.cat(ds), 1)
    nxt: list[_Path] = []
    for pi, (path, d) in enumerate(zip(live, ds)):
        ok = torch.nonzero(d < thr).flatten().tolist()
        if path.ids:
            lim = run.tail_limit(path.score)
            ok = [j for j in ok if float(d[j]) <= lim]
        if not ok:
            if path.ids:
                finished.append(path)
            continue
        # a path made of one repeated token of length >= MAX_RUN may not take that token again
        run_tok = path.ids[0] if position_free and len(path.ids) >= MAX_RUN and len(set(path.ids)) == 1 else None
        dl = d.tolist()
        row = per_path[pi]
        for j in ok:
            c = row[j]
            if c == run_tok:
                continue
            nxt.append(_Path(path.ids + [c], max(path.score, dl[j])))
    nxt.sort(key=lambda x: x.score)
    return nxt


def _ffn_cut(run: Run, dpre) -> float:
    """The rotary prefilter's threshold of one step (``ROPE_FFN_GAP``): FFN_PREFILTER lowered to the highest clear gap
    of the step's feed-forward-input distances above the reference tau_2 (``Run.gap_threshold``'s rule, ``gap_cut``)."""
    d = torch.cat([torch.as_tensor(r).flatten() for r in dpre]) if isinstance(dpre, (list, tuple)) else dpre.flatten()
    return gap_cut(d, FFN_PREFILTER, run.config.l2_span_thresh, upcast=True)


def _inputs(li2: LayerInputs, live: list[_Path], per_path: list[list[int]], *,
            dtype: torch.dtype | None = torch.float64) -> list[Tensor]:
    """Layer-2 inputs of the prefiltered extensions (paths with none get an empty [0, d] tensor); ``dtype`` as
    ``decoder_last_inputs``'s."""
    d = int(li2.model.get_input_embeddings().embedding_dim)
    idx = [i for i, c in enumerate(per_path) if c]
    got = decoder_last_inputs(li2, [live[i].ids for i in idx], [per_path[i] for i in idx], dtype=dtype) if idx else []
    out = [_empty(li2, d, dtype) for _ in live]
    for i, x in zip(idx, got):
        out[i] = x
    return out


def _full_rows(li2: LayerInputs, live: list[_Path], cands: list[int], cols: list[list[int]], *,
               dtype: torch.dtype | None = torch.float64) -> list[Tensor]:
    """Layer-2 inputs of the prefiltered extensions, each from its path's full row (the prefix and every
    candidate, as without the prefilter; paths without a survivor are not run), so that the distances
    are those of the unfiltered search to the bit. (With eager attention the value sum runs over the
    row's length: a row of the survivors alone moves a true extension's distance, at float32
    round-off, by ~1e-7, and the rotary search's confidences by ~1e-5 relative.)"""
    d = int(li2.model.get_input_embeddings().embedding_dim)
    idx = [i for i, c in enumerate(cols) if c]
    got = decoder_last_inputs(li2, [live[i].ids for i in idx], [cands] * len(idx), dtype=dtype) if idx else []
    out = [_empty(li2, d, dtype) for _ in live]
    for i, x in zip(idx, got):
        out[i] = x[cols[i]]
    return out


def _empty(li2: LayerInputs, d: int, dtype: torch.dtype | None) -> Tensor:
    """An empty [0, d] row block as ``decoder_last_inputs(..., dtype=dtype)`` returns rows."""
    if dtype is not None:
        return torch.zeros(0, d, dtype=dtype)
    p = next(li2.model.parameters())
    return torch.zeros(0, d, dtype=p.dtype, device=p.device)


def select(sents: list[list[int]], scores: list[float], l1, position_free: bool, b: int | None) -> list[int]:
    """Choose up to B sentences that together explain the layer-1 span (greedy set cover).

    The universe is every (position, token) that passed layer 1 (tokens only for rotary models);
    each step takes the sentence covering most still-unexplained elements, ties broken by lower
    layer-2 score then length. This drops spurious short branches that explain nothing new.
    """
    if b is None or len(sents) <= b:
        return sorted(range(len(sents)), key=lambda i: scores[i])
    if position_free:
        universe = set(l1[0][0]) if l1 else set()
        cover = [set(s) & universe for s in sents]
    else:
        universe = {(p, t) for p, (c, _) in enumerate(l1) for t in c}
        cover = [{(p, t) for p, t in enumerate(s)} & universe for s in sents]
    covered: set = set()
    chosen: list[int] = []
    rest = list(range(len(sents)))
    while rest and len(chosen) < b:
        best = max(rest, key=lambda i: (len(cover[i] - covered), -scores[i], len(sents[i])))
        chosen.append(best)
        covered |= cover[best]
        rest.remove(best)
    return chosen
