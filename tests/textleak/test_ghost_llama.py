"""LAMP/TAG on Llama-layout decoders (SmolLM2; issues 18 and 20): the vmap path's candidates per call are capped by
the per-candidate gradient size, and the ghost products cover Llama's bias-free ``Linear`` and ``LlamaRMSNorm``
layers (the tied word embedding / ``lm_head`` is one parameter, never matched), with the values of the
materialised gradients."""
from dataclasses import replace

import pytest
import torch

from common.seed import make_generator
from textleak.attacks.lamp import LAMP_DEFAULTS
from textleak.components import gradmatch
from textleak.components.search import TextSearch

from .conftest import observe_case

CASE = "text/tiny-llama/fedsgd"


def test_vmap_chunk_is_sized_from_the_parameter_count():
    assert gradmatch.vmap_chunk(16, 10_600_000) == 16  # MiniLM's matched tensors: 0.7 GB for 16, kept
    assert gradmatch.vmap_chunk(16, 106_000_000) == 2  # SmolLM2-135M's: 0.42 GB per candidate
    assert gradmatch.vmap_chunk(16, 10**10) == 1  # too large for the budget: one at a time, never 0
    assert gradmatch.vmap_chunk(3, 10, budget=10**9) == 3
    assert gradmatch.vmap_chunk(16, 100, element_size=8, budget=1600) == 2


def test_the_capped_chunk_is_what_the_vmap_path_calls_with(monkeypatch):
    kit, case, model, obs, prior, truth, batch = observe_case(CASE, 2)
    cfg = replace(LAMP_DEFAULTS, coeff_perplexity=0.0, ghost=False)
    ids = batch.inputs["input_ids"]
    s = TextSearch(cfg, obs, model, prior, make_generator(0))
    assert s.matcher.chunk == 16
    xs = torch.randn((5,) + tuple(ids.shape) + (prior.embedding.shape[1],), generator=make_generator(6))
    xs = torch.where(s.body.unsqueeze(-1), xs, s.pinned.unsqueeze(0))
    ref = s.score_batches(xs)
    n = sum(s.matcher.target[k].numel() for k in s.matcher.names)
    monkeypatch.setattr(gradmatch, "VMAP_BUDGET_BYTES", 2 * 4 * n + 1)  # room for two candidates' gradients
    small = TextSearch(cfg, obs, model, prior, make_generator(0))
    assert small.matcher.chunk == 2
    sizes = []
    real = small.matcher._grad_chunks

    def spy(x, *a):
        sizes.append(x.shape[0])
        return real(x, *a)

    monkeypatch.setattr(small.matcher, "_grad_chunks", spy)
    assert torch.allclose(small.score_batches(xs), ref, rtol=1e-5, atol=1e-7)
    assert sizes and max(sizes) == 2


@pytest.mark.parametrize("loss", ["cos", "l2"])
def test_ghost_products_cover_llama_and_match_the_materialised_gradients(loss):
    """Candidate batches (B=2, padded) and single-sentence candidates (with and without the other sentence's
    contribution) score as the vmap path's materialised gradients do; the continuous step has the value and
    embedding gradient of autograd through the dummy gradient."""
    kit, case, model, obs, prior, truth, batch = observe_case(CASE, 2)
    ids = batch.inputs["input_ids"]
    s = {g: TextSearch(replace(LAMP_DEFAULTS, loss=loss, coeff_perplexity=0.0, ghost=g, ghost_chunk=4), obs, model,
                       prior, make_generator(0)) for g in (True, False)}
    assert s[True].ghost_ok() and not s[False].ghost_ok()
    kinds = {kind for _, kind, _ in s[True].matcher._ghost.plan.values()}
    assert kinds == {"linear", "rmsnorm"}
    assert prior.embedding_name not in s[True].matcher.names  # the tied embedding / head: not matched
    scale = 1.0 if loss == "cos" else float(sum(t.double().square().sum() for t in s[True].matcher.target.values()))
    xs = prior.embedding[ids].unsqueeze(0) + 0.5 * torch.randn((6,) + tuple(ids.shape) + (prior.embedding.shape[1],),
                                                               generator=make_generator(6))
    xs = torch.where(s[True].body.unsqueeze(-1), xs, s[True].pinned.unsqueeze(0))
    got, ref = s[True].score_batches(xs), s[False].score_batches(xs)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6 * scale)
    assert float((got - ref).abs().max()) < 0.1 * float(ref.max() - ref.min())  # the values differ between candidates
    b, n = 1, s[True].lens[1]
    xc = xs[:, b, :n]
    idc = s[True].ids_of_sentence(b, xc)
    fixed = s[False].candidate_grads(0, xs[:1, 0, :s[True].lens[0]], s[True].ids_of_sentence(0, xs[:1, 0, :s[True].lens[0]]))
    zeros = {k: torch.zeros_like(v) for k, v in fixed.items()}
    for f in (fixed, zeros):
        got, ref = s[True].candidate_distances(b, xc, idc, f), s[False].candidate_distances(b, xc, idc, f)
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6 * scale)
    assert torch.allclose(s[True].candidate_distances(b, xc, idc, None), ref, rtol=1e-4, atol=1e-6 * scale)
    # continuous step
    x0 = prior.embedding[ids] + 0.1 * torch.randn(ids.shape + (prior.embedding.shape[1],), generator=make_generator(4))
    out = {}
    for ghost in (True, False):
        x = x0.clone().requires_grad_(True)
        xe = s[True].pin(x)
        tg = s[True].targets_of(s[True].ids_of(xe.detach()))
        d = (s[True].matcher.ghost_batch_distance(xe, s[True].mask, None, tg) if ghost
             else s[True].matcher.batch_distance(xe, s[True].mask, None, tg))
        out[ghost] = (d.detach(), torch.autograd.grad(d, x)[0])
    assert torch.allclose(out[True][0], out[False][0], rtol=1e-4, atol=1e-6 * scale)
    assert torch.allclose(out[True][1], out[False][1], rtol=1e-3, atol=1e-4 * float(out[False][1].abs().max()))


def test_ghost_llama_attack_ends_where_the_vmap_path_does():
    """A short LAMP run (continuous steps and swap rounds) with the ghost paths and with the vmap / autograd paths
    ends on the same tokens and loss."""
    kit, case, model, obs, prior, truth, batch = observe_case(CASE, 1)
    cfg = replace(LAMP_DEFAULTS, coeff_perplexity=0.0, n_steps=30, init_candidates=4, init_permutations=4,
                  swap_every=10, swap_candidates=8)
    runs = [TextSearch(replace(cfg, ghost=g, ghost_step=g), obs, model, prior, make_generator(0)) for g in (True, False)]
    recs = [r.run() for r in runs]
    assert runs[0].ghost_ok()  # still on the ghost path at the end (no silent fallback)
    assert recs[0].extras["token_ids"] == recs[1].extras["token_ids"]
    assert recs[0].stats["best_loss"] == pytest.approx(recs[1].stats["best_loss"], rel=1e-3)
