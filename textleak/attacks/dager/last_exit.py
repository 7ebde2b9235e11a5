"""An exact early exit for the last-token completion (``last_token.py``; an addition for speed, issue 18).

The completion ranks each sentence's K candidates (about 12) by the cosine between their exact gradient
term and the residual, then improves the choice by pair swaps and single moves (``_joint_fit``).
Every candidate's input-side term is a vector-Jacobian product through the whole model, so the
completion costs K backwards of the batch. Most of that is unnecessary and can be proven so:

* **Dot products without the terms.** A term's dot product with the residual ``g`` is linear in the
  term: ``g . U_y = -g[y] . h - w_y . D`` with ``D = sum_t J_t g[x_t]`` (``J_t = dh / de_t``), one
  Jacobian-vector product for every candidate of every sentence (forward-mode AD over the packed
  forward). For ``y`` not among the sentence's own tokens ``|U_y| >= |h|`` (its row ``y`` is ``-h``),
  so ``cos_y <= (g . U_y) / (|g| |h|)``: an upper bound of every candidate's score.
* **The top candidate.** Per sentence the candidate of the highest bound gets its exact term (one
  batched backward for all sentences); where its exact cosine beats every other candidate's bound
  (with a margin of ``MARGIN`` for the float32 products), it is the ranking's first candidate.
  Sentences that stay open get all their candidates' terms (one more backward).
* **No move of the joint fit.** With ``e`` the residual less the chosen terms, a single move of
  sentence ``i`` to a candidate ``a`` (not among its tokens) changes ``|e|^2`` by ``|X|^2 + 2 e.X``
  with ``|X| >= |h_i| / (denom len_i)`` (row ``a`` of ``X``), so by at least ``x (x - 2 |e_R|)``
  (``R`` the rows the move touches) ``> 0`` once ``|h_i| / (denom len_i) > 2 |e_R|``; a swap of
  sentences ``i`` and ``j`` likewise with ``|X| >= sqrt 2 |h_i / (denom len_i) - h_j / (denom len_j)|``.
  Moves to candidates whose terms are known are evaluated as the joint fit does. When no move can
  lower the residual, the joint fit returns its starting point: the top candidates.

* **The sentence's own tokens** (session 13). For ``y`` among the sentence's tokens the bound above does
  not hold (row ``y`` of the term also holds input-side parts), but every term is supported on the rows
  ``R`` of the sentence's tokens and ``y``: ``cos_y <= |g_R| / |g|`` (``support_bounds``). With it no
  candidate lacks a bound, so the first batch holds only the candidates of the highest bound and an open
  sentence then gets only the candidates whose bound reaches its best known cosine. A single move
  between two candidates of which one is not among the sentence's tokens changes that candidate's
  row by ``h_i / (denom len_i)``, so the move bound below holds for it as well. The first candidate of
  every sentence (the row most anti-aligned with its final hidden state) gets its exact term first; where
  its cosine beats every other candidate's support bound in every sentence, the forward-mode product is
  skipped.

Where the top candidates are certified but a move is not excluded, the joint fit does move; it then runs
with terms on demand (``last_fit.lazy_fit``, session 16). When any of these fails (or forward-mode AD is
unavailable) ``certified_choice`` returns None and the completion computes every term as before, so the result
is the same in all cases.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

MARGIN = 1e-4  # cosine margin for the float32 Jacobian-vector product (true candidates: ~0.1 above)
SLACK = 2.02  # |X| > SLACK |e_R| certifies that a move cannot lower the residual (2 plus a margin)
FIRST_SHARE = 1.0  # first batch of exact terms: the candidates whose bound is at least this share of the highest


def certified_choice(model: nn.Module, graph, w: Tensor, sents: list[list[int]], cands: list[list[int]],
                     hs: Tensor, g: Tensor, r_norm: float, denom: float, *,
                     support_bound: bool = True, row_sq: Tensor | None = None, lazy: bool = True) -> list[int] | None:
    """The last token of every sentence, as the full ranking and joint fit would choose it, or None
    where that cannot be certified cheaply (module docstring). ``support_bound=False``: no bound for
    the sentence's own tokens (every one of them gets its exact term; the path before session 13). ``row_sq``:
    the residual's squared row norms when the caller has them (else computed here). ``lazy``: where no-move
    cannot be certified, the joint fit with terms on demand (``last_fit.lazy_fit``) instead of None."""
    from .last_token import _packed_terms

    cache: dict = {}  # one sentence's own forward graph, kept for its later terms (_split_terms)
    terms = (lambda gr, ww, ss, cc: _split_terms(model, gr, ww, ss, cc, cache=cache)) if support_bound else _packed_terms

    if any(len(c) < 2 for c in cands):
        return None
    n = len(sents)
    known: list[dict[int, tuple[float, dict]]] = [{} for _ in range(n)]  # candidate index -> (cosine, rows)

    def learn(which: list[list[int]]) -> None:  # exact terms of the candidates ``which[i]`` of sentence i
        for i, j, cos, rows in _exact_terms(terms, graph, w, sents, cands, which, hs, g, r_norm):
            known[i][j] = (cos, rows)

    def fit(_ub) -> list[int] | None:  # the joint fit from the certified top with terms on demand (last_fit.py)
        if not lazy:
            return None
        from .last_fit import lazy_fit
        top = [max(known[i], key=lambda j: (known[i][j][0], -j)) for i in range(n)]
        return lazy_fit(model, graph, w, sents, cands, known, top, hs, g, r_norm, denom, terms)

    if support_bound and row_sq is None:
        row_sq = g.pow(2).sum(1)
    sup = [support_bounds(row_sq, s, c, r_norm) if support_bound else [math.inf] * len(c)
           for s, c in zip(sents, cands)]
    if support_bound:  # the first candidate's term (the row most anti-aligned with h): where its cosine beats
        learn([[0] for _ in cands])  # every other's support bound, no forward-mode product is needed
        if all(_resolved(known[i], sup[i]) for i in range(n)):
            return _certify(sents, cands, known, sup, g, hs, denom) or fit(sup)
    # the forward-mode product: over the whole packed graph, or (support_bound) over just the sentences
    # the support bounds leave open, packed alone (a sentence sees only itself: the same products)
    sub = [i for i in range(n) if not _resolved(known[i], sup[i])] if support_bound else list(range(n))
    try:
        if len(sub) == n:
            dvec = dict(enumerate(_jvp(model, graph, sents, g)))
        else:
            ss = [sents[i] for i in sub]
            dvec = dict(zip(sub, _jvp(model, _sub_pack(model, ss), ss, g)))
    except (RuntimeError, NotImplementedError):
        return None
    hn = hs.norm(dim=1)
    ub: list[list[float]] = []
    for i, (s, c) in enumerate(zip(sents, cands)):
        if i not in dvec:
            ub.append(sup[i])
            continue
        wy = w[c].detach().double().cpu()
        dots = -(g[c] @ hs[i]) - wy @ dvec[i]
        toks = set(s)
        ub.append([sup[i][k] if y in toks else min(sup[i][k], max(float(d), 0.0) / (r_norm * float(hn[i]) + 1e-300) + MARGIN)
                   for k, (y, d) in enumerate(zip(c, dots))])
    # first: the candidates without a bound (the sentence's own tokens) and the one of the highest bound
    if support_bound:  # the candidates of the highest bound (where not known yet)
        first = [[] if _resolved(known[i], ub[i]) else
                 sorted(j for j in range(len(c)) if ub[i][j] >= FIRST_SHARE * max(ub[i]) and j not in known[i])
                 for i, c in enumerate(cands)]
    else:
        first = [sorted({j for j in range(len(c)) if ub[i][j] == math.inf}
                        | {max(range(len(c)), key=lambda j: ub[i][j] if ub[i][j] < math.inf else -1.0)})
                 for i, c in enumerate(cands)]
    learn(first)
    open_ = [i for i in range(n) if not _resolved(known[i], ub[i])]
    if open_:
        # the rest of an open sentence's candidates (support_bound: only those whose bound reaches its best
        # known cosine, which resolves it)
        best = [max(cs for cs, _ in known[i].values()) for i in range(n)]
        rest = [[j for j in range(len(cands[i])) if j not in known[i] and (not support_bound or ub[i][j] >= best[i])]
                if i in open_ else [] for i in range(n)]
        learn(rest)
        if not all(_resolved(known[i], ub[i]) for i in open_):
            return None
    return _certify(sents, cands, known, ub, g, hs, denom) or fit(ub)


def _certify(sents, cands, known, ub, g: Tensor, hs: Tensor, denom: float) -> list[int] | None:
    """The best known candidate of every sentence (every other one is bounded below it), if no move of the
    joint fit can lower the residual from there, else None."""
    n = len(sents)
    top = [max(known[i], key=lambda j: (known[i][j][0], -j)) for i in range(n)]
    scale = [1.0 / (denom * len(s)) for s in sents]
    chosen = [{r: t * scale[i] for r, t in known[i][top[i]][1].items()} for i in range(n)]
    e: dict[int, Tensor] = {}
    for rr in chosen:
        for r, t in rr.items():
            e[r] = (e[r] if r in e else g[r].clone()) - t
    if not _no_single_move(sents, cands, known, top, chosen, e, g, hs, scale):
        return None
    if not _no_swap(sents, cands, top, e, g, hs, scale):
        return None
    return [cands[i][top[i]] for i in range(n)]


def support_bounds(row_sq: Tensor, sent: list[int], cand: list[int], r_norm: float) -> list[float]:
    """Upper bounds of the ranking's score of every candidate ``y`` of one sentence, own tokens included:
    the term is supported on the rows ``R`` of the sentence's tokens and ``y``, so by Cauchy-Schwarz
    ``g . U_y <= |g_R| |U_y|`` and ``cos_y <= |g_R| / |g|`` (``row_sq``: the residual's squared row norms,
    ``r_norm = |g|``), plus ``MARGIN``."""
    toks = set(sent)
    tok_sq = float(row_sq[sorted(toks)].sum())
    return [math.sqrt(tok_sq + (0.0 if y in toks else float(row_sq[y]))) / r_norm * (1 + 1e-9) + MARGIN for y in cand]


def _split_terms(model: nn.Module, graph, w: Tensor, sents: list[list[int]], cands: list[list[int]], *,
                 cache: dict | None = None) -> list[Tensor]:
    """``last_token._packed_terms`` where most sentences need at most one term: a backward over the whole
    packed graph costs the same for every candidate rank, so the first candidate of every sentence comes
    from the packed graph (one backward) and the others from a forward and backward of just the sentences
    that have more (packed alike, ``_sub_graph``); else ``_packed_terms`` over the whole graph. ``cache``: a
    sentence's own graph (one sentence alone) is kept there and reused by later calls for that sentence (the
    same forward, so the same terms; the joint fit asks for one sentence's terms several times)."""
    from .last_token import _packed_terms

    n = len(sents)
    need = [i for i, c in enumerate(cands) if c]
    if len(need) <= n // 2:  # few sentences need any term: their own packed forward
        sub = [sents[i] for i in need]
        if cache is not None and len(need) == 1:
            sg = cache.get(need[0]) or cache.setdefault(need[0], _sub_graph(model, sub))
        else:
            sg = _sub_graph(model, sub)
        got = dict(zip(need, _packed_terms(sg, w, sub, [cands[i] for i in need])))
        d = graph.embeds.shape[-1]
        return [got[i] if i in got else graph.embeds.new_zeros(0, len(s), d) for i, s in enumerate(sents)]
    more = [i for i, c in enumerate(cands) if len(c) > 1]
    if not more or len(more) > n // 2:
        return _packed_terms(graph, w, sents, cands)
    head = _packed_terms(graph, w, sents, [c[:1] for c in cands])
    sub = [sents[i] for i in more]
    tail = _packed_terms(_sub_graph(model, sub), w, sub, [cands[i][1:] for i in more])
    out = list(head)
    for k, i in enumerate(more):
        out[i] = torch.cat([head[i], tail[k]], 0)
    return out


def _sub_pack(model: nn.Module, sents: list[list[int]]):
    """A ``last_token.Graph`` of ``sents`` alone without its forward (``hidden`` None): packed rows as the
    completion's residual packs them, the word embeddings detached (the input of ``_jvp``)."""
    from .last_token import Graph, _packed_rows

    ids, pos, mask, rows, offs, lens = _packed_rows(model, sents)
    with torch.no_grad():
        e = model.get_input_embeddings()(ids)
    return Graph(None, e, rows, offs, lens, {"attention_mask": mask, "position_ids": pos})


def _sub_graph(model: nn.Module, sents: list[list[int]]):
    """A ``last_token.Graph`` of ``sents`` alone: packed rows from the word embeddings (a leaf) to the
    output layer's input (the forward stops there)."""
    from .span import _Stop

    pk = _sub_pack(model, sents)
    e = pk.embeds.detach().requires_grad_(True)
    store: list[Tensor] = []

    def hook(_m, args):
        store.append(args[0])
        raise _Stop

    h = model.get_output_embeddings().register_forward_pre_hook(hook)
    try:
        with torch.enable_grad():
            model(inputs_embeds=e, **pk.inputs)
    except _Stop:
        pass
    finally:
        h.remove()
    pk.hidden, pk.embeds = store[0], e
    return pk


def _jvp(model: nn.Module, graph, sents: list[list[int]], g: Tensor | None, *,
         rows: list[Tensor] | None = None) -> Tensor:
    """``D_i = sum_t J_t g[x_t]`` [n, d] (float64) for every sentence: one forward-mode pass over the
    packed rows with the residual's rows of each sentence's tokens as the embeddings' tangent (``rows``:
    each sentence's own tangent rows [L_i, d] instead, ``last_fit``)."""
    from torch.autograd import forward_ad

    from .jvp_mode import fast_rules
    from .span import _Stop

    e = graph.embeds.detach()
    tan = torch.zeros_like(e)
    for i, s in enumerate(sents):
        r, o = int(graph.rows[i]), int(graph.offs[i])
        tan[r, o:o + len(s)] = (g[s] if rows is None else rows[i]).to(e.dtype).to(e.device)
    store: list[Tensor] = []

    def hook(_m, args):
        store.append(forward_ad.unpack_dual(args[0]).tangent)
        raise _Stop

    h = model.get_output_embeddings().register_forward_pre_hook(hook)
    try:
        with torch.no_grad(), forward_ad.dual_level(), fast_rules(model):
            model(inputs_embeds=forward_ad.make_dual(e, tan), **graph.inputs)
    except _Stop:
        pass
    finally:
        h.remove()
    if not store or store[0] is None:
        raise RuntimeError("no tangent at the output layer's input")
    last = graph.offs + graph.lens - 1
    return store[0][graph.rows, last].detach().double().cpu()


def _exact_terms(terms, graph, w: Tensor, sents: list[list[int]], cands: list[list[int]], which: list[list[int]],
                 hs: Tensor, g: Tensor, r_norm: float):
    """The exact terms of the candidates ``which[i]`` (indices into ``cands[i]``) of each sentence i from one call of
    ``terms`` (as ``last_token._packed_terms``): (i, j, ranking score, unscaled rows) for each."""
    from .last_token import _order

    if not any(which):
        return
    ges = terms(graph, w, sents, [[cands[i][j] for j in f] for i, f in enumerate(which)])
    for i, f in enumerate(which):
        for k, j in enumerate(f):
            _, rows = _order(sents[i], [cands[i][j]], hs[i], ges[i][k:k + 1], g, r_norm)
            yield i, j, _cos(rows[0], g, r_norm), rows[0]


def _cos(rows: dict, g: Tensor, r_norm: float) -> float:
    """The ranking's score of one term (as ``last_token._order`` computes it)."""
    dot = sum(float(g[k] @ v) for k, v in rows.items())
    nrm = math.sqrt(sum(float(v @ v) for v in rows.values()))
    return dot / (r_norm * nrm + 1e-30)


def _resolved(known: dict, ub: list[float]) -> bool:
    """True when the best known cosine beats the bound of every candidate without a term."""
    best = max(c for c, _ in known.values())
    return all(j in known or ub[j] < best for j in range(len(ub)))


def _row(e: dict, g: Tensor, r: int) -> Tensor:
    """Row ``r`` of the residual less the chosen terms."""
    return e[r] if r in e else g[r]


def _rows_norm(e: dict, g: Tensor, rows: set) -> float:
    return math.sqrt(sum(float(x @ x) for x in (_row(e, g, r) for r in rows)))


def _no_single_move(sents, cands, known, top, chosen, e, g, hs, scale) -> bool:
    """No single move lowers the residual (the joint fit's ``_single_pass`` would not move)."""
    for i, s in enumerate(sents):
        toks = set(s)
        a = float(hs[i].norm()) * scale[i]
        cur = chosen[i]
        for j, y in enumerate(cands[i]):
            if j == top[i]:
                continue
            if j in known[i]:  # the joint fit's delta, exactly
                alt = {r: t * scale[i] for r, t in known[i][j][1].items()}
                delta, x2 = 0.0, 0.0
                for r in set(cur) | set(alt):
                    base = _row(e, g, r)
                    step = cur.get(r, 0.0) - alt.get(r, 0.0)
                    new = base + step
                    delta += float(new @ new) - float(base @ base)
                    x2 += float(step @ step) if isinstance(step, Tensor) else 0.0
                if not delta > 0.01 * x2:
                    return False
            elif (y in toks and cands[i][top[i]] in toks) or not a > SLACK * _rows_norm(e, g, toks | {cands[i][top[i]], y}):
                return False
    return True


def _no_swap(sents, cands, top, e, g, hs, scale) -> bool:
    """No exchange of two sentences' last tokens lowers the residual (``_swap_pass`` would not move)."""
    n = len(sents)
    tok = [cands[i][top[i]] for i in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            ci, cj = tok[i], tok[j]
            if ci == cj or cj not in cands[i] or ci not in cands[j]:
                continue
            rows = set(sents[i]) | set(sents[j])
            if ci in rows or cj in rows:
                return False
            x = math.sqrt(2.0) * float((hs[i] * scale[i] - hs[j] * scale[j]).norm())
            if not x > SLACK * _rows_norm(e, g, rows | {ci, cj}):
                return False
    return True
