"""Layer-wise inversion (issue 21): each layer's input from its own weight gradient once its output error is
known. On a real flite clip and a small random-init recogniser: the recorded (input, error) pairs give the
observed gradient, and the closed-form solves return the clip's hidden states and features from a wrong start."""
import copy

import pytest
import torch

from common.types import Batch
from speechleak.kit import ctc_loss
from speechleak.layerwise import conv_input_solve, determinacy, layer_io, linear_input_solve
from speechleak.models import CTCRecognizer

TEXT = "go on now and then come back"


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _loss_of(model, labels):
    tl = (labels != 0).sum(-1)
    return lambda x: ctc_loss(model, Batch({"feats": x, "target_lengths": tl}, labels)).sum()


@pytest.fixture(scope="module")
def setting(ctc_case):
    """2 s flite clip, 16 mel bins at hop 256 (126 frames), dim-32 recogniser in float64, FedSGD gradient."""
    fe, feats, model, obs, prior, lower = ctc_case(TEXT, 32000)
    model = copy.deepcopy(model).double()
    feats = feats.double()
    return feats, model, obs, lower, layer_io(model, _loss_of(model, obs.labels), feats)


def test_recorded_errors_and_inputs_give_the_observed_gradient(setting):
    feats, model, obs, lower, io = setting
    assert set(io) == {"conv1", "conv2", "qkv", "proj", "ff1", "ff2", "head"}
    for name, lio in io.items():
        g = obs.tensors[f"{name}.weight"].double()
        assert float((lio.weight_grad() - g).norm() / g.norm()) < 1e-5, name  # the observation is float32


@pytest.mark.parametrize("name", ["ff1", "qkv"])
def test_linear_input_is_solved_from_its_weight_gradient(setting, name):
    """ff1 (64 outputs) and qkv (96) have at least as many outputs as the 32 frames: their inputs (the block's
    normalised states) come back from the gradient alone, starting from the states of a silent clip."""
    feats, model, obs, lower, io = setting
    wrong = layer_io(model, _loss_of(model, obs.labels), torch.full_like(feats, lower))[name].inputs
    got = linear_input_solve(io[name].out_error, obs.tensors[f"{name}.weight"].double(), wrong, ridge=1e-10)
    truth = io[name].inputs
    assert _cos(wrong, truth) < 0.9 and _cos(got, truth) > 0.999, (_cos(wrong, truth), _cos(got, truth))


@pytest.mark.parametrize("name", ["conv2", "conv1"])
def test_conv_input_is_solved_from_its_weight_gradient(setting, name):
    """conv2's input (the first activation) and conv1's input (the mel features) from their weight gradients and
    the clip's output errors, started from silence; for conv1 the frames outside the speech are held at the floor."""
    feats, model, obs, lower, io = setting
    truth = io[name].inputs
    start = torch.full_like(feats, lower)
    if name == "conv2":
        start = layer_io(model, _loss_of(model, obs.labels), start)[name].inputs
    keep = None
    if name == "conv1":
        loud = ((feats[0] - lower).mean(0) > 0.05).nonzero().flatten()
        keep = torch.ones(1, feats.shape[-1], dtype=torch.bool)
        keep[0, int(loud[0]) - 2: int(loud[-1]) + 3] = False
    got = conv_input_solve(getattr(model, name), io[name].out_error, obs.tensors[f"{name}.weight"].double(), start,
                           ridge=1e-10, keep=keep)
    assert _cos(start, truth) < 0.9 and _cos(got, truth) > 0.999, (_cos(start, truth), _cos(got, truth))


def test_solves_reject_bad_arguments(setting):
    feats, model, obs, lower, io = setting
    lio = io["ff1"]
    with pytest.raises(ValueError, match="ridge"):
        linear_input_solve(lio.out_error, obs.tensors["ff1.weight"].double(), lio.inputs, ridge=0.0)
    with pytest.raises(ValueError, match="shapes"):
        linear_input_solve(lio.out_error[:-1], obs.tensors["ff1.weight"].double(), lio.inputs, ridge=1.0)


def test_determinacy_of_the_default_recogniser():
    """80 mel bins x 501 frames (4 s at hop 128), dim 96: conv1's 96 x 5 equations per band fall short of its
    501 input frames, conv2's 480 cover its 251, ff1 (192) and qkv (288) cover the 126 frames, proj (96), ff2
    (96, error of rank <= 29: the head's) and the head (30) do not."""
    model = CTCRecognizer(80, generator=torch.Generator().manual_seed(0)).double()
    x = torch.randn(1, 80, 501, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.tensor([[3, 4, 5, 1, 6, 7]])
    ranks = {r.name: r for r in determinacy(layer_io(model, _loss_of(model, labels), x))}
    assert {n: r.determined for n, r in ranks.items()} == {
        "conv1": False, "conv2": True, "qkv": True, "proj": False, "ff1": True, "ff2": False, "head": False}
    assert (ranks["conv1"].rows, ranks["conv1"].width) == (501, 480)
    assert ranks["ff2"].error_rank <= 29 and ranks["head"].error_rank <= 29
