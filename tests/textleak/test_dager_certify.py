"""The layer-1 certificate of DAGER's ranked encoder search (``certify.py``, issue 20)."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from .test_dager import _tiny_bert_obs  # noqa: E402


def test_layer1_certificate_accepts_true_sentences_and_rejects_near_misses():
    """Subtracting a true sentence's exact gradient with its true label removes its own layer-1 directions (the
    rank drops to the floor): certified, with that label. A sentence cut or continued by one token, or with one
    token swapped for another batch token, changes every position's backward signal: no direction is removed."""
    from textleak.attacks.dager.certify import Certifier
    from textleak.attacks.dager.span import find_tap

    kit, case, model, obs, prior, truth = _tiny_bert_obs(3)
    tap1 = find_tap(model, 0, torch.tensor([[0, 1, 2]]))
    gmodel = copy.deepcopy(model).double().eval()  # the float64 copy the attack hands the certificate
    cert = Certifier(obs, gmodel, prior, (tap1, find_tap(model, 1, torch.tensor([[0, 1, 2]]))))
    assert cert.usable
    ids, labels = truth["token_ids"], truth["labels"].tolist()
    for seq, y in zip(ids, labels):
        assert cert.label(seq) == y
    other = ids[1]
    wrong = []
    for seq in ids:
        wrong.append(seq[:-2] + seq[-1:])  # cut by one token
        wrong.append(seq[:-1] + [other[2]] + seq[-1:])  # continued by one (batch) token
        swap = list(seq)
        swap[2] = next(t for t in other[1:-1] if t != seq[2])
        wrong.append(swap)
    for w in wrong:
        assert w not in ids
        assert cert.label(w) is None, w
    # take: a wrong sentence is not peeled; a true one is, and the residual is the rest's mean-loss update
    assert not cert.take(wrong[0]) and not cert.peeled
    # (the residual of 2 sentences shows the layer-2 gap; the search goes on unless STOP_AT_GAP: see below)
    assert not cert.take(ids[0]) and cert.peeled == [(ids[0], labels[0])] and cert.exact and not cert.stop
    res = cert.residual()
    assert res.num_examples == 2
    rest = Certifier(res, cert.gmodel, prior, cert.taps)
    assert rest.label(ids[1]) == labels[1] and rest.label(ids[0]) is None


def test_ranked_encoder_search_certifies_only_right_sentences_past_the_layer2_limit():
    """Tiny BERT at B=7 (67 tokens, width 64): layer 2 is saturated, layer 1 is not. With the certificate the
    ranked search's right sentence is certified and peeled, and no wrong one is flagged; without it (the
    previous best effort) nothing is certified."""
    from textleak.attacks.dager import DAGER, DagerConfig

    kit, case, model, obs, prior, truth = _tiny_bert_obs(7)
    ids = truth["token_ids"]
    flagged = {}
    for on in (True, False):
        rec = DAGER(DagerConfig(certify=on, time_budget_s=60, budget_clock="cpu")).reconstruct(
            obs, model, prior, generator=torch.Generator())
        assert rec.stats["saturated_l2"] == 1.0 and not rec.stats.get("saturated_l1")
        got, cert = rec.extras["token_ids"], rec.extras["certified"]
        flagged[on] = [g for g, c in zip(got, cert) if c]
        assert all(g in ids for g in flagged[on])
    assert len(flagged[True]) >= 1 and flagged[False] == []


@pytest.mark.parametrize("b", [5, 6])
def test_exact_path_certifies_only_sentences_a_check_confirms(b):
    """Tiny BERT at B=5/6 (rank 42/48 and 47/56 of width 64): the exact search's span tests pass wrong sentences
    too (it returns 1 and 2 right sentences). Certified flags come from checks that can fail (``verify.py``): the
    whole update is not explained by the output, so each sentence is checked by the layer-1 certificate, which flags
    exactly the right ones. At B=4 every output is right and the whole update is explained (residual ~1e-15)."""
    from textleak.attacks.dager import DAGER, DagerConfig
    from textleak.attacks.dager.verify import TOL

    for bb in (b, 4):
        kit, case, model, obs, prior, truth = _tiny_bert_obs(bb)
        rec = DAGER(DagerConfig(time_budget_s=60, budget_clock="cpu")).reconstruct(
            obs, model, prior, generator=torch.Generator())
        assert not rec.stats.get("frontier")  # the exact path
        ids = truth["token_ids"]
        right = [g in ids for g in rec.extras["token_ids"]]
        assert rec.extras["certified"] == right, (bb, rec.extras["certified"], right)
        assert any(right)
        if bb == 4:
            assert all(right) and rec.stats["cert_residual"] <= TOL
        else:
            assert not all(right) and rec.stats["cert_residual"] > TOL


def test_whole_update_check_fits_true_sentences_and_rejects_a_wrong_one():
    """``verify.explains``: the true sentences (labels read from the classifier head's update, or, without the head,
    chosen among all labels' per-example gradients) explain the update to float64 round-off, in any order; one
    sentence cut by a token leaves a residual far above ``TOL``."""
    import copy
    from dataclasses import replace

    from textleak.attacks.dager.span import find_tap
    from textleak.attacks.dager.verify import TOL, explains

    kit, case, model, obs, prior, truth = _tiny_bert_obs(4)
    taps = [find_tap(model, i, torch.tensor([[0, 1, 2]])) for i in (0, 1)]
    names = [n for t in taps for n in t.names if n in obs.tensors]
    gm = copy.deepcopy(model).eval()
    ids = [list(s) for s in truth["token_ids"]]
    for p in (prior, replace(prior, label_weight=None)):
        assert explains(obs, gm, p, "encoder", ids[::-1], names) <= TOL
        wrong = [ids[0][:-2] + ids[0][-1:]] + ids[1:]
        assert explains(obs, gm, p, "encoder", wrong, names) > 1e3 * TOL
    assert explains(obs, gm, prior, "encoder", ids[:3], names) == float("inf")  # not B sentences


def test_cut_of_a_continued_true_sentence_is_certified_and_a_wrong_cut_is_not(monkeypatch):
    """``cert_cuts``: a true sentence continued past its end by another sentence's tail is not certified, but its cut
    at the true length is (screened among the cuts at every candidate length by the mean layer-2 distance, then
    certified and peeled with its label); a sentence wrong before every cut has no certified cut; with ``CUTS`` off
    the continued sentence is rejected as before."""
    from textleak.attacks.dager import cert_cuts
    from textleak.attacks.dager.certify import Certifier
    from textleak.attacks.dager.span import LayerInputs, find_tap, observed_matrix, span_of

    kit, case, model, obs, prior, truth = _tiny_bert_obs(3)
    probe = torch.tensor([[0, 1, 2]])
    taps = (find_tap(model, 0, probe), find_tap(model, 1, probe))
    li2, span2 = LayerInputs(model, taps[1]), span_of(observed_matrix(taps[1], obs.tensors))
    gmodel = copy.deepcopy(model).double().eval()
    ids, labels = truth["token_ids"], truth["labels"].tolist()
    sep = ids[0][-1]
    longest = max(len(s) for s in ids) + 4
    l1 = [([sep, 0], None)] * longest  # the separator passes layer 1 everywhere: every shorter length is a candidate
    i = min(range(len(ids)), key=lambda k: len(ids[k]))  # the shortest, continued by another's tail
    other = ids[(i + 1) % len(ids)]
    long = ids[i][:-1] + other[3:]
    assert len(long) > len(ids[i]) and long not in ids
    wrong = list(ids[(i + 1) % len(ids)])
    wrong[1] = next(t for t in ids[i][1:-1] if t != wrong[1])  # wrong at its first word: every cut is wrong
    wrong = wrong[:-1] + other[3:]
    for on in (False, True):
        monkeypatch.setattr(cert_cuts, "CUTS", on)
        cert, stats = Certifier(obs, gmodel, prior, taps), {}
        take = cert_cuts.hook(cert, li2, span2, l1, stats)
        assert not take(wrong) and not cert.peeled
        stop = take(long)  # (the residual's layer 2 then shows a clear gap; the search stops only with STOP_AT_GAP)
        assert not stop and cert.exact == on
        assert cert.peeled == ([(ids[i], labels[i])] if on else [])
        if on:
            assert stats["cert_cuts_peeled"] == 1.0 and stats["cert_cuts_tested"] <= 2 * cert_cuts.CUT_TESTS


def test_stop_at_gap_switch_stops_the_search_only_when_on(monkeypatch):
    """``STOP_AT_GAP`` (off since session 22): with it on, peeling a true sentence whose residual shows the layer-2
    gap returns True (the ranked search stops there, session 17's design); off, the same peel returns False."""
    from textleak.attacks.dager import certify
    from textleak.attacks.dager.span import find_tap

    kit, case, model, obs, prior, truth = _tiny_bert_obs(3)
    taps = tuple(find_tap(model, k, torch.tensor([[0, 1, 2]])) for k in (0, 1))
    gmodel = copy.deepcopy(model).double().eval()
    ids = truth["token_ids"]
    off = certify.Certifier(obs, gmodel, prior, taps)
    assert not off.take(ids[0]) and off.exact and len(off.peeled) == 1
    monkeypatch.setattr(certify, "STOP_AT_GAP", True)
    on = certify.Certifier(obs, gmodel, prior, taps)
    assert on.take(ids[0]) and on.stop and len(on.peeled) == 1
