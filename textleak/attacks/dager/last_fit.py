"""The last-token completion's joint fit with terms on demand (an addition for speed, issue 18, session 16).

Where ``last_exit._certify`` cannot show that no move of the joint fit (``last_token._joint_fit``) lowers the
residual, the fit does move: on batches where many sentences end in the same token (``.``), that row of the
residual holds all their final hidden states, the cosine ranking puts it first for every sentence, and the fit
moves the sentences that end otherwise to their own token (development GPT-2 seed 1 trial 0: two of 16; the
residual after the fit is ~1e-6 of ~0.9). Before, every candidate's term of every sentence was then computed
(about 10 backwards of the whole packed batch). ``lazy_fit`` runs the same passes (pair swaps, then single
moves, at most four rounds, from the certified cosine top) on the terms it needs:

* a swap pass first computes the terms its admissible pairs use (one batched call), more on demand after a swap;
* a single move of sentence ``i`` from term ``c`` to the term ``a`` of candidate ``y`` (not among its tokens)
  changes ``|e|^2`` by ``|c|^2 + 2 e.c + |a|^2 - 2 f.a`` with ``f = e + c`` (``e`` the residual), and
  ``|a|^2 >= s^2 |h|^2`` (row ``y`` of ``a`` is ``-s h``, ``s = 1 / (denom len_i)``), while
  ``f.a = -s (f[y].h + w_y.D_i)``, ``D_i = sum_t J_t f[x_t]`` from one forward-mode product over the sentences
  (``last_exit._jvp`` with ``f``'s rows as the tangent). A candidate whose lower bound (less a float32 margin)
  is above the best exact change so far cannot be the move; the others (and the sentence's own tokens, which
  have no such bound) get exact terms, for that sentence alone;
* before that product (session 18), for any candidate, own tokens included: ``|a|^2 - 2 f.a >= -|f_R|^2``
  (Cauchy-Schwarz, ``R`` the rows ``a`` can touch: the sentence's tokens and ``y``), so the change is at least
  ``|c|^2 + 2 e.c - |f_R|^2`` (``cs_lb``, ``_cauchy``); the candidates it excludes need neither a product nor a term.

A swap pass first computes, in one batch, the terms its bounds cannot exclude at its start; a single pass takes
every missing term in one batch when that costs fewer token passes than the terms its bounds leave at its start,
each from the sentence's own forward and backward (``_take_all``; ``RULE = "share"``: when they leave over
``LAZY_SHARE`` of them, sessions 16-17), else each sentence's terms come when it is reached. The moves are decided on exact terms as ``_joint_fit`` decides them, so the choice is the same (up to the float32
round-off of terms computed in a different batch, as in ``last_exit``). On any failure ``lazy_fit`` returns None
and the completion computes every term as before."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

LAZY_SHARE = 0.5  # (rule="share") a single pass whose bounds leave more than this share of the missing terms takes them all
#: a single pass takes every missing term in one batch when that costs less than its terms on demand ("cost", the
#: default since session 18), or when its bounds leave more than LAZY_SHARE of them ("share", sessions 16-17)
RULE = "cost"
#: the Cauchy-Schwarz bound of a single move (``cs_lb``, session 18): excludes candidates, own tokens included,
#: before any forward-mode product; False: the bounds of sessions 16-17 only
CAUCHY = True
#: (session 19) a single pass whose start lacks a product (or holds a stale one that fails a bound) computes it when
#: it reaches that sentence, for that sentence alone, instead of for all of them in one batch at its start (and then
#: takes terms on demand). The start's bounds are pessimistic: where one sentence's wrong term sits in the residual,
#: the Cauchy-Schwarz bound of every sentence sharing its rows fails until it moves, and then excludes every candidate
#: of most of them (development SmolLM2 B=16, seed 0 trial 0: 14 products at the start, 3 needed after the first
#: move). Same moves (the bounds and exact terms decide as before); False: the batch at the start (sessions 16-18).
PRODUCTS_ON_DEMAND = True
JVP_MARGIN = 1e-3  # relative margin on w_y . D_i (a float32 forward-mode product; its error is ~1e-6 relative)


def lazy_fit(model: nn.Module, graph, w: Tensor, sents: list[list[int]], cands: list[list[int]], known: list[dict],
             top: list[int], hs: Tensor, g: Tensor, r_norm: float, denom: float, terms_fn) -> list[int] | None:
    """``last_token._joint_fit``'s choice (token ids) from the certified top candidates ``top`` with the terms
    computed on demand (module docstring). ``known[i]``: candidate index -> (cosine, unscaled rows) already
    computed; ``terms_fn(graph, w, sents, cands)``: input-side terms as ``last_token._packed_terms``."""
    from .last_exit import _exact_terms, _jvp, _sub_pack

    n = len(sents)
    lens = [denom * len(s) for s in sents]
    cos = [{j: c for j, (c, _) in known[i].items()} for i in range(n)]
    T = [{j: {r: t / lens[i] for r, t in rows.items()} for j, (_, rows) in known[i].items()} for i in range(n)]
    index = [{y: j for j, y in enumerate(c)} for c in cands]

    def fetch(which: list[list[int]]) -> None:
        which = [[j for j in sorted(set(f)) if j not in T[i]] for i, f in enumerate(which)]
        for i, j, c, rows in _exact_terms(terms_fn, graph, w, sents, cands, which, hs, g, r_norm):
            cos[i][j] = c
            T[i][j] = {r: t / lens[i] for r, t in rows.items()}

    choice = list(top)
    resid = _RowCopy(g)
    for i in range(n):
        for r, t in T[i][choice[i]].items():
            resid[r] -= t

    def move(i: int, new: int) -> None:
        for r, t in T[i][choice[i]].items():
            resid[r] += t
        for r, t in T[i][new].items():
            resid[r] -= t
        choice[i] = new

    def pair(i: int, j: int) -> tuple[int, int] | None:
        ci, cj = cands[i][choice[i]], cands[j][choice[j]]
        if ci == cj or cj not in index[i] or ci not in index[j]:
            return None
        return index[i][cj], index[j][ci]

    dvec: dict[int, Tensor] = {}  # D_i, and the rows f_i[toks] it was computed from (kept across passes)
    snap: dict[int, Tensor] = {}
    uniq = [sorted(set(s)) for s in sents]

    def f_rows(i: int, rows: list[int], extra: dict | None = None) -> Tensor:  # f_i = resid (+ extra) + term of i
        cur = T[i][choice[i]]
        ex = extra or {}
        return torch.stack([resid[x] + cur.get(x, 0.0) + ex.get(x, 0.0) for x in rows])

    def tangents(idx: list[int]) -> None:  # D_i for f_i = resid + the current term of i, i in idx
        ss = [sents[i] for i in idx]
        pk = graph if len(idx) == n else _sub_pack(model, ss)
        for i, dv in zip(idx, _jvp(model, pk, ss, None, rows=[f_rows(i, sents[i]) for i in idx])):
            dvec[i], snap[i] = dv, f_rows(i, uniq[i])

    def move_lb(i: int, js: list[int], extra: dict | None = None) -> list[float]:
        """Lower bounds of ``|X|^2 + 2 e.X`` (``X`` = current term of i less candidate j's, ``e`` = resid + extra)
        for candidates j of i without a term and not among its tokens: ``|c|^2 + 2 e.c + |a|^2 - 2 f.a`` with
        ``f.a = -s (f[y].h + w_y.D)``, ``D`` from the rows ``snap`` (``|(f - snap).a_toks| <= c |a|``, so
        ``|a|^2 - 2 f.a >= -2 f_snap.a + min over |a| >= s |h| of (|a|^2 - 2 c |a|)``), less a float32 margin."""
        cur, ex = T[i][choice[i]], extra or {}
        s, h = 1.0 / lens[i], hs[i]
        a0 = s * float(h.norm())
        base = base_of(i, extra)
        c = float((f_rows(i, uniq[i], extra) - snap[i]).norm())
        q = a0 * a0 - 2.0 * c * a0 if c <= a0 else -c * c
        ys = [cands[i][j] for j in js]
        wy = w[ys].detach().double().cpu()
        wd, dn = wy @ dvec[i], float(dvec[i].norm())
        out = []
        for k, y in enumerate(ys):
            fy = resid[y] + cur.get(y, 0.0) + ex.get(y, 0.0)
            out.append(base + q + 2.0 * s * (float(fy @ h) + float(wd[k]))
                       - 2.0 * s * JVP_MARGIN * float(wy[k].norm()) * dn)
        return out

    def base_of(i: int, extra: dict | None = None) -> float:  # |c|^2 + 2 e.c (c the current term of i)
        ex, base = extra or {}, 0.0
        for r, t in T[i][choice[i]].items():
            e = resid[r] + ex[r] if r in ex else resid[r]
            base += float(t @ t) + 2.0 * float(e @ t)
        return base

    def cs_lb(i: int, js: list[int], extra: dict | None = None) -> list[float]:
        """Lower bounds of the single move's change to candidate j of i for any term (own tokens included): the term
        ``a`` is supported on the rows ``R`` of i's tokens and ``y``, so ``|a|^2 - 2 f.a >= -|f_R|^2`` (Cauchy-Schwarz,
        minimum over ``|a|``) and the change is at least ``|c|^2 + 2 e.c - |f_R|^2``; no product needed."""
        cur, ex = T[i][choice[i]], extra or {}
        base = base_of(i, extra)
        tok_sq = float(f_rows(i, uniq[i], extra).pow(2).sum())
        toks = set(sents[i])
        out = []
        for j in js:
            y = cands[i][j]
            fy = 0.0 if y in toks else float((resid[y] + cur.get(y, 0.0) + ex.get(y, 0.0)).pow(2).sum())
            out.append(_cauchy(base, tok_sq + fy))
        return out

    def swap_excluded(i: int, j: int, p: tuple[int, int]) -> bool:
        """True when the swap of i and j, one side without a term, cannot lower the residual: delta =
        [|X_a|^2 + 2 e.X_a] + [|X_b|^2 + 2 (e + X_a).X_b], the second bounded as a single move of b from e + X_a."""
        miss = [(k, jk) for k, jk in ((i, p[0]), (j, p[1])) if jk not in T[k]]
        if len(miss) != 1:
            return False
        (kb, jb), ka = miss[0], (j if miss[0][0] == i else i)
        ja = p[0] if ka == i else p[1]
        cur_a, alt_a = T[ka][choice[ka]], T[ka][ja]
        xa = {r: cur_a.get(r, 0.0) - alt_a.get(r, 0.0) for r in set(cur_a) | set(alt_a)}
        part = sum(float(x @ x) + 2.0 * float(resid[r] @ x) for r, x in xa.items())
        lb = cs_lb(kb, [jb], xa)[0] if CAUCHY else -math.inf
        if kb in dvec and cands[kb][jb] not in set(sents[kb]):
            lb = max(lb, move_lb(kb, [jb], xa)[0])
        return part + lb > 1e-12

    def swap_pass() -> bool:
        want: list[list[int]] = [[] for _ in range(n)]  # the terms this pass needs from its start (one batch)
        for i in range(n):
            for j in range(i + 1, n):
                p = pair(i, j)
                if p is not None and (p[0] not in T[i] or p[1] not in T[j]) and not swap_excluded(i, j, p):
                    want[i].append(p[0])
                    want[j].append(p[1])
        fetch(want)
        moved = False
        for i in range(n):
            for j in range(i + 1, n):
                p = pair(i, j)
                if p is None:
                    continue
                miss = p[0] not in T[i] or p[1] not in T[j]
                if miss and swap_excluded(i, j, p):
                    continue  # this swap cannot lower the residual
                if miss:
                    fetch([[p[0]] if k == i else [p[1]] if k == j else [] for k in range(n)])
                old_t = [T[i][choice[i]], T[j][choice[j]]]
                new_t = [T[i][p[0]], T[j][p[1]]]
                delta = 0.0
                for r in set().union(*old_t, *new_t):
                    e = resid[r]
                    new = e + sum(t.get(r, 0.0) for t in old_t) - sum(t.get(r, 0.0) for t in new_t)
                    delta += float(new @ new) - float(e @ e)
                if delta < -1e-30:
                    move(i, p[0])
                    move(j, p[1])
                    moved = True
        return moved

    def exact(i: int, j: int) -> float:  # the single move's change, as ``last_token._single_pass`` computes it
        cur, alt, delta = T[i][choice[i]], T[i][j], 0.0
        for r in set(cur) | set(alt):
            e = resid[r]
            new = e + cur.get(r, 0.0) - alt.get(r, 0.0)
            delta += float(new @ new) - float(e @ e)
        return delta

    served = [0]  # products computed on demand in the current single pass (PRODUCTS_ON_DEMAND)

    def group(i: int) -> list[int]:
        """The sentences whose product comes with i's: i alone for the first one of a pass; for the second, i and
        every later sentence of the pass that needs a product at the current residual (one batch); i alone after."""
        served[0] += 1
        if not PRODUCTS_ON_DEMAND or served[0] != 2:
            return [i]
        return [i] + [j for j in range(i + 1, n) if wants_product(j)]

    def wants_product(j: int) -> bool:  # j's bounds at the current residual need a (fresh) product
        return needs(j, {k: exact(j, k) for k in T[j] if k != choice[j]}, False) is None  # (redo False: no product)

    def needs(i: int, deltas: dict, redo: bool) -> list[int] | None:
        """The candidates of i whose single move must be computed exactly (own tokens; bounds not above the best
        exact change); None when a stale ``D_i`` fails a bound and ``redo`` is False."""
        toks = set(sents[i])
        best = min([0.0] + list(deltas.values()))
        left = [j for j in range(len(cands[i])) if j not in T[i]]
        if CAUCHY:  # candidates the Cauchy-Schwarz bound excludes need neither a term nor a product
            left = [j for j, lb in zip(left, cs_lb(i, left)) if not lb > best + 1e-12]
        unknown = [j for j in left if cands[i][j] not in toks]
        get = [j for j in left if cands[i][j] in toks]  # no bound from the product
        if unknown:
            if i not in dvec:
                if not redo:
                    return None
                tangents(group(i))
            lbs = move_lb(i, unknown)
            if any(not lb > best + 1e-12 for lb in lbs) and not torch.equal(f_rows(i, uniq[i]), snap[i]):
                if not redo:
                    return None
                tangents(group(i))  # a stale D_i: recompute it (for this sentence alone, or see group)
                lbs = move_lb(i, unknown)
            get += [j for j, lb in zip(unknown, lbs) if not lb > best + 1e-12]
        return get

    def single_pass() -> bool:
        # from the pass's start: the products of the sentences without one, those whose stale product fails a bound
        # (one batch each), and every sentence's exact candidates at the start (one batch)
        miss = [] if CAUCHY else [i for i in range(n) if i not in dvec
                                  and any(j not in T[i] and y not in set(sents[i]) for j, y in enumerate(cands[i]))]
        if miss:
            tangents(miss)
        served[0] = 0
        start = [{j: exact(i, j) for j in T[i] if j != choice[i]} for i in range(n)]
        got = [needs(i, start[i], False) for i in range(n)]
        redo = [i for i in range(n) if got[i] is None]
        if redo and not PRODUCTS_ON_DEMAND:
            tangents(redo)
            for i in redo:
                got[i] = needs(i, start[i], True)
        left = [[j for j in range(len(cands[i])) if j not in T[i]] for i in range(n)]
        if not (redo and PRODUCTS_ON_DEMAND) and _take_all(got, left, sents):
            fetch(left)  # the bounds exclude little (the fit moves much): every term, in one batch as before
        # else each sentence's terms on demand below (a sentence alone: its own small forward and backward)
        moved = False
        for i in range(n):
            deltas = {j: exact(i, j) for j in T[i] if j != choice[i]}
            get = needs(i, deltas, True)
            if get:
                fetch([get if k == i else [] for k in range(n)])
                deltas.update({j: exact(i, j) for j in get})
            best_j, best_delta = choice[i], 0.0
            for j in sorted(deltas, key=lambda j: (-cos[i][j], j)):  # the fit's order (cosine ranking)
                if deltas[j] < best_delta - 1e-30:
                    best_j, best_delta = j, deltas[j]
            if best_j != choice[i]:
                move(i, best_j)
                moved = True
        return moved

    try:
        for _ in range(4):
            swapped = swap_pass()
            moved = single_pass()
            if not (swapped or moved):
                break
    except (RuntimeError, NotImplementedError):
        return None
    return [cands[i][choice[i]] for i in range(n)]


class _RowCopy:
    """``g.clone()`` for a fit that reads and changes whole rows only (``resid[r]``, ``resid[r] -= t``): a row is
    copied when first used (the same values; no copy of the whole [V, d] float64 residual, ~0.2-0.3 CPU s on GPT-2)."""

    def __init__(self, g: Tensor) -> None:
        self.g, self.rows = g, {}

    def __getitem__(self, r: int) -> Tensor:
        r = int(r)
        got = self.rows.get(r)
        if got is None:
            got = self.rows[r] = self.g[r].clone()
        return got

    def __setitem__(self, r: int, v: Tensor) -> None:
        self.rows[int(r)] = v


def _cauchy(base: float, f_sq: float) -> float:
    """A single move's change ``|c|^2 + 2 e.c + |a|^2 - 2 f.a`` is at least ``base - |f_R|^2`` (``base = |c|^2 + 2 e.c``,
    ``f_sq = |f_R|^2``, ``R`` the rows the new term ``a`` can touch): ``|a|^2 - 2 f.a >= |a|^2 - 2 |f_R| |a| >= -|f_R|^2``."""
    return base - f_sq


def _take_all(got: list[list[int]], left: list[list[int]], sents: list[list[int]]) -> bool:
    """Whether a single pass takes every missing term at its start (``left``) rather than each sentence's on
    demand, given the terms its bounds leave at its start (``got``). ``RULE == "cost"``: when one backward of the
    packed batch per candidate rank (``max |left_i|`` ranks over every token) costs less than each sentence's own
    forward and one backward per term it needs (``len_i (1 + |got_i|)``) token passes. The bounds at the pass's start
    are pessimistic: a sentence that moves early in the pass removes its error from the residual, and the bounds
    of the sentences after it then hold (development GPT-2 configuration B=16, seed 0 trial 0: 74 of 144 terms
    left at the start, 38 computed on demand). ``"share"``: the rule of sessions 16-17."""
    if RULE == "share":
        return sum(map(len, got)) > LAZY_SHARE * sum(map(len, left))
    every = max(map(len, left), default=0) * sum(map(len, sents))
    demand = sum(len(s) * (1 + len(g)) for s, g in zip(sents, got) if g)
    return every < demand

