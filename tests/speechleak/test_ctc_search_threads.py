"""Speed of the CTC search (issue 21, session 19): the plain-autograd parameter gradient and ``search_threads`` change
the cost, not the numbers: the same tensors bit for bit as torch.func.grad and as one search after another."""
import shutil
import threading

import pytest
import torch

from common.functional import functional_gradient, graph_gradient, trainable_params
from speechleak.attack import SpeechGradientInversion, SpeechInversionConfig
from speechleak.kit import ctc_loss
from speechleak.search import model_for_thread, run_concurrently

TEXT = "go on now and then come back"


@pytest.fixture(scope="module")
def setting(ctc_case):
    if shutil.which("flite") is None:
        pytest.skip("flite is not installed (apt-get install flite)")
    return ctc_case(TEXT, 32000)  # feats [1, 16, 126]


def test_graph_gradient_equals_functional_gradient_and_its_input_derivative(setting):
    """Matching objective and its derivative w.r.t. the features (through the CTC's finite-difference second
    derivative): identical bit for bit whether the parameter gradient comes from torch.func.grad or plain autograd."""
    fe, feats, model, obs, prior, lower = setting
    params = {k: v.detach().double() for k, v in trainable_params(model).items()}
    target = {k: v.double() for k, v in obs.tensors.items()}
    x = (feats.double() + 0.3 * torch.randn(feats.shape, generator=torch.Generator().manual_seed(3),
                                            dtype=torch.float64)).requires_grad_(True)
    out = []
    for fn in (functional_gradient, graph_gradient):
        g = fn(model, ctc_loss, params, prior.build_batch(x, obs.labels))
        d = sum((g[k] - target[k]).pow(2).sum() for k in target)
        out.append((d.detach(), torch.autograd.grad(d, x)[0]))
    assert float(out[0][0]) > 0 and float(out[0][1].abs().max()) > 0
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_run_concurrently_keeps_the_order_gives_each_thread_its_model_and_restores_threads():
    model = torch.nn.Linear(2, 2)
    before = torch.get_num_threads()

    def job(i: int):
        return i, threading.get_ident(), model_for_thread(model), model_for_thread(model)

    seq = run_concurrently([lambda i=i: job(i) for i in range(4)], 1)
    assert [r[0] for r in seq] == [0, 1, 2, 3] and all(r[2] is model for r in seq)  # sequential: the model itself
    par = run_concurrently([lambda i=i: job(i) for i in range(4)], 2)
    assert [r[0] for r in par] == [0, 1, 2, 3]
    for _, ident, m1, m2 in par:  # one copy per thread, reused by that thread, equal to the model
        assert m1 is m2 and m1 is not model and torch.equal(m1.weight, model.weight)
        assert all(r[2] is m1 for r in par if r[1] == ident)
    assert model_for_thread(model) is model and torch.get_num_threads() == before

    def boom():
        raise RuntimeError("job failed")

    with pytest.raises(RuntimeError, match="job failed"):
        run_concurrently([lambda: 1, boom], 2)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_threaded_alignment_and_searches_give_the_same_result(setting):
    """Two espeak-ng voices aligned and searched (coarse stage, then frames) and averaged: with ``search_threads=2``
    the voices' alignments and the two searches run at once, and features, objective and voice order are identical."""
    fe, feats, model, obs, prior, lower = setting
    base = dict(optimizer="lbfgs", precision="float64", init_scale=0.0, tv_weight=1e-5, restarts=1, iterations=8,
                griffin_lim_iters=1, init_seconds_per_char=0.066 * 2, init_warp_iterations=8, init_warp_knots=1,
                init_tts_voice="espeak-ng:en-us,espeak-ng:en-gb", init_tts_average=2, coarse_time_factor=4,
                coarse_iterations=4, output_time_blur=2.0)
    recs = [SpeechGradientInversion(SpeechInversionConfig(**base, search_threads=n)).reconstruct(
        obs, model, prior, generator=torch.Generator().manual_seed(0)) for n in (1, 2)]
    assert recs[0].extras["init_voices_averaged"] == recs[1].extras["init_voices_averaged"]
    assert torch.equal(recs[0].data["features"], recs[1].data["features"])
    assert recs[0].stats["final_grad_loss"] == recs[1].stats["final_grad_loss"]
    assert float((recs[0].data["features"] - feats).abs().max()) > 0  # a real search, not the clip
