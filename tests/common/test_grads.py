"""The gradient-matching core: distances (reductions, weights), layer weights, delta -> gradient,
and the optimiser loop."""
import math

import pytest
import torch

from common.grads import (delta_scale, delta_to_gradient, gradient_distance, layer_weights, observed_gradient,
                          total_variation)
from common.optim import adam, lbfgs, optimise, step_decay
from common.types import FLProtocol, Observation


def _pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}
    target = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}
    return pred, target


def test_l2_reductions_and_weights():
    pred, target = _pair()
    sq = {k: (pred[k] - target[k]).pow(2) for k in pred}
    assert float(gradient_distance("l2", pred, target)) == pytest.approx(sum(float(v.sum()) for v in sq.values()))
    assert float(gradient_distance("l2", pred, target, reduction="mean")) == pytest.approx(
        sum(float(v.mean()) for v in sq.values()))
    w = {"a": 2.0, "b": 0.5}
    assert float(gradient_distance("l2", pred, target, weights=w)) == pytest.approx(
        2.0 * float(sq["a"].sum()) + 0.5 * float(sq["b"].sum()))
    with pytest.raises(ValueError, match="reduction"):
        gradient_distance("l2", pred, target, reduction="max")


@pytest.mark.parametrize("kind", ["l2", "cosine", "layer-cosine", "tag"])
def test_unit_weights_change_nothing(kind):
    """Weights of 1.0 give bit-identical values (the speech attack always passes weights)."""
    pred, target = _pair(1)
    ones = {k: 1.0 for k in pred}
    a = gradient_distance(kind, pred, target, alpha=0.01)
    b = gradient_distance(kind, pred, target, alpha=0.01, weights=ones)
    assert torch.equal(a, b)


def test_cosine_kinds_and_tag():
    pred, target = _pair(2)
    flat_p = torch.cat([v.flatten() for v in pred.values()])
    flat_t = torch.cat([v.flatten() for v in target.values()])
    cos = float(torch.nn.functional.cosine_similarity(flat_p, flat_t, dim=0))
    assert float(gradient_distance("cosine", pred, target)) == pytest.approx(1 - cos, abs=1e-6)
    per = [1 - float(torch.nn.functional.cosine_similarity(pred[k].flatten(), target[k].flatten(), dim=0))
           for k in pred]
    assert float(gradient_distance("layer-cosine", pred, target)) == pytest.approx(sum(per) / 2, abs=1e-6)
    w = {"a": 3.0, "b": 1.0}
    assert float(gradient_distance("layer-cosine", pred, target, weights=w)) == pytest.approx(
        (3 * per[0] + per[1]) / 4, abs=1e-6)
    l1 = sum(float((pred[k] - target[k]).abs().sum()) for k in pred)
    assert float(gradient_distance("tag", pred, target, alpha=0.1)) == pytest.approx(
        float(gradient_distance("l2", pred, target)) + 0.1 * l1, rel=1e-6)
    assert float(gradient_distance("cosine", target, target)) == pytest.approx(0.0, abs=1e-6)
    zero = {k: torch.zeros_like(v, requires_grad=True) for k, v in target.items()}
    d = gradient_distance("cosine", zero, target, min_norm_sq=1e-30)
    assert all(bool(torch.isfinite(g).all()) for g in torch.autograd.grad(d, list(zero.values())))
    with pytest.raises(ValueError, match="unknown gradient distance"):
        gradient_distance("l3", pred, target)


def test_layer_weights():
    _, target = _pair(3)
    names = list(target)
    assert layer_weights("uniform", target, names) == {"a": 1.0, "b": 1.0}
    assert layer_weights("depth-decay", target, names, decay=0.5) == {"a": 1.0, "b": 0.5}
    inv = layer_weights("inverse-norm", target, names)
    assert inv["a"] == pytest.approx(1 / float(target["a"].pow(2).sum()))
    with pytest.raises(ValueError, match="layer weighting"):
        layer_weights("cubic", target, names)


def test_delta_to_gradient_and_observed_gradient():
    proto = FLProtocol("fedavg", batch_size=8, local_epochs=3, local_batch_size=4, local_lr=0.01)
    assert delta_scale(proto) == 0.01 * 6
    t = {"w": torch.ones(2) * 0.06}
    assert torch.allclose(delta_to_gradient(t, proto)["w"], torch.ones(2))
    obs = Observation(kind="delta", tensors=t, num_examples=8, protocol=proto)
    assert torch.allclose(observed_gradient(obs)["w"], torch.ones(2))
    g = Observation(kind="gradient", tensors=t, num_examples=8)
    assert observed_gradient(g)["w"] is t["w"]


def test_total_variation_is_anisotropic():
    x = torch.zeros(4, 6)
    x[:, 3:] = 1.0
    assert float(total_variation(x, dims=(-1, -2))) == pytest.approx(1 / 5)


def test_adam_loop_sign_schedule_and_callbacks():
    x = torch.tensor([3.0, -2.0], requires_grad=True)
    seen, raw = [], []
    opt_lr = []

    def after(it):
        seen.append(it)
        with torch.no_grad():
            x.clamp_(min=-1.0)

    adam([x], lambda: (x ** 2).sum(), lr=0.1, iterations=16, signed=True, schedule=step_decay(16),
         on_gradient=lambda it, loss: raw.append(float(x.grad.abs().max())), after_step=after)
    assert seen == list(range(16)) and float(x.detach().min()) >= -1.0 and raw[0] == 6.0
    assert float((x.detach() ** 2).sum()) < 13.0
    # signed: the gradient seen before signing is the raw one; the step uses its sign
    y = torch.tensor([100.0], requires_grad=True)
    adam([y], lambda: (y ** 2).sum(), lr=0.5, iterations=1, signed=True,
         on_gradient=lambda it, loss: opt_lr.append(float(y.grad)))
    assert opt_lr == [200.0] and float(y.detach()) == pytest.approx(99.5)
    with pytest.raises(ValueError, match="optimizer"):
        optimise([y], lambda: y.sum(), optimizer="sgd", lr=1.0, iterations=1)


def test_step_decay_milestones():
    x = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([x], lr=1.0)
    sched = step_decay(8)(opt)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1, 1, 1, 0.1, 0.1, 0.01, 0.01, 0.001])


def test_lbfgs_solves_a_quadratic():
    x = torch.tensor([3.0, -2.0], dtype=torch.float64, requires_grad=True)
    lbfgs([x], lambda: ((x - torch.tensor([1.0, 0.5], dtype=torch.float64)) ** 2).sum(), iterations=50)
    assert torch.allclose(x.detach(), torch.tensor([1.0, 0.5], dtype=torch.float64), atol=1e-8)
    assert math.isfinite(float(x.detach().sum()))
