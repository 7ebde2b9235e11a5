"""DAGER's encoder search, certified sentence lengths (issue 18): the longest sentence left in a noise-free
FedSGD gradient is read exactly from the position table's update, peeled or not, and the search that
tries it first returns what the original order returns."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

torch.set_num_threads(1)
pytest.importorskip("transformers")

from .test_dager import _tiny_bert_obs  # noqa: E402


def test_longest_length_is_exact_before_and_after_peeling():
    """One past the last nonzero position row is the longest true length; after peeling the longest
    sentence it is the longest one left; declared defenses or a missing table give None."""
    from textleak.attacks.dager.encoder import longest_length
    from textleak.attacks.dager.peel import peel
    from textleak.attacks.dager.span import find_tap

    kit, case, model, obs, prior, truth = _tiny_bert_obs(3)  # float64
    ids = truth["token_ids"]
    lens = sorted(len(s) for s in ids)
    assert lens[-1] > lens[-2], lens  # (the batch this test needs: a unique longest sentence)
    assert longest_length(obs, model) == lens[-1]
    tap1 = find_tap(model, 0, torch.tensor([[0, 1, 2]]))
    longest = max(ids, key=len)
    res = peel(obs, model, prior, [longest], tap1)
    assert res is not None and res[1] == [longest]
    assert longest_length(res[0], model) == lens[-2]
    # the shortest left alone
    rest = [s for s in ids if s is not longest and len(s) == lens[-2]]
    res2 = peel(res[0], model, prior, rest, tap1)
    assert res2 is not None and longest_length(res2[0], model) == lens[0]
    assert longest_length(replace(obs, defenses=({"name": "gaussian", "sigma": 0.0},)), model) is None
    pos = next(n for n, p in model.named_parameters() if "position_embeddings" in n)
    assert longest_length(replace(obs, tensors={k: v for k, v in obs.tensors.items() if k != pos}), model) is None


@pytest.mark.parametrize("b", [3])
def test_certified_length_order_returns_the_original_ids(b, monkeypatch):
    """Tiny BERT (float64), every length forced through the beam: ``DAGER()`` (longest certified length
    first) and ``DAGER(fast=False)`` (the separator's prior order) recover the same token ids, exactly
    the batch; the fast path's first length searched is the longest true one."""
    from common.seed import make_generator
    from textleak.attacks.dager import DAGER, DagerConfig
    from textleak.attacks.dager import encoder

    kit, case, model, obs, prior, truth = _tiny_bert_obs(b)
    tried: list[int] = []
    orig = encoder._EncoderSearch._length

    def spy(self, per, wide, penalise=True):
        tried.append(len(per))
        return orig(self, per, wide, penalise)

    monkeypatch.setattr(encoder._EncoderSearch, "_length", spy)
    monkeypatch.setattr(encoder, "ENCODER_EXHAUSTIVE_MAX", 0)
    recs, order = [], []
    for fast in (True, False):
        tried.clear()
        recs.append(DAGER(DagerConfig(), fast=fast).reconstruct(obs, model, prior, generator=make_generator(7)))
        order.append(list(tried))
    assert recs[0].extras["token_ids"] == recs[1].extras["token_ids"]
    longest = max(len(s) for s in truth["token_ids"])
    assert order[0][0] == longest and order[1][0] != longest, order  # (the original order starts elsewhere)
    metrics, _ = kit.score(recs[0], truth, case=case)
    assert metrics["exact_match"] == 1.0, (recs[0].data, truth["sentences"])
