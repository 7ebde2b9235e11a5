"""DAGER's last-token early exit with the support bound of the sentence's own tokens (issue 18, session 13):
the bound is above every candidate's exact score, own tokens included, and the certified choice with it
equals the choice without it (and the full ranking and joint fit) from fewer exact terms."""
from __future__ import annotations

import functools

import pytest
import torch

torch.set_num_threads(1)
pytest.importorskip("transformers")

from .test_dager import _completion, _sentences, _setup  # noqa: E402


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_support_bound_is_above_every_exact_score(name):
    from textleak.attacks.dager import last_exit, last_token

    model, obs, batch, sents, out, key, (g, hs, _, graph) = _completion(name, 4)
    r_norm = float(g.norm())
    cands = [[5, 17, 40, s[0], s[-1], sents[(i + 1) % len(sents)][0]] for i, s in enumerate(sents)]  # own tokens too
    ges = last_token._packed_terms(graph, out.weight, sents, cands)
    tight = 0
    for i, s in enumerate(sents):
        ub = last_exit.support_bounds(g.pow(2).sum(1), s, cands[i], r_norm)
        for k, y in enumerate(cands[i]):
            _, rows = last_token._order(s, [y], hs[i], ges[i][k:k + 1], g, r_norm)
            cos = last_exit._cos(rows[0], g, r_norm)
            assert cos <= ub[k]
            tight += ub[k] < 0.999  # a bound, not the trivial 1
    assert tight > 0


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_support_bound_same_choice_fewer_terms(name, monkeypatch):
    from textleak.attacks.dager import last_exit, last_token

    _, _, model, obs, _, truth, batch = _setup(f"text/{name}/dager", 6)
    model.eval()
    sents = _sentences(batch)
    terms: list[int] = []
    results: list[bool] = []
    orig_terms, orig_choice = last_token._packed_terms, last_exit.certified_choice

    def count(graph, w, ss, cands):
        terms[-1] += max(len(c) for c in cands)  # one backward per candidate rank
        return orig_terms(graph, w, ss, cands)

    monkeypatch.setattr(last_token, "_packed_terms", count)
    outs = []
    for sb in (True, False):
        terms.append(0)

        def choice(*a, sb=sb, **k):
            r = orig_choice(*a, support_bound=sb, **k)
            results.append(r is not None)
            return r

        monkeypatch.setattr(last_token, "certified_choice", choice)
        outs.append(last_token.complete_last(obs, model, sents))
    full = last_token.complete_last(obs, model, sents, early_exit=False)
    assert results == [True, True]
    assert outs[0] == outs[1] == full
    assert terms[0] <= terms[1]
    assert sum(a == b for a, b in zip(outs[0], truth["token_ids"])) >= 5


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_split_terms_equal_packed_terms(name):
    """The terms of the sentences with more than one candidate from their own forward (``_split_terms``)
    equal those of the whole packed graph (float32 round-off)."""
    from textleak.attacks.dager import last_exit, last_token

    model, obs, batch, sents, out, key, (_, _, _, graph) = _completion(name, 5)
    cands = [[5], [17, 40, sents[1][0]], [7], [9], [11, 12]]  # two of five sentences with more than one
    got = last_exit._split_terms(model, graph, out.weight, sents, cands)
    want = last_token._packed_terms(graph, out.weight, sents, cands)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_sub_pack_jvp_equals_full(name):
    """The forward-mode product of a few sentences packed alone (``_sub_pack``) equals theirs in the whole
    packed batch (a sentence sees only itself)."""
    from textleak.attacks.dager import last_exit, last_token

    model, obs, batch, sents, out, key, (g, _, _, graph) = _completion(name, 5)
    full = last_exit._jvp(model, graph, sents, g)
    pick = [1, 3]
    sub = [sents[i] for i in pick]
    got = last_exit._jvp(model, last_exit._sub_pack(model, sub), sub, g)
    assert torch.allclose(got, full[pick], rtol=1e-4, atol=1e-5 * float(full.abs().max()))
    assert float(full[pick].abs().max()) > 0


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_lazy_fit_equals_joint_fit_from_a_wrong_start(name):
    """``last_fit.lazy_fit`` runs the joint fit with terms on demand: from a start where two sentences hold a wrong
    candidate (so the fit must move) it reaches the same choice as ``last_token._joint_fit`` over every term, from
    fewer exact terms."""
    from textleak.attacks.dager import last_exit, last_fit, last_token

    model, obs, batch, sents, out, key, (g, hs, denom, graph) = _completion(name, 6)
    r_norm = float(g.norm())
    pool = sorted({y for s in sents for y in s[-2:]} | {5, 17, 40, 63})
    cands, true_ys = [], []
    for i, s in enumerate(sents):
        true_y = int(batch.inputs["input_ids"][i, len(s)])
        true_ys.append(true_y)
        wrong = [y for y in pool if y != true_y][:6]
        order = [wrong[0], true_y] if i < 2 else [true_y, wrong[0]]  # two sentences start on a wrong candidate
        cands.append(order + wrong[1:])
    ges = last_token._packed_terms(graph, out.weight, sents, cands)
    full = []
    for i, s in enumerate(sents):
        rows = [last_token._order(s, [y], hs[i], ges[i][k:k + 1], g, r_norm)[1][0] for k, y in enumerate(cands[i])]
        full.append([{r: t / (denom * len(s)) for r, t in rr.items()} for rr in rows])
    ref = [cands[i][j] for i, j in enumerate(last_token._joint_fit(g, cands, full, len(sents)))]
    assert ref != [c[0] for c in cands]  # the fit moves
    fetched: list[int] = []

    def terms(gr, w, ss, cc):
        fetched.append(sum(len(c) for c in cc))
        return last_exit._split_terms(model, gr, w, ss, cc)

    rows0 = [last_token._order(s, [c[0]], hs[i], ges[i][:1], g, r_norm)[1][0] for i, (s, c) in enumerate(zip(sents, cands))]
    known = [{0: (last_exit._cos(r, g, r_norm), r)} for r in rows0]
    got = last_fit.lazy_fit(model, graph, out.weight, sents, cands, known, [0] * len(sents), hs, g, r_norm, denom, terms)
    assert got == ref
    assert sum(fetched) < sum(len(c) - 1 for c in cands)
    assert sum(a == b for a, b in zip(got, true_ys)) >= 5
