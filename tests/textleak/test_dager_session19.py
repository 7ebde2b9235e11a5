"""DAGER decoder speed-ups of session 19 (issue 18): the rotary prefilter cut at a clear gap of the feed-forward-input
distances (``decoder.ROPE_FFN_GAP``) and the lazy fit's forward-mode products on demand (``last_fit.PRODUCTS_ON_DEMAND``)
leave the token ids and the joint fit's choice unchanged."""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)
pytest.importorskip("transformers")

from .test_dager import _setup  # noqa: E402
from .test_dager_session18 import _wrong_start  # noqa: E402


def test_ffn_cut_rule():
    """The cut lies in the gap between the true extensions (~1e-6) and the false ones (>= 3e-3), never under the
    reference tau_2; without a clear gap the prefilter keeps FFN_PREFILTER."""
    from textleak.attacks.dager import decoder
    from textleak.attacks.dager.config import FFN_PREFILTER, DagerConfig
    from textleak.attacks.dager.run import Run

    run = Run(DagerConfig(), (0.1, 0.01))
    gen = torch.Generator().manual_seed(0)
    false = 3e-3 + (0.2 - 3e-3) * torch.rand(2000, generator=gen, dtype=torch.float64)
    true = 1e-7 + 1e-6 * torch.rand(6, generator=gen, dtype=torch.float64)
    d = torch.cat([false, true])[torch.randperm(2006, generator=gen)].view(2, 1003)
    cut = decoder._ffn_cut(run, d)
    assert run.config.l2_span_thresh <= cut < 3e-3
    assert int((d < cut).sum()) == 6
    assert decoder._ffn_cut(run, false.view(4, 500)) == FFN_PREFILTER  # no gap: the old threshold


@pytest.mark.parametrize("name", ["tiny-llama"])
def test_rope_gap_cut_same_token_ids(name, monkeypatch):
    """On a rotary decoder the search with the gap cut sends fewer extensions to layer 2 and returns the same token ids
    and certified flags as with the full rows of every candidate (ROPE_FFN_GAP False)."""
    from common.seed import make_generator
    from textleak.attacks.dager import DAGER, DagerConfig, decoder

    kit, case, model, obs, prior, truth, _ = _setup(f"text/{name}/dager", 4)
    rows: list[int] = []
    orig = decoder.decoder_last_inputs

    def counted(li2, prefixes, cands, **k):
        rows.append(sum(len(p) + len(c) for p, c in zip(prefixes, cands)))
        return orig(li2, prefixes, cands, **k)

    monkeypatch.setattr(decoder, "decoder_last_inputs", counted)
    new = DAGER(DagerConfig()).reconstruct(obs, model, prior, generator=make_generator(0))
    n_new = sum(rows)
    rows.clear()
    monkeypatch.setattr(decoder, "ROPE_FFN_GAP", False)
    old = DAGER(DagerConfig()).reconstruct(obs, model, prior, generator=make_generator(0))
    assert new.stats.get("ffn_prefilter") == 1.0
    assert new.stats.get("prefilter_gap_steps", 0) > 0
    assert new.extras["token_ids"] == old.extras["token_ids"]
    assert new.extras.get("certified") == old.extras.get("certified")
    assert kit.score(new, truth, case=case)[0]["rouge1"] > 0.9
    assert n_new < sum(rows)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_products_on_demand_reach_the_joint_fit(name, monkeypatch):
    """With the products on demand and with the batch at each pass's start, the lazy fit returns the joint fit's choice
    over every term; with the product bounds broken (a margin of -1e3, Cauchy-Schwarz off) it does not."""
    from textleak.attacks.dager import last_fit

    ref, cands, run = _wrong_start(name)
    for on in (True, False):
        monkeypatch.setattr(last_fit, "PRODUCTS_ON_DEMAND", on)
        assert run()[0] == ref, on
    monkeypatch.setattr(last_fit, "PRODUCTS_ON_DEMAND", True)
    monkeypatch.setattr(last_fit, "CAUCHY", False)
    monkeypatch.setattr(last_fit, "JVP_MARGIN", -1e3)
    assert run()[0] != ref
