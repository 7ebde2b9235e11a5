"""The layer-1 certificate of DAGER's ranked encoder search (``certify.py``, issue 20)."""
from __future__ import annotations

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
    cert = Certifier(obs, model, prior, (tap1, find_tap(model, 1, torch.tensor([[0, 1, 2]]))))
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
    assert cert.take(ids[0]) and cert.peeled == [(ids[0], labels[0])]
    res = cert.residual()
    assert res.num_examples == 2
    rest = Certifier(res, model, prior, cert.taps, cert.gmodel)
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
