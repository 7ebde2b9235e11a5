"""Forward-mode products without the zero-tangent detour (an addition for speed, issue 18, session 20).

``last_exit._jvp`` runs the model in forward-mode AD (a dual tensor of the word embeddings and their tangent). Where
an operation mixes a dual tensor with a plain one (a weight, the rotary ``cos``/``sin``, the attention mask, a Python
number), PyTorch's forward-mode rule takes the plain operand's tangent as an "efficient zero tensor" and runs the
rule's zero parts through Python reference implementations (``torch._refs`` and meta kernels): about 0.2 s per
single-sentence product on SmolLM2-135M (30 layers: RMSNorm's ``weight * x``, the rotary ``q * cos + rotate_half(q)
* sin``, the attention's scaling and mask) against ~0.14 s for the model's whole forward of that sentence.

``PlainJvp`` is a ``TorchFunctionMode`` active only within that forward-mode pass. For the operations below, where
exactly one operand is dual, it computes the primal with the same operation on the primal and the plain operand, and
the tangent as the rule's one non-zero part:

* ``a * b`` (either side dual): ``a_t * b``;
* ``a + b`` (either side dual) / ``a - b`` with ``a`` dual (no ``alpha``, no broadcast of ``a``): ``a_t``;
* ``a / b`` with ``a`` dual: ``a_t / b``;
* ``F.linear(x, W, bias)`` and ``torch.addmm(bias, x, W)`` (GPT-2's ``Conv1D``) with only ``x`` dual: ``x_t W^T`` /
  ``x_t W`` (what ``_LinearJvp`` computes, with less per-call overhead);

everything else goes to PyTorch as before. The zero parts PyTorch adds are exact zeros, so the tangents are the same
numbers (tested bit for bit on tiny GPT-2 and tiny Llama; on the development batches the products are bit-equal).
Switch: ``ENABLED`` (False: PyTorch's own rules with ``_cheap_linear_jvp``, sessions 15-19)."""
from __future__ import annotations

import numbers
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.overrides import TorchFunctionMode

#: use ``PlainJvp`` in ``last_exit._jvp`` (False: PyTorch's forward-mode rules with ``_cheap_linear_jvp``)
ENABLED = True


def fast_rules(model: nn.Module):
    """The forward-mode pass's shortcuts (a context manager): ``PlainJvp`` (session 20), else ``_cheap_linear_jvp``
    (session 15)."""
    return PlainJvp() if ENABLED else _cheap_linear_jvp(model)


def _split(x):
    """(primal, tangent) of a dual tensor; (x, None) for anything else."""
    if isinstance(x, Tensor):
        p, t = forward_ad.unpack_dual(x)
        return p, t
    return x, None


def _plain(x) -> bool:
    """A plain operand: a tensor without a tangent, or a real Python number."""
    return (isinstance(x, Tensor) and forward_ad.unpack_dual(x).tangent is None) or (
        isinstance(x, numbers.Real) and not isinstance(x, bool))


def _mul(args, kwargs):
    if kwargs or len(args) != 2:
        return NotImplemented
    (ap, at), (bp, bt) = _split(args[0]), _split(args[1])
    if at is not None and bt is None and _plain(args[1]):
        return forward_ad.make_dual(ap * bp, at * bp)
    if bt is not None and at is None and _plain(args[0]):
        return forward_ad.make_dual(ap * bp, bt * ap)
    return NotImplemented


def _dual_then_plain(args, kwargs):
    """``(primal, tangent, other)`` when the call is ``op(dual, plain)`` without keywords; else None."""
    if kwargs or len(args) != 2:
        return None
    (ap, at), (bp, bt) = _split(args[0]), _split(args[1])
    if at is None or bt is not None or not _plain(args[1]):
        return None
    return ap, at, bp


def _add_like(op):
    def handler(args, kwargs):
        parts = _dual_then_plain(args, kwargs)
        if parts is None:
            return NotImplemented
        ap, at, bp = parts
        p = op(ap, bp)
        if p.shape != at.shape or p.dtype != at.dtype:  # the plain operand broadcasts or promotes: PyTorch's rule
            return NotImplemented
        return forward_ad.make_dual(p, at)
    return handler


def _div(args, kwargs):
    parts = _dual_then_plain(args, kwargs)
    if parts is None:
        return NotImplemented
    ap, at, bp = parts
    return forward_ad.make_dual(ap / bp, at / bp)


def _linear(args, kwargs):
    x, w = args[0], args[1] if len(args) > 1 else kwargs.get("weight")
    b = args[2] if len(args) > 2 else kwargs.get("bias")
    if set(kwargs) - {"weight", "bias"}:
        return NotImplemented
    xp, xt = _split(x)
    if xt is None or not _plain(w) or (b is not None and not _plain(b)):
        return NotImplemented
    return forward_ad.make_dual(torch.nn.functional.linear(xp, w, b), torch.nn.functional.linear(xt, w))


def _addmm(args, kwargs):
    if kwargs or len(args) != 3:
        return NotImplemented
    b, x, w = args
    xp, xt = _split(x)
    if xt is None or not _plain(w) or not _plain(b):
        return NotImplemented
    return forward_ad.make_dual(torch.addmm(b, xp, w), xt.mm(w))


_HANDLERS = {
    Tensor.__mul__: _mul, Tensor.__rmul__: _mul, Tensor.mul: _mul, torch.mul: _mul,
    Tensor.__add__: _add_like(torch.add), Tensor.__radd__: _add_like(torch.add), Tensor.add: _add_like(torch.add),
    torch.add: _add_like(torch.add),
    Tensor.__sub__: _add_like(torch.sub), Tensor.sub: _add_like(torch.sub), torch.sub: _add_like(torch.sub),
    Tensor.__truediv__: _div, Tensor.div: _div, torch.div: _div,
    torch.nn.functional.linear: _linear, torch.addmm: _addmm,
}


class PlainJvp(TorchFunctionMode):
    """Within a ``forward_ad.dual_level``: the operations of the module docstring with one plain operand get their
    tangent directly (the same numbers as PyTorch's rule, without its zero-tensor parts)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        h = _HANDLERS.get(func)
        if h is not None:
            out = h(args, kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)


class _LinearJvp(torch.autograd.Function):
    """``F.linear`` (``addmm`` when ``conv1d``: GPT-2's ``Conv1D``, weight [in, out]) whose forward-mode
    derivative is the one product ``x_t W^T`` (the weight and bias carry no tangent). PyTorch's own formula
    also multiplies the primal by the weight's zero tangent and adds the zero bias tangent: about 3.5x a
    forward product instead of 2x. The same tangent bits (one ``mm`` of the same operands)."""

    @staticmethod
    def forward(x: Tensor, w: Tensor, b: Tensor | None, conv1d: bool) -> Tensor:  # type: ignore[override]
        if conv1d:
            return torch.addmm(b, x, w)
        return torch.nn.functional.linear(x, w, b)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.w, ctx.conv1d = inputs[1], inputs[3]

    @staticmethod
    def jvp(ctx, x_t: Tensor, *_: Tensor | None) -> Tensor:  # type: ignore[override]
        return x_t.mm(ctx.w) if ctx.conv1d else torch.nn.functional.linear(x_t, ctx.w)


@contextmanager
def _cheap_linear_jvp(model: nn.Module):
    """Within: every ``nn.Linear`` and GPT-2 ``Conv1D`` of ``model`` (without an instance ``forward`` of its
    own) runs through ``_LinearJvp`` (the same values and tangents, fewer products)."""
    patched: list[nn.Module] = []

    def linear(m: nn.Module, x: Tensor) -> Tensor:
        return _LinearJvp.apply(x, m.weight, m.bias, False)

    def conv1d(m: nn.Module, x: Tensor) -> Tensor:
        out = _LinearJvp.apply(x.view(-1, x.size(-1)), m.weight, m.bias, True)
        return out.view(x.size()[:-1] + (m.nf,))

    for m in model.modules():
        if "forward" in m.__dict__:
            continue
        if type(m) is nn.Linear:
            m.forward = partial(linear, m)  # type: ignore[method-assign]
        elif type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "bias", None) is not None:
            m.forward = partial(conv1d, m)  # type: ignore[method-assign]
        else:
            continue
        patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward
