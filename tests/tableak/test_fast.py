"""The fast engine's pieces against autograd: the fused relaxation (including its exact fallback
when a whole one-hot group underflows, and the per-member factor folded into its backward) and
the closed-form gradient match on MLPs of other depths, both losses and both reductions."""
import pytest
import torch
from torch import nn

from common.seed import make_generator
from tableak.attack import TabLeak, TabLeakConfig
from tableak.fast import MLPGradientMatch
from tableak.relax import FusedRelax, Relaxer


def _relaxed(rx: Relaxer, x: torch.Tensor, tau: float, temp: float) -> torch.Tensor:
    return rx.sigmoid(rx.softmax(x, tau), temp)


@pytest.mark.parametrize("spread", [3.0, 400.0])  # 400: whole groups underflow -> the per-group softmax
def test_fused_relax_equals_relaxer_and_autograd(adult, spread):
    _, schema = adult
    rx = Relaxer(schema)
    for tau, temp in ((1.0, 1.0), (0.5, 2.0)):
        fr = FusedRelax(rx, softmax=True, temperature=tau, sigmoid=True, sigmoid_temperature=temp)
        x = ((torch.rand(3, 5, schema.dim, generator=make_generator(1)) * 2 - 1) * spread).requires_grad_(True)
        want = _relaxed(rx, x, tau, temp)
        bar = torch.randn(want.shape, generator=make_generator(2))
        (gx,) = torch.autograd.grad(want, x, bar)
        scale = torch.tensor([1.0, -2.0, 0.5])
        with torch.no_grad():
            got, saved = fr.forward(fr.to_layout(x))
            torch.testing.assert_close(fr.from_layout(got), want.detach(), atol=1e-5, rtol=1e-5)
            g1 = fr.from_layout(fr.backward(fr.to_layout(bar), saved))
            g2 = fr.from_layout(fr.backward(fr.to_layout(bar), saved, scale))
        torch.testing.assert_close(g1, gx, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(g2, gx * scale.view(-1, 1, 1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("hidden", [[], [16], [40, 30, 20]])
@pytest.mark.parametrize("loss,reduction", [("cosine", "mean"), ("l2", "mean"), ("cosine", "sum")])
def test_gradient_match_equals_autograd(hidden, loss, reduction):
    """Distance and ∂/∂x of the closed form equal autograd's double backward for MLPs of depth
    1 to 4 (each layer takes the Gram or the direct path as B varies). In float64: at B = 1 a deep
    net's cosine gradient amplifies float32 rounding ~1e6-fold (autograd's as much as ours)."""
    g = make_generator(0)
    dims = [12] + hidden + [3]
    mods = []
    for i in range(len(dims) - 1):
        lin = nn.Linear(dims[i], dims[i + 1])
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.5)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.1)
        mods += [lin, nn.ReLU()]
    model = nn.Sequential(*mods[:-1]).double()
    layers = [m for m in model if isinstance(m, nn.Linear)]
    names = [(f"{2 * i}.weight", f"{2 * i}.bias") for i in range(len(layers))]
    params = dict(model.named_parameters())
    for b in (1, 6, 40):
        xt = torch.randn(b, 12, generator=g, dtype=torch.float64)
        yt = torch.randint(0, 3, (b,), generator=g)
        ce = lambda p, x, y: nn.functional.cross_entropy(torch.func.functional_call(model, p, (x,)), y,  # noqa: E731
                                                         reduction=reduction)
        target = {k: v.detach() for k, v in torch.func.grad(ce)(params, xt, yt).items()}
        cfg = TabLeakConfig(loss=loss)
        atk = TabLeak(cfg)
        obj = MLPGradientMatch(layers, names, target, loss=loss, reduction=reduction)
        x = torch.randn(2, b, 12, generator=g, dtype=torch.float64).requires_grad_(True)
        y = torch.randint(0, 3, (2, b), generator=g)
        want = torch.stack([atk._distance(torch.func.grad(ce)(params, x[e], y[e]), target, list(target))
                            for e in range(2)])
        (gx,) = torch.autograd.grad(want.sum(), x)
        with torch.no_grad():
            dist, bar = obj(x.detach(), nn.functional.one_hot(y, 3).double())
            only = obj.distance(x.detach(), nn.functional.one_hot(y, 3).double())
        torch.testing.assert_close(dist, want.detach(), atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(only, dist)
        torch.testing.assert_close(bar, gx, atol=1e-12, rtol=1e-7)
