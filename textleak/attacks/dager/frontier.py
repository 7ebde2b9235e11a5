"""DAGER past its exact regime: best-effort recovery with ranked span distances (an addition).

DAGER's span test is exact only while the batch's token count ``n`` stays below the width ``d``
of the attention input (or the LoRA rank) and the update is noise-free. Past that the observed
update of the first block's Q/K/V projections has (numerically) full rank, or its weak
directions are buried under the defense's noise, and a hard threshold on the span distance
either accepts everything or nothing. The reference refuses (its README scores such batches 0).

Here the attack keeps going, in the spirit of the continuous / sparse relaxations of TIGER
(Kalikman, Petrov, Dimitrov, Vechev, arXiv 2606.18312: rank candidates by their distance to the
gradient subspace instead of a brittle discrete test) and SOMP (Li & Li, arXiv 2603.16761:
greedy pursuit over a token-by-position dictionary, the strongest atoms first):

* **Span.** Under a declared Gaussian noise the basis keeps the directions above the noise
  floor ``sigma (sqrt(m) + sqrt(d))`` (the noise matrix's largest singular value); when the rank
  is saturated it drops the weakest ``max(2, FRONTIER_CUT * max_rank)`` directions past the
  reference's cutoff (layer 2), and layer 1 weighs every direction by ``s^2 / (s^2 + s_c^2)``
  (``s_c``: the first dropped one) instead of cutting it. True inputs then lie *near* (not in)
  the span: their distance is the norm of their components along the weak directions, small
  compared with a non-batch token's.
* **Layer 1, ranked.** Every vocabulary token at every position gets its span distance (in
  closed form for LayerNorm-fed first layers, ``AffineScan.ranked``) and the
  ``FRONTIER_L1_KEEP`` nearest are kept (no threshold); positions are scanned up to the length
  the position-embedding update shows (rows of unused positions carry no gradient), else until
  the nearest distance stops standing out.
* **Noise-aware tolerance.** Under a declared Gaussian noise (sigma), the distance a true input
  can have is calibrated from the spectrum: a unit input spread over the ``r`` kept and ``d - r``
  discarded directions in proportion to their signal has expected squared distance
  ``sum_{k > r} s_k^2 / sum_k s_k^2`` of the *noise-free* spectrum, estimated here as
  ``sum_k max(s_k^2 - e^2, 0)`` with ``e`` the noise edge. Scores are ranked against it (a
  tolerance, not a cut).
* **Decoders** (``search_decoder``): a beam over positions; every path is extended by every
  layer-1 candidate and the extensions are ranked by their distance to a span of the next
  layer's inputs. Most extensions are wrong, so the median distance of a step is its baseline
  and an extension's score is its ratio to it (a self-calibrated scale; on the 64-wide GPT-2 at
  B=8, 81 tokens, true extensions sit at 0.02-0.6 of the median with 3 directions dropped, the
  unobservable last token at ~1.5). The root takes the 2 B best first tokens; a path then takes
  its best extension while its ratio is under ``FRONTIER_CONTINUE`` and up to
  ``FRONTIER_CHILDREN_MAX - 1`` more under ``FRONTIER_ACCEPT`` (sentences sharing a prefix: five
  of a GPT-2 B=32 batch start with "a"); the ``FRONTIER_BEAM_PER_SENTENCE B + 16`` best paths by
  mean squared ratio survive, at most ``FRONTIER_CHILDREN`` *weak* ones (ratio over
  ``FRONTIER_ACCEPT``) descending from one path two steps back (diversity: else the variants of
  the strongest sentence fill the beam); a path with no extension ends, and a finished path
  loses its trailing tokens above ``FRONTIER_ACCEPT`` (it went astray there). ``decoder.select``
  then picks B sentences by set cover.
* **Which span** (decoders): when only layer 2 is saturated (layer 1's exact lists hold) and no
  noise is declared, extensions are ranked at the first block's *feed-forward input*
  (``ffn_inputs``: GPT-2 ``mlp.c_fc``, found as the block's third group of projections sharing
  one input), whose update's row space is the span of the normalised attention-sublayer outputs,
  one per token as for layer 2, reached without the feed-forward itself (about half the
  cost per extension). It uses a part of the update DAGER does not read (SOMP's point: more of
  the update than the first layer). On the true prefixes of a GPT-2 B=32 batch the true
  extension ranked first at 98 % of steps with either span (the rest: other sentences' true
  tokens after a shared prefix). Otherwise layer 2 (with layer 1 saturated too it ranked
  better than the feed-forward input on the 64-wide GPT-2 at B=8: ROUGE-1 0.36 vs 0.29).
* **Encoders**: the existing encoder search (embedding-prior-guided beam) runs on the ranked
  layer-1 lists (``FRONTIER_L1_KEEP_ENC``) with "clearly accepted" meaning a max layer-2
  distance under ``FRONTIER_CLEAR`` times the calibrated tolerance, near-duplicates (same
  length, ``FRONTIER_DUPLICATE`` of the tokens shared) dropped, and the B best by max layer-2
  distance returned.
* **Feed-forward activation span** (``ffn_span``, ``FRONTIER_FFN_SPAN``, off by default): with the
  token set, the known prefixes' activations are peeled off the first block's ``mlp.c_proj`` update;
  once fewer than ``d`` tokens are missing the test is exact and the beam accepts only extensions
  under its threshold, every candidate tested (tiny GPT-2 B=8 seeded with the true prefixes of
  positions < 3: every sentence exact). Off because on the GPT-2 B=64 development batch the soft
  stage never gathered enough true prefixes (strong ones: 380 known; every kept one or those three
  steps behind a live path: 2961 / 2745 known, mostly wrong, filling the 3072 dimensions).
* **Under declared noise** the exact search runs first and this search fills the sentences it
  leaves missing (or replaces it when it finds no token at all).

No sentence of this mode is certified (``extras["certified"]`` False): certification is
reserved to sentences that passed the exact test of the reference (below tau_2 with an
unsaturated, noise-free rank).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from common.types import Observation
from textleak.models import embedding_param_name

from .config import (CHUNK, FRONTIER_TRIM, FRONTIER_ACCEPT, FRONTIER_BEAM_PER_SENTENCE, FRONTIER_CHILDREN, FRONTIER_CHILDREN_MAX, FRONTIER_CONTINUE,
                     FRONTIER_L1_KEEP, FRONTIER_MIN_TOL, TOKEN_SET_GAP, FRONTIER_SHORTLIST)
from .dec_block import ComplementDistance, PreLNDecoderBlock
from .deep_rerank import saturated_span
from .ffn_span import ActivationSpan, peel_step, shortlist_distances

FRONTIER_FFN_SPAN = False  # with the token set: the feed-forward activation span (ffn_span) takes over once exact
# (off: on the GPT-2 B=64 development batch the beam never peeled enough true prefixes to reach the exact stage)
KNOWN_BELOW = FRONTIER_CONTINUE  # a kept prefix whose last ratio is under this joins the known activations (wrong
# ones only add directions; the true ones are what makes the test exact)
KNOWN_LAG = 3  # soft stage: a prefix joins the known activations once a live path extends it by this many tokens
from .prior import embedding_updates, learned_position_table
from .run import Run, declared_sigma
from .scan import SCAN_BLOCK, AffineScan
from .span import (DagerPreconditionError, LayerInputs, Span, decoder_last_inputs, find_tap, first_layer_vectors,
                   observed_matrix, span_distance, span_of)

FRONTIER_BASELINE = 16  # token-set search: extensions per path beyond the shortlist that set the step's median


@dataclass
class _Path:
    ids: list[int]
    total: float  # sum of squared distance ratios (layer-2 distance / the step's median)
    ratios: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return self.total / max(1, len(self.ids))


def tolerance(sp: Span, edge: float) -> float:
    """Expected span distance of a true input given the kept rank and the noise edge ``edge``
    (``sqrt(discarded signal energy / total signal energy)``, at least ``FRONTIER_MIN_TOL``)."""
    s2 = (sp.singular_values.double().pow(2) - edge * edge).clamp_min(0.0)
    tot = float(s2.sum())
    if tot <= 0.0:
        return 1.0
    lost = float(s2[sp.rank:].sum())
    # the kept directions are also tilted by the noise: ~ edge / s per direction
    tilt = float((edge / sp.singular_values[: sp.rank].double().clamp_min(1e-300)).pow(2).mean()) if edge > 0 else 0.0
    return max(FRONTIER_MIN_TOL, math.sqrt(lost / tot + tilt))


def used_positions(obs: Observation, model: nn.Module, limit: int) -> int | None:
    """How many positions the batch uses, read from the learned position-embedding update (the
    rows of unused positions get no gradient; under a declared Gaussian noise a used row stands
    above ``3 sigma sqrt(d)``); None without a learned position table in the observation."""
    pos = learned_position_table(model)
    if pos is None:
        return None
    name = next((n for n, p in model.named_parameters() if p is pos.weight), None)
    g = obs.tensors.get(name or "")
    if g is None:
        return None
    norms = g.detach().double().cpu().norm(dim=1)[:limit]
    sigma = declared_sigma(obs)
    floor = 3.0 * sigma * math.sqrt(g.shape[1]) if sigma > 0 else 1e-6 * float(norms.max().clamp_min(1e-300))
    used = torch.nonzero(norms > floor).flatten()
    return int(used.max()) + 1 if used.numel() else None


def _rerank(rerank: tuple[LayerInputs, Span], live: list[_Path], cands: list[int], ds: list[Tensor]
            ) -> tuple[list[Tensor], float]:
    """Each path's ``FRONTIER_SHORTLIST`` nearest extensions (by ``ds``) re-measured at ``rerank``'s span,
    the rest set to inf; and the step's baseline: the median at that span of ``FRONTIER_BASELINE``
    further extensions per path spread evenly over the remaining order (the population's median; the
    shortlist's own median is that of the nearest few)."""
    li, sp = rerank
    n_s = FRONTIER_SHORTLIST
    n_b = FRONTIER_BASELINE
    short, extra = [], []
    for d in ds:
        o = d.argsort()
        short.append(o[:n_s])
        rest = o[n_s:]
        extra.append(rest[torch.linspace(0, rest.numel() - 1, min(n_b, rest.numel())).long()] if rest.numel() else rest)
    idx = [torch.cat([a, e]) for a, e in zip(short, extra)]
    xs = decoder_last_inputs(li, [x.ids for x in live], [[cands[j] for j in i.tolist()] for i in idx])
    d2 = span_distance(sp.basis, torch.cat(xs), exact_below=1.01).split([x.shape[0] for x in xs])
    out, base = [], []
    for i, a, d in zip(idx, short, d2):
        full = torch.full((len(cands),), math.inf, dtype=torch.float64)
        full[i[: a.numel()]] = d[: a.numel()]
        base.append(d[a.numel():])
        out.append(full)
    b = torch.cat(base)
    return out, (float(b.median()) if b.numel() else float(torch.cat(d2).median()))


def batch_token_set(obs: Observation, model: nn.Module) -> list[int] | None:
    """The batch's distinct tokens, read from the word-embedding update of a decoder with a tied output
    embedding (GPT-2): every batch token's row gets its input-side gradient and, as a next-token
    target, ``-sum h_i / N`` over the positions predicting it; every other row only the softmax's
    ``p_i[t] h_i`` (``~1/V`` of it at random init). The rows sort into two groups with a clear ratio
    gap (5.5x on a GPT-2 B=64 batch: its 862 largest rows are exactly the batch's 862 tokens); the set
    is the rows above the largest gap, if that gap is at least ``TOKEN_SET_GAP``. None without the
    word-embedding update, under declared noise, or without a clear gap."""
    if declared_sigma(obs) > 0:
        return None
    try:
        g = obs.tensors.get(embedding_param_name(model))
    except ValueError:  # the word table is not a parameter of the model
        return None
    if g is None:
        return None
    v, i = g.detach().double().cpu().norm(dim=1).sort(descending=True)
    top = min(v.numel() - 1, 64 * g.shape[1])
    r = v[:top] / v[1:top + 1].clamp_min(1e-300)
    k = int(r[1:].argmax()) + 1  # (not the very first row: at least two tokens)
    if float(r[k]) < TOKEN_SET_GAP:
        return None
    return sorted(i[: k + 1].tolist())


def first_tokens(obs: Observation, model: nn.Module, tokset: list[int], b: int) -> list[int] | None:
    """The sentences' first tokens among ``tokset``: orthogonal matching pursuit (``b`` atoms) of the
    position-0 row of the position-embedding update over the token set's word-embedding rows.

    A first token is an input only at position 0 (no earlier position predicts it), so the position-0
    row is the sum of the first tokens' input-side gradients, which are also (most of) their word rows;
    on a GPT-2 B=64 batch the 64-atom pursuit held all 47 distinct first tokens (residual 5 %), while
    rows of later positions are mixed with the output-side terms of the tied embedding (recall ~10 %).
    None without the two tables in the observation."""
    tables = embedding_updates(obs, model)
    if tables is None:
        return None
    gw, gp = tables
    a = gw[tokset].t()  # [d, T]
    an = a / a.norm(dim=0, keepdim=True).clamp_min(1e-300)
    y = gp[0]
    r, sup = y.clone(), []
    for _ in range(min(b, len(tokset))):
        k = int((an.t() @ r).abs().argmax())
        if k in sup:
            break
        sup.append(k)
        c = torch.linalg.lstsq(a[:, sup], y.unsqueeze(1)).solution
        r = y - (a[:, sup] @ c).squeeze(1)
    return sorted(tokset[k] for k in sup)


def ranked_scan(run: Run, li1: LayerInputs, span1: Span, max_len: int, position_free: bool,
                n_pos: int | None, keep: int = FRONTIER_L1_KEEP, *, soft: Tensor | None = None
                ) -> list[tuple[list[int], Tensor]]:
    """Per position, the ``keep`` vocabulary tokens nearest to the layer-1 span (nearest first);
    ``soft`` [d, r] (weighted columns) replaces the span's basis in the distance when given."""
    if soft is not None:
        span1 = Span(soft, soft.shape[1], span1.max_rank, span1.singular_values, span1.tol)
    vocab = int(li1.model.get_input_embeddings().num_embeddings)
    all_ids = torch.arange(vocab)
    limit = min(max_len, n_pos) if n_pos is not None else max_len
    out: list[tuple[list[int], Tensor]] = []
    base = None
    scan = AffineScan.build(li1, limit) if run.fast and not position_free and n_pos is not None else None
    if scan is not None:  # every position in closed form (scan.py), blocks of SCAN_BLOCK positions
        proj = scan.columns(span1.basis)
        for s in range(0, limit, SCAN_BLOCK):
            for ids, v in scan.ranked(li1, span1.basis, list(range(s, min(s + SCAN_BLOCK, limit))), keep, proj):
                out.append((ids.tolist(), v))
            if run.over_budget():
                break
        return out
    for p in range(limit):
        if position_free and p > 0:
            out.append(out[0])
            continue
        d = span_distance(span1.basis, first_layer_vectors(li1, all_ids, p, chunk=CHUNK), exact_below=1.01)
        v, i = d.topk(min(keep, vocab), largest=False)
        if n_pos is None and not position_free:
            # no position table: stop where the nearest token no longer stands out of the bulk
            med = float(d.median())
            if base is None:
                base = med
            if float(v[0]) > 0.8 * med:
                break
        out.append((i.tolist(), v))
        if run.over_budget():
            break
    return out


def ffn_inputs(obs: Observation, model: nn.Module, probe: Tensor, sigma: float) -> tuple[LayerInputs, Span] | None:
    """The first block's feed-forward input projections (GPT-2 ``mlp.c_fc``, Llama ``gate/up``) as a
    second test of a decoder extension: their update's row space is the span of the normalised
    attention-sublayer outputs, one per token (as the second block's input), and the input is
    reached without the feed-forward itself (about half the cost of the second block's
    input). Its rank saturates with layer 2's; the weakest directions are dropped as for layer 2.
    None when the observation lacks the projections (LoRA, frozen blocks)."""
    try:
        tap = find_tap(model, 0, probe, group=2)
        mat = observed_matrix(tap, obs.tensors)
    except DagerPreconditionError:
        return None
    if mat.shape[1] != model.get_input_embeddings().embedding_dim:
        return None
    floor = sigma * (math.sqrt(mat.shape[0]) + math.sqrt(mat.shape[1])) * 1.05 if sigma > 0 else 0.0
    src = next((obs.tensors[n] for n in tap.names if n in obs.tensors), None)
    eps = float(torch.finfo(src.dtype).eps) if src is not None and src.is_floating_point() else None
    return LayerInputs(model, tap), saturated_span(mat, noise_floor=floor, eps=eps)


def activation_span(obs: Observation, model: nn.Module) -> ActivationSpan | None:
    """The feed-forward-activation span test of ``ffn_span`` (None when ``FRONTIER_FFN_SPAN`` is off or the
    model or observation lacks the first block's ``mlp.c_proj`` update)."""
    return ActivationSpan.build(obs, model) if FRONTIER_FFN_SPAN else None


def search_decoder(run: Run, li2: LayerInputs, span2: Span, l1, b: int | None, *,
                   block: PreLNDecoderBlock | None = None, root_quota: int = 0,
                   rerank: tuple[LayerInputs, Span] | None = None,
                   acts: ActivationSpan | None = None, thresholds: tuple[float, float, float] | None = None,
                   trace=None) -> tuple[list[list[int]], list[float]]:
    """The ranked beam over positions (see the module docstring); returns every finished path
    (trailing weak tokens trimmed) and its root-mean-square distance ratio. ``block`` (the incremental
    first block, for the feed-forward-input test of GPT-2) replaces the model forward: same inputs;
    ``root_quota`` > 0: every first token keeps its best ``root_quota`` paths in the beam (used when the
    first tokens were read from the embedding updates, ``first_tokens``). ``rerank`` (with ``block``):
    each path's ``FRONTIER_SHORTLIST`` extensions nearest at the block's span are ranked at this
    (layer-2) span instead, through the model; the others are out (distance inf). ``acts`` (with
    ``block``, replaces ``rerank``): the shortlist is measured at the feed-forward activations' span
    with the accepted prefixes peeled off (``ffn_span``; exact once fewer than ``d`` tokens are
    missing), every strong prefix kept in the beam joining the known set. ``thresholds``: (continue, accept,
    trim) ratios replacing ``FRONTIER_CONTINUE``, ``FRONTIER_ACCEPT``, ``FRONTIER_TRIM`` (the deep rerank's
    ratios sit on another scale, ``token_set_rerank``); ``trace`` (development): called after every step."""
    t_cont, t_acc, t_trim = thresholds or (FRONTIER_CONTINUE, FRONTIER_ACCEPT, FRONTIER_TRIM)
    cap = FRONTIER_BEAM_PER_SENTENCE * (b or 8) + 16
    live = [_Path([], 0.0)]
    finished: list[_Path] = []
    dist = ComplementDistance(span2.basis) if block is not None else None
    acts = acts if block is not None else None
    n_fin = 0  # finished paths already peeled (acts)
    for p in range(len(l1)):
        if not live or run.over_budget():
            break
        cands = l1[p][0]
        prev = live
        med0 = None
        exact = False  # the activation span's hard test (only with the incremental block and ``acts``)
        if block is not None and dist is not None:
            block.table(p, cands)
            ds = list(block.extend([x.ids for x in live], p, cands, reduce=dist))
            if acts is not None:
                acts.refresh()
            exact = acts is not None and acts.exact
            if exact:  # fewer than d tokens missing: the activation span is an exact test (hard threshold)
                ds, med0 = shortlist_distances(block, acts, [x.ids for x in live], p, cands, ds, len(cands))
            elif rerank is not None and len(cands) > 2 * (b or 8):
                ds, med0 = _rerank(rerank, live, cands, ds)
        else:
            xs = decoder_last_inputs(li2, [x.ids for x in live], [cands] * len(live))
            ds = span_distance(span2.basis, torch.cat(xs), exact_below=1.01).split([x.shape[0] for x in xs])
        # most extensions are wrong: the median distance of the step is its baseline
        dc = torch.cat(ds)
        med = max(med0 if med0 is not None else float(dc[torch.isfinite(dc)].median()), 1e-12)
        nxt: list[tuple[_Path, bool]] = []
        for path, d in zip(live, ds):
            r = d / med
            if exact and acts is not None:  # every extension under the exact threshold, nothing else
                order = d.argsort()[:FRONTIER_CHILDREN_MAX].tolist()
                kids = [j for j in order if float(d[j]) < acts.tau]
            elif path.ids:
                order = r.argsort()[:FRONTIER_CHILDREN_MAX].tolist()
                # the best extension continues the path under FRONTIER_CONTINUE; every other one
                # under FRONTIER_ACCEPT branches (sentences sharing a prefix: five starting with "a")
                kids = [j for k, j in enumerate(order)
                        if float(r[j]) < (t_cont if k == 0 else t_acc)]
            else:  # the root: the 2 B best starts (B sentences are returned even when weak)
                kids = r.argsort()[: 2 * (b or 8)].tolist()
            if not kids:
                if path.ids:
                    finished.append(path)
                continue
            for j in kids:
                rj = float(r[j])
                nxt.append((_Path(path.ids + [cands[j]], path.total + rj ** 2, path.ratios + [rj]),
                            rj < t_acc))
        nxt.sort(key=lambda x: x[0].mean)
        # diversity: at most FRONTIER_CHILDREN weak (ratio >= FRONTIER_ACCEPT) live descendants of one
        # path two steps back (else the variants of the strongest sentence fill the beam); strong
        # extensions are not limited
        groups: dict[tuple[int, ...], int] = {}
        live = []
        for x, strong in nxt:
            g = tuple(x.ids[: max(1, len(x.ids) - 2)])
            if strong or groups.get(g, 0) < FRONTIER_CHILDREN:
                groups[g] = groups.get(g, 0) + (not strong)
                live.append(x)
        if root_quota and live:
            # every first token keeps its best ROOT_QUOTA paths: else the variants of the strongest sentences
            # (strong extensions are not limited) push whole sentences out of the beam
            per: dict[int, int] = {}
            head, rest = [], []
            for x in live:
                per[x.ids[0]] = per.get(x.ids[0], 0) + 1
                (head if per[x.ids[0]] <= root_quota else rest).append(x)
            live = head[:cap] + rest[: max(0, cap - len(head))]
        else:
            live = live[:cap]
        if trace is not None:  # development diagnostics (bench/dager_frontier_trace.py)
            trace(p, cands, prev, ds, med, live, finished)
        if acts is not None:  # peel the known prefixes (ffn_span.peel_step)
            peel_step(acts, block, [(x.ids, x.ratios) for x in live], [(x.ids, x.ratios) for x in finished[n_fin:]],
                      lag=0 if p == 0 or exact else KNOWN_LAG, below=KNOWN_BELOW, trim=t_trim)
            n_fin = len(finished)
            run.stats["ffn_span_known"] = float(acts.n_known)
            run.stats["ffn_span_dim"] = float(acts.dim)
            run.stats["ffn_span_res_rank"] = float(acts.res_rank)
            if acts.exact and "ffn_span_exact_from" not in run.stats:
                run.stats["ffn_span_exact_from"] = float(p)
    finished.extend(x for x in live if x.ids)
    out: dict[tuple[int, ...], float] = {}
    for f in finished:
        n = len(f.ids)
        while n > 1 and f.ratios[n - 1] > t_trim:  # a weak tail: the path went astray
            n -= 1
        key = tuple(f.ids[:n])
        score = math.sqrt(sum(x * x for x in f.ratios[:n]) / n)
        out[key] = min(score, out.get(key, math.inf))
    # a wrong first token followed by a true sentence (the root keeps 2 B starts, and after a shared
    # first token such as "a" the wrong start's extensions still pass) would win the set cover, which
    # rewards its extra (position 0, token) pair: of the variants differing only in the first token,
    # keep the one whose ratios are lowest
    tails: dict[tuple[int, ...], tuple[int, ...]] = {}
    for k in sorted(out, key=lambda x: out[x]):
        if len(k) >= 3 and k[1:] not in tails:
            tails[k[1:]] = k
    keys = [k for k in out if len(k) >= 2 and (len(k) < 3 or tails[k[1:]] == k)] or list(out)
    return [list(k) for k in keys], [out[k] for k in keys]
