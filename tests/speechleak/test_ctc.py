import pytest
import torch

from speechleak.ctc import ctc_nll


def _case(seed, b=3, t=30, v=8, s=7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=torch.double)
    targets = torch.randint(1, v, (b, s), generator=g)
    targets[0, 2] = targets[0, 1]  # a repeated character needs a blank between
    in_len = torch.tensor([t, t - 5, t - 11][:b])
    tg_len = torch.tensor([s, 4, 0][:b])
    return logits, targets, in_len, tg_len


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_builtin_ctc_value_and_gradient(seed):
    logits, targets, in_len, tg_len = _case(seed)
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    ours = ctc_nll(x1.log_softmax(-1), targets, in_len, tg_len)
    ref = torch.nn.functional.ctc_loss(x2.log_softmax(-1).transpose(0, 1), targets, in_len, tg_len, reduction="none")
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    g1, = torch.autograd.grad(ours.sum(), x1)
    g2, = torch.autograd.grad(ref.sum(), x2)
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-7)


def test_builtin_ctc_has_no_double_backward_but_ours_does():
    logits, targets, in_len, tg_len = _case(3)
    x = logits.clone().requires_grad_(True)
    ref = torch.nn.functional.ctc_loss(x.log_softmax(-1).transpose(0, 1), targets, in_len, tg_len, reduction="sum")
    g, = torch.autograd.grad(ref, x, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.pow(2).sum(), x)
    ours = ctc_nll(x.log_softmax(-1), targets, in_len, tg_len).sum()
    g, = torch.autograd.grad(ours, x, create_graph=True)
    gg, = torch.autograd.grad(g.pow(2).sum(), x)
    assert torch.isfinite(gg).all() and gg.abs().sum() > 0


def test_double_backward_is_correct_gradgradcheck():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 6, 4, generator=g, dtype=torch.double, requires_grad=True)
    targets = torch.tensor([[1, 2, 2], [3, 1, 0]])
    in_len, tg_len = torch.tensor([6, 5]), torch.tensor([3, 2])

    def f(x):
        return ctc_nll(x.log_softmax(-1), targets, in_len, tg_len)

    assert torch.autograd.gradcheck(f, (logits,))
    assert torch.autograd.gradgradcheck(f, (logits,))


def test_works_under_vmap_and_func_grad():
    logits, targets, in_len, tg_len = _case(5, b=2)

    def loss(x):
        return ctc_nll(x.log_softmax(-1), targets, in_len, tg_len).sum()

    stacked = torch.stack([logits, logits * 0.5])
    batched = torch.func.vmap(torch.func.grad(loss))(stacked)
    for r in range(2):
        torch.testing.assert_close(batched[r], torch.func.grad(loss)(stacked[r]))


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_ctc_matches_reference_to_second_order(seed):
    """ctc_nll_fast (native forward-backward + finite-difference HVP) equals the autograd
    recursion in value, gradient and the gradient-matching double backward."""
    from speechleak.ctc import ctc_nll_fast

    logits, targets, in_len, tg_len = _case(seed)
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.double)

    def matching(fn):
        x = logits.clone().requires_grad_(True)
        nll = fn(x.log_softmax(-1), targets, in_len, tg_len)
        g, = torch.autograd.grad(nll.sum(), x, create_graph=True)
        d = (g * w).pow(2).sum()
        return nll.detach(), g.detach(), torch.autograd.grad(d, x)[0]

    n1, g1, h1 = matching(ctc_nll)
    n2, g2, h2 = matching(ctc_nll_fast)
    torch.testing.assert_close(n2, n1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g2, g1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h2, h1, rtol=1e-6, atol=1e-7)
    assert h1.abs().max() > 1e-3


def test_fast_ctc_under_func_grad_inside_autograd():
    """The attack's pattern: torch.func.grad over parameters, then autograd to the input."""
    from speechleak.ctc import ctc_nll_fast

    logits, targets, in_len, tg_len = _case(7)
    p = torch.linspace(0.5, 1.5, logits.shape[-1], dtype=torch.double)
    out = []
    for fn in (ctc_nll, ctc_nll_fast):
        x = logits.clone().requires_grad_(True)
        gp = torch.func.grad(lambda q, xx: fn((xx * q).log_softmax(-1), targets, in_len, tg_len).sum())(p, x)
        out.append((gp.detach(), torch.autograd.grad(gp.pow(2).sum(), x)[0]))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-6, atol=1e-7)


def test_fast_ctc_unreachable_transcript_is_finite():
    """A transcript longer than the frames allow: ~1e5 (as ctc_nll) and finite derivatives, not NaN."""
    from speechleak.ctc import ctc_nll_fast

    x = torch.randn(1, 3, 6, dtype=torch.double, generator=torch.Generator().manual_seed(0), requires_grad=True)
    nll = ctc_nll_fast(x.log_softmax(-1), torch.tensor([[1, 2, 3, 4, 5]]), torch.tensor([3]), torch.tensor([5]))
    assert float(nll) > 1e4
    g, = torch.autograd.grad(nll.sum(), x, create_graph=True)
    gg, = torch.autograd.grad(g.pow(2).sum(), x)
    assert torch.isfinite(g).all() and torch.isfinite(gg).all()
