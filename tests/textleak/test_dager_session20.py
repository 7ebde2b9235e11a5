"""DAGER decoder speed-up of session 20 (issue 18): the forward-mode products without PyTorch's zero-tangent parts
(``jvp_mode.PlainJvp``) are the same numbers as with PyTorch's own rules, agree with the reverse-mode terms, and leave
the lazy joint fit's choice unchanged; the fit's residual copies only the rows it uses (``last_fit._RowCopy``)."""
from __future__ import annotations

import pytest
import torch
from torch.autograd import forward_ad

torch.set_num_threads(1)
pytest.importorskip("transformers")

from .test_dager import _completion, _setup  # noqa: E402
from .test_dager_session18 import _wrong_start  # noqa: E402
from .test_dager_speed import _fold_case  # noqa: E402


def _both(fn, *args):
    """(primal, tangent) of ``fn(*args)`` under PlainJvp and under PyTorch's rules (args: (primal, tangent or None))."""
    from textleak.attacks.dager.jvp_mode import PlainJvp

    out = []
    for mode in (True, False):
        with torch.no_grad(), forward_ad.dual_level():
            xs = [forward_ad.make_dual(p, t) if t is not None else p for p, t in args]
            if mode:
                with PlainJvp():
                    y = fn(*xs)
            else:
                y = fn(*xs)
            p, t = forward_ad.unpack_dual(y)
            out.append((p.clone(), None if t is None else t.clone()))
    return out


@pytest.mark.parametrize("fn", [
    lambda a, w, m: a * w, lambda a, w, m: w * a, lambda a, w, m: 0.125 * a, lambda a, w, m: a * 3,
    lambda a, w, m: a + w, lambda a, w, m: 1.0 + a, lambda a, w, m: a - w, lambda a, w, m: w - a,
    lambda a, w, m: a / 7.0, lambda a, w, m: a / w, lambda a, w, m: torch.nn.functional.linear(a, m, w),
    lambda a, w, m: torch.addmm(w, a.view(-1, 5), m), lambda a, w, m: a[:1] + m[:2, None, :1],  # broadcast: PyTorch's
    lambda a, w, m: torch.tanh(a) * a,  # both dual: PyTorch's rule
])
def test_plain_jvp_rules_are_pytorchs_numbers(fn):
    """Each shortcut gives bit for bit PyTorch's primal and tangent (a dual [2, 3, 5] operand; a plain [5] weight, a
    plain [5, 5] matrix, Python numbers), and operations it does not cover fall through to PyTorch."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 5, generator=gen)
    at = torch.randn(2, 3, 5, generator=gen)
    w = torch.randn(5, generator=gen).abs() + 0.5
    m = torch.randn(5, 5, generator=gen)
    (p1, t1), (p2, t2) = _both(fn, (a, at), (w, None), (m, None))
    assert torch.equal(p1, p2)
    assert t1 is not None and t2 is not None and torch.equal(t1, t2)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_plain_jvp_products_same_bits_and_equal_the_terms(name, monkeypatch):
    """``last_exit._jvp`` with ``PlainJvp`` returns bit for bit the products of PyTorch's rules (with
    ``_cheap_linear_jvp``), whole packed batch and per-sentence tangent rows; its shortcuts do run; and ``w_y . D_i``
    equals the reverse-mode terms' ``sum_t d(w_y . h_i)/dx_t . g[x_t]`` of every candidate ``y``."""
    from textleak.attacks.dager import jvp_mode, last_exit, last_token

    model, obs, batch, sents, out, key, (g, hs, denom, graph) = _completion(name, 5)
    calls = {"n": 0}
    for k, h in list(jvp_mode._HANDLERS.items()):
        def counted(args, kwargs, _h=h):
            r = _h(args, kwargs)
            calls["n"] += r is not NotImplemented
            return r
        monkeypatch.setitem(jvp_mode._HANDLERS, k, counted)
    rows = [g[s] * (1.0 + 0.1 * i) for i, s in enumerate(sents)]
    got = {}
    for on in (True, False):
        monkeypatch.setattr(jvp_mode, "ENABLED", on)
        got[on] = (last_exit._jvp(model, graph, sents, g), last_exit._jvp(model, graph, sents, None, rows=rows))
    assert calls["n"] > 0
    assert torch.equal(got[True][0], got[False][0]) and torch.equal(got[True][1], got[False][1])
    d = got[True][0]
    cands = [[5, 17, 40] + s[-1:] for s in sents]
    ges = last_token._packed_terms(graph, out.weight, sents, cands)
    for i, s in enumerate(sents):
        wd = out.weight[cands[i]].detach().double() @ d[i]
        ref = torch.einsum("kld,ld->k", ges[i].double(), g[s])
        assert torch.allclose(wd, ref, rtol=1e-3, atol=1e-5 * float(ref.abs().max()))
        assert float(ref.abs().max()) > 0


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_plain_jvp_lazy_fit_reaches_the_joint_fit(name, monkeypatch):
    """With ``PlainJvp`` on and off, the lazy fit from a wrong start returns the joint fit's choice over every term
    with the same number of terms computed."""
    from textleak.attacks.dager import jvp_mode

    ref, cands, run = _wrong_start(name)
    res = {}
    for on in (True, False):
        monkeypatch.setattr(jvp_mode, "ENABLED", on)
        res[on] = run()
        assert res[on][0] == ref, on
    assert res[True][1] == res[False][1]


def test_row_copy_is_a_clone_for_row_access():
    """``last_fit._RowCopy`` reads and changes rows as a clone would and leaves the residual it copies alone."""
    from textleak.attacks.dager.last_fit import _RowCopy

    gen = torch.Generator().manual_seed(0)
    g = torch.randn(6, 4, dtype=torch.float64, generator=gen)
    ref, clone = g.clone(), g.clone()
    rows = _RowCopy(g)
    for r, t in ((2, g[1]), (2, g[4] * 0.5), (5, g[2])):
        rows[r] -= t
        clone[r] -= t
    rows[3] += g[0]
    clone[3] += g[0]
    assert torch.equal(g, ref)
    for r in range(6):
        assert torch.equal(rows[r], clone[r])


def test_rope_folded_feed_forward_distances_equal_the_block(monkeypatch):
    """``RopeDecoderBlock.ffn_distances`` (o_proj, RMSNorm_2's weight and the complement folded into the values) gives
    the span distances of the model's own feed-forward inputs (as ``extend`` + ``ComplementDistance``) within float32
    round-off on tiny Llama, true extensions near 0, without calling ``extend``; ``ROPE_FOLD`` off falls back."""
    from textleak.attacks.dager import rope_block

    blk, prefixes, pos, cands, dist, rows, want, ref = _fold_case("text/tiny-llama/dager",
                                                                   rope_block.RopeDecoderBlock.build)
    called = []
    real_extend = blk.extend

    def fake(*a, **k):
        called.append(1)
        return ref

    fake.__wrapped__ = real_extend
    monkeypatch.setattr(blk, "extend", fake)
    got = blk.ffn_distances(prefixes, pos, cands, dist)
    assert not called
    assert got.shape == (3, len(cands)) and got.dtype == torch.float64
    assert (got - want).abs().max() < 1e-5 and (got - ref).abs().max() < 1e-5
    true = torch.tensor([got[i, cands.index(r[pos])] for i, r in enumerate(rows)])
    assert float(true.max()) < 1e-3 and float(got.median()) > 0.05
    gen = torch.Generator().manual_seed(1)
    keep = blk.ln2.weight.detach().clone()
    try:
        with torch.no_grad():  # a non-trivial RMSNorm_2 weight (tiny Llama's is ones)
            blk.ln2.weight.mul_(0.5 + torch.rand(blk.d, generator=gen))
        ref2 = blk.extend.__wrapped__(prefixes, pos, cands, reduce=dist)
        got2 = blk.ffn_distances(prefixes, pos, cands, dist)
    finally:
        with torch.no_grad():
            blk.ln2.weight.copy_(keep)
    assert (got2 - ref2).abs().max() < 1e-5 and (got2 - got).abs().max() > 1e-3
    monkeypatch.setattr(rope_block, "ROPE_FOLD", False)
    assert blk.ffn_distances(prefixes, pos, cands, dist) is ref and len(called) == 1
