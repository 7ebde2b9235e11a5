"""Oracle tests for the FL client simulation (Opacus-style: fast path vs obviously-correct loop)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from common.fl import batch_gradient, client_update, local_training, per_example_gradients
from common.seed import make_generator
from common.types import Batch, FLProtocol


def make_model(seed=0, d=6, c=3):
    torch.manual_seed(seed)  # test-only: model init
    return nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, c))


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch.inputs["x"]), batch.labels, reduction="none")


def make_batch(b, d=6, c=3, seed=1):
    g = make_generator(seed)
    return Batch({"x": torch.randn(b, d, generator=g)}, torch.randint(0, c, (b,), generator=g))


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 7), reduction=st.sampled_from(["mean", "sum"]))
def test_batch_gradient_is_reduction_of_per_example_gradients(b, reduction):
    model, batch = make_model(), make_batch(b)
    g = batch_gradient(model, loss_fn, batch, reduction=reduction)
    for method in ("vmap", "loop"):
        per = per_example_gradients(model, loss_fn, batch, method=method)
        for k in g:
            red = per[k].mean(0) if reduction == "mean" else per[k].sum(0)
            torch.testing.assert_close(g[k], red, atol=1e-6, rtol=1e-5)


def test_fedsgd_keys_are_parameter_names_and_model_unchanged():
    model, batch = make_model(), make_batch(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    upd = client_update(model, batch, loss_fn, FLProtocol("fedsgd", batch_size=4), generator=make_generator(0))
    assert set(upd.tensors) == {n for n, _ in model.named_parameters()}
    assert upd.kind == "gradient" and upd.num_examples == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_step_fedavg_delta_equals_lr_times_gradient(reduction):
    model, batch = make_model(), make_batch(5)
    proto = FLProtocol("fedavg", batch_size=5, local_epochs=1, local_lr=0.05, loss_reduction=reduction)
    upd = client_update(model, batch, loss_fn, proto, generator=make_generator(0))
    g = batch_gradient(model, loss_fn, batch, reduction=reduction)
    assert upd.kind == "delta"
    for k in g:
        torch.testing.assert_close(upd.tensors[k], 0.05 * g[k], atol=1e-7, rtol=1e-5)


def test_fedavg_multi_step_matches_manual_sgd_and_leaves_model():
    model, batch = make_model(), make_batch(6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    proto = FLProtocol("fedavg", batch_size=6, local_epochs=2, local_batch_size=2, local_lr=0.1)
    upd = client_update(model, batch, loss_fn, proto, generator=make_generator(3))
    # manual oracle: same permutations drawn from the same generator, plain optimizer on a copy
    import copy

    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    g = make_generator(3)
    for _ in range(2):
        order = torch.randperm(6, generator=g)
        for s in range(0, 6, 2):
            opt.zero_grad()
            loss_fn(ref, batch.select(order[s:s + 2])).mean().backward()
            opt.step()
    for (k, p0), (_, p1) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(upd.tensors[k], (p0 - p1).detach(), atol=1e-6, rtol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert proto.steps_per_epoch == 3


def test_differentiable_local_training_gives_input_gradients():
    model, batch = make_model(), make_batch(4)
    x = batch.inputs["x"].clone().requires_grad_(True)
    b2 = Batch({"x": x}, batch.labels)
    proto = FLProtocol("fedavg", batch_size=4, local_epochs=2, local_batch_size=2, shuffle=False)
    after = local_training(model, loss_fn, b2, proto, create_graph=True)
    loss = sum(v.sum() for v in after.values())
    (gx,) = torch.autograd.grad(loss, x)
    assert gx.abs().sum() > 0


def test_batch_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="batch_size"):
        client_update(make_model(), make_batch(3), loss_fn, FLProtocol(batch_size=2), generator=make_generator(0))


def test_loss_fn_must_be_per_example():
    with pytest.raises(ValueError, match="one loss per example"):
        batch_gradient(make_model(), lambda m, b: loss_fn(m, b).mean(), make_batch(2))


def _params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def test_functional_local_training_equals_autograd_path_in_value_and_input_gradient():
    """functional=True (torch.func.grad, vmappable) is the same simulation as the autograd path."""
    model, batch = make_model(), make_batch(4)
    proto = FLProtocol("fedavg", batch_size=4, local_epochs=2, local_batch_size=2, local_lr=0.1)
    orders = [torch.tensor([2, 0, 3, 1]), torch.tensor([1, 3, 0, 2])]
    out = {}
    for functional in (False, True):
        x = batch.inputs["x"].clone().requires_grad_(True)
        params = {k: v.clone().requires_grad_(not functional) for k, v in _params(model).items()}
        after = local_training(model, loss_fn, Batch({"x": x}, batch.labels), proto, params=params, orders=orders,
                               create_graph=True, functional=functional)
        loss = sum((v ** 2).sum() for v in after.values())
        out[functional] = ({k: v.detach() for k, v in after.items()}, torch.autograd.grad(loss, x)[0])
    for k in out[True][0]:
        torch.testing.assert_close(out[True][0][k], out[False][0][k], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(out[True][1], out[False][1], atol=1e-7, rtol=1e-5)
    assert out[True][1].abs().sum() > 0


def test_local_training_per_epoch_batches_and_vmap():
    """One batch per epoch: with identical copies it is the single-batch run; it runs under vmap
    (restarts as one tensor); different copies give a different result."""
    model, batch = make_model(), make_batch(4)
    proto = FLProtocol("fedavg", batch_size=4, local_epochs=3, local_batch_size=2, local_lr=0.1, shuffle=False)
    params = _params(model)
    one = local_training(model, loss_fn, batch, proto, params=params, create_graph=True, functional=True)
    copies = local_training(model, loss_fn, [batch] * 3, proto, params=params, create_graph=True, functional=True)
    for k in one:
        assert torch.equal(one[k], copies[k])
    xs = torch.stack([batch.inputs["x"], batch.inputs["x"] + 0.5])  # [R, B, d]

    def run(x):
        after = local_training(model, loss_fn, [Batch({"x": x}, batch.labels)] * 3, proto, params=params,
                               create_graph=True, functional=True)
        return after["2.bias"]

    vm = torch.func.vmap(run)(xs)
    torch.testing.assert_close(vm[0], one["2.bias"], atol=1e-7, rtol=1e-6)
    assert not torch.allclose(vm[0], vm[1])
    with pytest.raises(ValueError, match="per-epoch"):
        local_training(model, loss_fn, [batch] * 2, proto, params=params, functional=True)


def test_defenses_do_not_import_the_fl_module():
    """common.defenses builds on common.functional; common.fl imports defenses for types only (no cycle)."""
    import subprocess
    import sys

    code = ("import sys, common.defenses; assert 'common.fl' not in sys.modules, 'defenses imported fl'; "
            "import ast, inspect, common.fl as fl; tree = ast.parse(inspect.getsource(fl)); "
            "top = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == 'defenses']; "
            "assert not top, 'fl imports defenses at module level'")
    subprocess.run([sys.executable, "-c", code], check=True)
