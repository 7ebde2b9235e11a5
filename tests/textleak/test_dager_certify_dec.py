"""Certificates for the ranked rotary decoder search (``certify_dec.py``, issue 20): on a tiny Llama past layer 2's rank,
the true sentences certify (one batched backward, a token of their own vanishing from layer 1's coefficients) and
near misses (one token short, another last token, the ranked search's wrong sentences) do not."""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)
pytest.importorskip("transformers")

from .test_dager import _attack, _setup  # noqa: E402


def _ctx():
    from textleak.attacks.dager.span import LayerInputs, find_tap

    kit, case, model, obs, prior, truth, _ = _setup("text/tiny-llama/dager", 8, seed=1)
    model.eval()
    li1 = LayerInputs(model, find_tap(model, 0, torch.tensor([[0, 1, 2]])))
    tokens = sorted({t for s in truth["token_ids"] for t in s[:-1]})
    return kit, case, model, obs, prior, truth, li1, tokens


def test_true_sentences_certify_and_near_misses_do_not():
    from textleak.attacks.dager.certify_dec import CERT_TOL, certify

    _, _, model, obs, prior, truth, li1, tokens = _ctx()
    true = [list(s) for s in truth["token_ids"]]
    stats: dict[str, float] = {}
    assert certify(obs, model, prior, li1, tokens, true, stats) == [True] * len(true)
    assert stats["cert_accepted_max"] < 0.1 * CERT_TOL
    short = [s[:-1] for s in true]
    other = [s[:-1] + [next(t for t in tokens if t != s[-1])] for s in true]
    swapped = [s[:1] + [s[2], s[1]] + s[3:] for s in true if len(s) > 3 and s[1] != s[2]]
    stats = {}
    assert not any(certify(obs, model, prior, li1, tokens, short + other + swapped, stats))
    assert stats["cert_rejected_min"] > 10 * CERT_TOL
    # a true sentence among wrong ones: only it certifies
    assert certify(obs, model, prior, li1, tokens, short[:3] + [true[3]] + other[4:6]) == [False] * 3 + [True, False, False]


def test_ranked_search_flags_only_exact_sentences():
    """The ranked rotary search (layer 2 saturated, layer 1 exact) now certifies what it recovers exactly, and only
    that (without the certificate every flag was False); no peeling round here."""
    _, _, model, obs, prior, truth, _, _ = _ctx()
    rec = _attack(obs, model, prior, on_failure="raise")
    assert rec.stats["saturated_l2"] == 1.0 and not rec.stats.get("saturated_l1")
    true = {tuple(s) for s in truth["token_ids"]}
    got = [tuple(s) for s in rec.extras["token_ids"]]
    exact = [s in true for s in got]
    assert 1 <= sum(exact) < len(got)
    assert rec.extras["certified"] == exact
    assert rec.stats["certified"] == sum(exact) / len(got)


def test_peeling_the_certified_sentences_makes_the_rest_exact():
    """Peeling (``peel_dec.py``): the certified sentences' exact gradients are subtracted, the residual (rescaled to
    the remaining batch) is no longer saturated at layer 2, and the attack's exact search on it recovers every
    remaining sentence; all 8 come back exact and certified on the observed update (ROUGE-1 about 0.69 -> 1.0)."""
    kit, case, model, obs, prior, truth, _, _ = _ctx()
    rec = _attack(obs, model, prior, on_failure="raise", peel_rounds=1)
    st = rec.stats
    assert st["saturated_l2"] == 1.0 and 1 <= st["round1_certified"] < 8 and st["peel_rounds"] == 1.0
    assert st["peel_l1_vanished"] >= 1  # (clean_layer1: the peeled sentences' own tokens leave layer 1 exactly)
    assert not st.get("round2_saturated_l2") and st["round2_rank_l2"] < 64 - 6
    assert rec.extras["token_ids"] and sorted(map(tuple, rec.extras["token_ids"])) == sorted(map(tuple, truth["token_ids"]))
    assert rec.extras["certified"] == [True] * 8 and st["certified"] == 1.0
    assert kit.score(rec, truth, case=case)[0]["rouge1"] == pytest.approx(1.0)
