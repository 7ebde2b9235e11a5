"""First-layer fixed point for CTC inversion (issue 21): the first convolution's weight gradient is
linear in the input once that layer's output error is known, so the input is solved in closed form."""
import copy

import pytest
import torch

from common.functional import trainable_params
from common.types import Batch
from speechleak.attack import SpeechGradientInversion, SpeechInversionConfig
from speechleak.ctc import first_layer_refine, output_error, patch_operator, speech_block
from speechleak.kit import ctc_loss

TEXT = "go on now and then come back"


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _conv1_error(model, x, labels):
    tl = (labels != 0).sum(-1)
    return output_error(model.conv1, lambda xx: ctc_loss(model, Batch({"feats": xx, "target_lengths": tl}, labels)).sum(),
                        x).detach()


@pytest.fixture(scope="module")
def setting(ctc_case):
    """A 2 s flite clip (speech centred in silence), 16 mel bins at hop 256, a random-init recogniser
    (dim 32) in float64, its FedSGD gradient with the transcript granted."""
    fe, feats, model, obs, prior, lower = ctc_case(TEXT, 32000)
    return fe, feats.double(), copy.deepcopy(model).double(), obs, prior, lower, model


def test_patch_operator_is_the_weight_gradient_of_the_first_convolution():
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv1d(3, 4, 5, stride=2, padding=2).double()
    x = torch.randn(1, 3, 17, generator=g, dtype=torch.float64)
    delta = torch.randn(1, 4, 9, generator=g, dtype=torch.float64)
    w_grad = torch.autograd.grad((conv(x) * delta).sum(), conv.weight)[0]  # [O, F, k]
    a = patch_operator(delta[0], 17, kernel=5, stride=2, padding=2)  # [(o, k), T]
    assert torch.allclose(a @ x[0].T, w_grad.permute(0, 2, 1).reshape(20, 3), atol=1e-12)


def test_true_first_layer_error_gives_the_clip_back(setting):
    """With the clip's own conv1 output error, one closed-form solve from silence returns the clip."""
    fe, feats, model, obs, prior, lower, _ = setting
    delta = _conv1_error(model, feats, obs.labels)
    start = torch.full_like(feats, lower)
    out = first_layer_refine(lambda x: delta, start, obs.tensors["conv1.weight"].double(), kernel=5, stride=2, padding=2,
                             blocks=[(0, feats.shape[-1] - 1)], floor=lower, upper=None, steps=1, ridge=1e-8)
    assert _cos(start, feats) < 0.8 and _cos(out, feats) > 0.999, (_cos(start, feats), _cos(out, feats))


def test_fixed_point_moves_a_blurred_estimate_towards_the_clip(setting):
    """The attack's refinement (error at the estimate, silence outside the speech block held at the floor)
    from the clip blurred over time (a stand-in for a gradient-matching result whose speech detail is off)."""
    fe, feats, model, obs, prior, lower, _ = setting
    kernel = torch.ones(1, 1, 9, dtype=feats.dtype) / 9
    blurred = torch.nn.functional.conv1d(feats.reshape(-1, 1, feats.shape[-1]), kernel, padding=4).reshape(feats.shape)
    blurred = blurred.clamp(min=lower)
    attack = SpeechGradientInversion(SpeechInversionConfig(precision="float64", refine_first_layer_steps=20))
    params = {k: v.detach() for k, v in trainable_params(model).items()}
    block = speech_block(feats[0], lower)
    out = attack._refine_first_layer(blurred, [block], obs, model, prior, params, obs.labels, "mean")
    before, after = _cos(blurred, feats), _cos(out, feats)
    assert after > 0.98 and after > before + 0.015, (before, after)  # measured 0.962 -> 0.985
    assert torch.all(out[..., : max(0, block[0] - 8)] == lower)  # silence held at the floor


def test_refinement_outside_its_setting_is_refused(setting):
    fe, feats, model, obs, prior, lower, _ = setting
    attack = SpeechGradientInversion(SpeechInversionConfig(refine_first_layer_steps=2, domain="waveform"))
    with pytest.raises(ValueError, match="refine_first_layer_steps"):
        attack._refine_first_layer(feats, None, obs, model, prior, {}, obs.labels, "mean")


def test_reconstruct_applies_the_refinement_to_its_search_result(setting):
    """``refine_first_layer_steps`` runs after the search: same search, then the same refinement as above."""
    fe, feats, _, obs, prior, lower, model = setting  # the float32 model, as the kit builds it
    base = dict(optimizer="lbfgs", precision="float64", init_scale=0.0, tv_weight=1e-5, iterations=3, restarts=1,
                init_seconds_per_char=0.066, griffin_lim_iters=1)
    plain = SpeechGradientInversion(SpeechInversionConfig(**base)).reconstruct(
        obs, model, prior, generator=torch.Generator().manual_seed(0))
    attack = SpeechGradientInversion(SpeechInversionConfig(**base, refine_first_layer_steps=3))
    refined = attack.reconstruct(obs, model, prior, generator=torch.Generator().manual_seed(0))
    params = {k: v.detach().double() for k, v in trainable_params(model).items()}
    again = attack._refine_first_layer(plain.data["features"].double(), None, obs, model, prior, params, obs.labels, "mean")
    assert "refine_first_layer_s" in refined.extras
    assert not torch.allclose(refined.data["features"], plain.data["features"])
    assert torch.allclose(refined.data["features"], again.float(), atol=1e-3)
