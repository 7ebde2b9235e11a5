"""Candidate gradient distances without materialising per-candidate gradients ("ghost" products).

Scoring a candidate needs, per parameter tensor, only scalars of its gradient ``G_c``: ``<G_c, M>``
for one or two fixed tensors ``M`` (the observed gradient, the other sentences' contribution) and
``|G_c|²``. For the modules a BERT-style encoder is made of these come from one batched forward and
backward of all candidates, from the layer inputs ``a`` and output gradients ``δ`` alone:

* ``nn.Linear`` (``G = Σ_t δ_t a_tᵀ``): ``<G, M> = Σ_t δ_t · (M a_t)`` and
  ``|G|² = Σ_{t,s} (δ_t·δ_s)(a_t·a_s)``; the bias gradient ``Σ_t δ_t`` is small and formed;
* ``nn.LayerNorm``: ``Σ_t δ_t ⊙ â_t`` and ``Σ_t δ_t`` are formed (``d`` floats per candidate);
* Llama's RMSNorm (``LlamaRMSNorm``: ``w ⊙ x̂``, ``x̂ = x / sqrt(mean(x²) + eps)`` in float32): ``Σ_t δ_t ⊙ x̂_t``
  is formed the same way;
* ``nn.Embedding`` (``G = Σ_t e_{i_t} δ_tᵀ``): ``<G, M> = Σ_t δ_t · M[i_t]`` and
  ``|G|² = Σ_{t,s} [i_t = i_s] δ_t·δ_s``.

A ``Linear`` weight's ``M`` may be given as :class:`Factored` ``left @ rightᵀ`` (:func:`factor`: the truncated SVD
of a low-rank observed gradient); ``<G, M> = Σ_t (leftᵀ δ_t)·(rightᵀ a_t)`` then costs ``r·(in+out)`` per token.
Per candidate this costs about one forward + backward of the sentence and a few matrix products
per layer, against a ``C × parameter-count`` buffer (11 M floats per MiniLM candidate) for
``torch.func.vmap(grad)``. The values equal the materialised ones up to float rounding (tested).
A decoder's word embedding tied to its ``lm_head`` (SmolLM2) is one parameter named once, the input
embedding's name, and is never matched (the dummy input is embeddings: :mod:`.gradmatch`), so its head part
needs no product either. Models with other parametrised modules (GPT-2's ``Conv1D``) or a module called
more than once per forward are not handled (:meth:`GhostScorer.build` returns ``None`` or
:class:`Unsupported` is raised, and the caller keeps the vmap path). Examples must not interact in
the forward (no batch norm), which holds for transformers in eval mode.
"""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Factored", "GhostScorer", "Unsupported", "factor"]

_KINDS = {nn.Linear: "linear", nn.LayerNorm: "layernorm", nn.Embedding: "embedding"}
#: RMSNorms whose forward is ``weight * (x.float() * rsqrt(x.float().pow(2).mean(-1) + variance_epsilon)).to(x.dtype)``
_RMSNORMS = frozenset({"LlamaRMSNorm"})


def _kind(mod: nn.Module | None) -> str | None:
    if mod is None:
        return None
    if type(mod).__name__ in _RMSNORMS and hasattr(mod, "variance_epsilon"):
        return "rmsnorm"
    return _KINDS.get(type(mod))


class GhostScorer:
    """Per-candidate ``<G_c, M_k>`` and ``|G_c|²`` for every named tensor, from one batched pass."""

    def __init__(self, model: nn.Module, plan: dict[str, tuple[nn.Module, str, list[tuple[str, str]]]]) -> None:
        self.model = model
        self.plan = plan  # module name -> (module, kind, [(param attr, param name)])

    @classmethod
    def build(cls, model: nn.Module, names: Sequence[str]) -> "GhostScorer | None":
        mods = dict(model.named_modules())
        plan: dict[str, tuple[nn.Module, str, list[tuple[str, str]]]] = {}
        for n in names:
            mod_name, _, attr = n.rpartition(".")
            mod = mods.get(mod_name)
            kind = _kind(mod)
            if kind is None or attr not in ("weight", "bias") or (kind == "rmsnorm" and attr != "weight"):
                return None
            if kind == "layernorm" and len(getattr(mod, "normalized_shape", ())) != 1:
                return None
            plan.setdefault(mod_name, (mod, kind, []))[2].append((attr, n))
        return cls(model, plan)

    def linear_weights(self) -> list[str]:
        """The planned ``nn.Linear`` weights: the tensors whose ``mats`` entries may be :class:`Factored`."""
        return [n for mod, kind, params in self.plan.values() if kind == "linear"
                for attr, n in params if attr == "weight"]

    def products(self, forward: Callable[[], Tensor], count: int, group: int,
                 mats: Sequence[Mapping[str, Tensor]], *,
                 differentiable: bool = False) -> tuple[dict[str, list[Tensor]], dict[str, Tensor]]:
        """Run ``forward()`` (the scaled per-example losses of ``count · group`` examples, shape
        ``[count · group]``, candidate-major) with hooks on the planned modules; candidate ``c`` is
        the sum over its ``group`` examples. A ``Linear`` weight's entry of ``mats`` may be
        :class:`Factored` (the same product from the factors). Returns ``({name: [<G_c, M_k>]_k}, {name: |G_c|²})``,
        each ``[count]``. ``differentiable``: the products keep their graph back to whatever
        ``forward`` depends on (the output gradients come from ``create_graph=True``), so a
        distance built from them can be differentiated w.r.t. the input embeddings: the
        continuous step without the parameter gradients (:meth:`GradMatcher.ghost_batch_distance`)."""
        cap: dict[str, list] = {m: [] for m in self.plan}
        handles = []
        for m, (mod, kind, _) in self.plan.items():
            handles.append(mod.register_forward_hook(_capture(cap[m], count * group, keep_graph=differentiable)))
        try:
            with torch.enable_grad():
                losses = forward()
                outs = []
                for m in self.plan:
                    if len(cap[m]) != 1:
                        raise Unsupported(f"module {m} ran {len(cap[m])} times in one forward")
                    outs.append(cap[m][0][1])
                deltas = torch.autograd.grad(losses.sum(), outs, allow_unused=True, create_graph=differentiable)
        finally:
            for h in handles:
                h.remove()
        dots: dict[str, list[Tensor]] = {}
        sq: dict[str, Tensor] = {}
        gram: dict[tuple, Tensor] = {}  # a aᵀ per input (a layer's query, key and value share theirs)
        with torch.set_grad_enabled(differentiable):
            for (m, (mod, kind, params)), delta in zip(self.plan.items(), deltas):
                inp, out = cap[m][0]
                if delta is None:
                    delta = torch.zeros_like(out)
                d = _grouped(delta, count)  # [C, N, out]
                a = _grouped(inp, count) if kind != "embedding" else inp.reshape(count, -1)
                for attr, name in params:
                    if kind == "linear" and attr == "weight":
                        flat = a.reshape(-1, a.shape[-1])
                        dots[name] = [_linear_dot(flat, d, mat[name]) for mat in mats]
                        key = (inp.data_ptr(), tuple(inp.shape), inp.stride(), inp.requires_grad)
                        if key not in gram:
                            gram[key] = torch.bmm(a, a.transpose(1, 2))
                        sq[name] = (torch.bmm(d, d.transpose(1, 2)) * gram[key]).sum((1, 2))
                    elif kind == "embedding":
                        dots[name] = [(mat[name][a] * d).sum((1, 2)) for mat in mats]
                        same = (a.unsqueeze(2) == a.unsqueeze(1)).to(d.dtype)
                        sq[name] = (same * torch.bmm(d, d.transpose(1, 2))).sum((1, 2))
                    else:  # small per-candidate gradients, formed
                        if attr == "bias":
                            g = d.sum(1)
                        elif kind == "rmsnorm":  # Σ_t δ_t ⊙ x̂_t
                            g = (d * _rms_normalised(a, mod.variance_epsilon)).sum(1)
                        else:  # layernorm weight: Σ_t δ_t ⊙ â_t
                            xhat = nn.functional.layer_norm(a, mod.normalized_shape, None, None, mod.eps)
                            g = (d * xhat).sum(1)
                        dots[name] = [g @ mat[name].reshape(-1) for mat in mats]
                        sq[name] = (g * g).sum(1)
        return dots, sq


class Factored(NamedTuple):
    """A ``Linear`` weight's matrix ``M = left @ right.T`` (``left [out, r]``, ``right [in, r]``), given
    to :meth:`GhostScorer.products` in place of the dense ``M``: ``<G_c, M> = Σ_t (leftᵀ δ_t)·(rightᵀ a_t)``
    costs ``r · (in + out)`` per token instead of ``in · out``."""

    left: Tensor
    right: Tensor

    def dense(self) -> Tensor:
        return self.left @ self.right.T

    def __neg__(self) -> "Factored":
        return Factored(-self.left, self.right)


def factor(mat: Tensor, *, rtol: float) -> Factored | None:
    """``mat [out, in]`` as its truncated SVD (float64, stored in ``mat``'s dtype) keeping the fewest
    singular values whose dropped part is at most ``rtol`` of the Frobenius norm, or ``None`` when that
    rank saves less than half of the dense product's work (``2 r (in + out) > in · out``).

    Why this is exact up to rounding where it applies: one client step's gradient of a ``Linear`` weight is
    ``Σ_t δ_t a_tᵀ`` over the batch's tokens, of rank at most the number of tokens (15 on a 15-token
    sentence, against 384-1536 columns); its remaining singular values are the float32 rounding of that sum
    (~6e-8 of the norm on MiniLM), so a ``rtol`` of 1e-6 drops rounding only and ``|<G, M - M_r>| <= rtol · |G| |M|``.
    A defended gradient (noise, clipping of many steps) is full rank and stays dense."""
    if mat.dim() != 2:
        return None
    out, inp = mat.shape
    u, s, vh = torch.linalg.svd(mat.detach().double(), full_matrices=False)
    tail = s.square().flip(0).cumsum(0).flip(0)  # tail[r] = Σ_{i >= r} s_i²
    ok = (tail <= (rtol ** 2) * tail[0]).nonzero().flatten()
    r = int(ok[0]) if ok.numel() else s.numel()
    if 2 * r * (out + inp) > out * inp:
        return None
    return Factored((u[:, :r] * s[:r]).to(mat.dtype), vh[:r].T.contiguous().to(mat.dtype))


def _linear_dot(flat_a: Tensor, d: Tensor, mat: "Tensor | Factored") -> Tensor:
    """Per candidate ``Σ_t δ_t · (M a_t)`` for ``d [C, N, out]`` and ``flat_a [C·N, in]``."""
    if isinstance(mat, Factored):
        p = torch.mm(flat_a, mat.right)  # [C·N, r]
        q = torch.mm(d.reshape(-1, d.shape[-1]), mat.left)
        return (p * q).view(d.shape[0], -1).sum(1)
    return (torch.mm(flat_a, mat.reshape(d.shape[-1], -1).T).view_as(d) * d).sum((1, 2))


def _rms_normalised(x: Tensor, eps: float) -> Tensor:
    """``LlamaRMSNorm``'s normalised input (before the weight), as it computes it."""
    h = x.to(torch.float32)
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class Unsupported(RuntimeError):
    """The model does something the ghost products do not cover (the caller falls back)."""


def _grouped(t: Tensor, count: int) -> Tensor:
    """``[count · group, L, f]`` or ``[count · group, f]`` -> ``[count, group · L, f]``."""
    return t.reshape(count, -1, t.shape[-1])


def _capture(store: list, n: int, *, keep_graph: bool = False):
    def hook(mod: nn.Module, args: tuple, out: Tensor):
        inp = args[0]
        if out.shape[0] != n:  # a broadcast output (BERT's position embeddings [1, L, d]): one per example
            if out.shape[0] != 1:
                raise Unsupported(f"{type(mod).__name__} output of batch {out.shape[0]} for {n} examples")
            out = out.expand(n, *out.shape[1:])
            inp = inp.expand(n, *inp.shape[1:])
        # a differentiable identity, so the captured tensor is this module's own output node
        out = out.view_as(out)
        store.append((inp if keep_graph else inp.detach(), out))
        return out
    return hook
