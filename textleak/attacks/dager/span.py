"""Low-rank span machinery for DAGER (Petrov et al., NeurIPS 2024).

The gradient of a linear projection ``y = W x`` summed over the tokens of a batch is
``dL/dW = sum_i g_i x_i^T``: its row space is contained in span{x_i}. When the number of
tokens is below the input width ``d``, this row space *is* (generically) the span of the
layer inputs, so a candidate input vector ``v`` was part of the batch iff its distance to
that span is ~0. This module:

* finds the transformer blocks and, inside a block, the projections that read the block's
  attention input (Q/K/V, GPT-2's fused ``c_attn``, a peft LoRA ``lora_A``) **by structure**:
  the first ``ModuleList`` whose length is ``config.num_hidden_layers``, and the linear-like
  modules of that block that receive the very tensor the block's first projection receives
  (found with forward pre-hooks on a probe forward pass; no parameter-name matching);
* maps those modules back to ``named_parameters`` names, so that observation tensors (keyed
  by those names) can be looked up;
* computes layer inputs for arbitrary token sequences by running the model and stopping at
  the tapped projection (so learned positions, token types, RoPE, pre-/post-LayerNorm are
  all handled by the model's own code);
* builds an orthonormal basis of the gradient's row space and measures span distances in
  batches (plus a one-vector-at-a-time oracle used by the benchmark and tests).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn


class DagerPreconditionError(ValueError):
    """The observed update cannot be inverted by DAGER (rank saturated, degenerate, missing layers)."""


class _Stop(Exception):
    pass


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except Exception:  # pragma: no cover - transformers always present here
        return None


def is_linear_like(module: nn.Module) -> bool:
    c = _conv1d_type()
    return isinstance(module, nn.Linear) or (c is not None and isinstance(module, c))


def weight_as_out_in(module: nn.Module, tensor: Tensor) -> Tensor:
    """A weight-shaped tensor of ``module`` as [out, in] (GPT-2's Conv1D stores [in, out])."""
    c = _conv1d_type()
    if c is not None and isinstance(module, c):
        return tensor.t()
    return tensor


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the first ModuleList of ``num_hidden_layers`` same-type modules."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    lists = [m for _, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) >= 2]
    for m in lists:
        if (n is None or len(m) == n) and len({type(x) for x in m}) == 1:
            return m
    raise DagerPreconditionError(
        "could not find the transformer block stack (a ModuleList with config.num_hidden_layers blocks); "
        "DAGER needs a Hugging Face transformer with at least two blocks"
    )


@dataclass
class Tap:
    """The projections of one block that read the block's attention input."""

    block_index: int
    modules: list[nn.Module]  # linear-like modules fed with the attention input
    names: list[str]  # their weight parameter names (model.named_parameters())
    first: nn.Module  # the first of them to run; its input is the layer input


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def find_tap(model: nn.Module, block_index: int, probe_ids: Tensor, *, group: int = 0) -> Tap:
    """Run ``probe_ids`` through the model and find the block's input projections by identity.

    ``group`` > 0 picks a later group of projections sharing one input, in execution order (1: the
    attention output projection, 2: the feed-forward input projections of GPT-2 / BERT / Llama
    blocks); raises when the block has fewer groups."""
    blocks = transformer_blocks(model)
    if block_index >= len(blocks):
        raise DagerPreconditionError(f"model has {len(blocks)} blocks, DAGER needs block {block_index}")
    block = blocks[block_index]
    seen: list[tuple[nn.Module, Tensor]] = []
    handles = []

    def make_hook(mod):
        def hook(_m, args):
            if args and isinstance(args[0], Tensor):
                seen.append((mod, args[0]))
        return hook

    for _, m in block.named_modules():
        if is_linear_like(m):
            handles.append(m.register_forward_pre_hook(make_hook(m)))
    stop_handle = None
    nxt = blocks[block_index + 1] if block_index + 1 < len(blocks) else None
    if nxt is not None:
        def stop(_m, _a, _k=None):
            raise _Stop
        stop_handle = nxt.register_forward_pre_hook(stop)
    try:
        with torch.no_grad():
            model(input_ids=probe_ids)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
        if stop_handle is not None:
            stop_handle.remove()
    if not seen:
        raise DagerPreconditionError(f"no linear projection ran inside block {block_index}")
    groups: list[tuple[Tensor, list[nn.Module]]] = []
    for mod, x in seen:
        for x0, members in groups:
            if x is x0 or (x.shape == x0.shape and (x.data_ptr() == x0.data_ptr() or torch.equal(x, x0))):
                if all(mod is not g for g in members):
                    members.append(mod)
                break
        else:
            groups.append((x, [mod]))
    if group >= len(groups):
        raise DagerPreconditionError(f"block {block_index} has {len(groups)} input groups, asked for group {group}")
    members = groups[group][1]
    names_by_id = _param_names(model)
    names = [names_by_id.get(id(m.weight), "") for m in members]
    return Tap(block_index, members, names, members[0])


def observed_matrix(tap: Tap, tensors: Mapping[str, Tensor]) -> Tensor:
    """Stack the observed updates of the tap's projections as [sum(out), d_in] (float64)."""
    mats = []
    for mod, name in zip(tap.modules, tap.names):
        if name and name in tensors:
            mats.append(weight_as_out_in(mod, tensors[name]).detach().to(torch.float64).cpu())
    if not mats:
        raise DagerPreconditionError(
            f"the observation has no update for the attention input projections of block {tap.block_index} "
            f"(looked for {', '.join(n for n in tap.names if n) or 'none'}); DAGER needs them"
        )
    return torch.cat(mats, 0)


@dataclass
class Span:
    basis: Tensor  # [d, r] orthonormal columns (float64)
    rank: int
    max_rank: int
    singular_values: Tensor
    tol: float


def span_of(matrix: Tensor, *, rank_tol: float | None = None, noise_floor: float = 0.0,
            max_rank: int | None = None, eps: float | None = None, gap_min: float = 100.0) -> Span:
    """Orthonormal basis of the row space of ``matrix`` [m, d].

    The numerical rank counts singular values above ``max(rank_tol * s_max, noise_floor)``;
    without ``rank_tol`` NumPy's ``matrix_rank`` rule is used (``s_max * max(m, d) * eps`` with
    ``eps`` of the observed update's dtype, float32 by default), the DAGER reference's default.
    """
    m, d = matrix.shape
    if not torch.isfinite(matrix).all():
        raise DagerPreconditionError("the observed update contains NaN or inf values")
    if m > d:  # tall: the SVD of the QR factor R [d, d] (same singular values and right vectors, about 40 % less work)
        _, s, vh = torch.linalg.svd(torch.linalg.qr(matrix, mode="r")[1])
    else:
        _, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    smax = float(s[0]) if s.numel() else 0.0
    if smax == 0.0:
        raise DagerPreconditionError(
            "degenerate update: the attention input projection's update is all zeros (e.g. a fresh LoRA adapter "
            "whose B matrix is zero, or a frozen layer); DAGER has no span to test against"
        )
    eps = float(torch.finfo(torch.float32).eps) if eps is None else eps
    tol_np = smax * max(m, d) * eps
    if rank_tol is not None:
        tol = max(smax * rank_tol, noise_floor)
        rank = int((s > tol).sum())
    elif noise_floor > 0:
        tol = noise_floor
        rank = int((s > tol).sum())
    else:
        # NumPy's rule is conservative for wide matrices (it can drop real directions whose singular
        # value is just under s_max * max(m, d) * eps); take the largest spectral gap whose lower
        # side is at or under that tolerance when the gap is clear (> gap_min), else NumPy's rule.
        rank = int((s > tol_np).sum())
        tol = tol_np
        lo = torch.nonzero(s <= tol_np).flatten()
        if lo.numel() and int(lo[0]) > 0:
            ks = torch.arange(int(lo[0]) - 1, s.numel() - 1)
            ratio = s[ks] / s[ks + 1].clamp_min(smax * 1e-30)
            j = int(ratio.argmax())
            if float(ratio[j]) > gap_min:
                rank = int(ks[j]) + 1
                tol = float(s[rank]) if rank < s.numel() else 0.0
    cap = min(m, d) if max_rank is None else min(max_rank, min(m, d))
    rank = max(1, min(rank, cap))
    return Span(vh[:rank].t().contiguous(), rank, min(m, d), s, tol)


def span_distance(basis: Tensor, vectors: Tensor, *, chunk: int = 8192, exact_below: float = 0.1) -> Tensor:
    """Batched distance of each normalised row of ``vectors`` [N, d] to span(basis) (float64 result).

    ``1 - |R^T v|^2`` is computed in the vectors' own dtype first (float32: absolute error ~3e-4 on
    the distance); rows whose distance is below ``exact_below`` are recomputed in float64, so
    every distance that can pass a threshold <= ``exact_below`` is exact to ~1e-8.
    """
    out = torch.empty(vectors.shape[0], dtype=torch.float64)
    b64 = basis.to(torch.float64).cpu()
    fast = vectors.dtype != torch.float64
    b_lo = basis.to(vectors.dtype).to(vectors.device) if fast else None
    for s in range(0, vectors.shape[0], chunk):
        v = vectors[s:s + chunk]
        if fast:
            vl = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
            p = vl @ b_lo
            d = (1.0 - (p * p).sum(1)).clamp_min(0.0).sqrt().to(torch.float64).cpu()
            redo = torch.nonzero(d < exact_below).flatten()
            if redo.numel():
                d[redo] = _exact(b64, v[redo.to(v.device)])
            out[s:s + chunk] = d
        else:
            out[s:s + chunk] = _exact(b64, v)
    return out


def _exact(b64: Tensor, v: Tensor) -> Tensor:
    v = v.to(torch.float64).cpu()
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
    p = v @ b64
    return (1.0 - (p * p).sum(1)).clamp_min(0.0).sqrt()


def span_distance_loop(basis: Tensor, vectors: Tensor) -> Tensor:
    """The obvious one-vector-at-a-time version (oracle for tests, baseline for the benchmark)."""
    b = basis.to(torch.float64)
    out = []
    for v in vectors:
        v = v.to(torch.float64)
        v = v / v.norm().clamp_min(1e-300)
        proj = b @ (b.t() @ v)
        out.append(float((v - proj).norm()))
    return torch.tensor(out, dtype=torch.float64)


class LayerInputs:
    """Computes the input of a tapped projection for arbitrary token sequences."""

    def __init__(self, model: nn.Module, tap: Tap) -> None:
        self.model = model
        self.tap = tap

    def __call__(self, input_ids: Tensor, *, attention_mask: Tensor | None = None,
                 position_ids: Tensor | None = None, token_type_ids: Tensor | None = None) -> Tensor:
        return self._forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             token_type_ids=token_type_ids)

    def from_embeds(self, inputs_embeds: Tensor, *, attention_mask: Tensor | None = None) -> Tensor:
        """As ``__call__`` but from word-embedding vectors [n, L, d] (the model adds positions / types
        and normalises as it does for token ids), so soft mixtures of tokens can be evaluated."""
        return self._forward(inputs_embeds=inputs_embeds, attention_mask=attention_mask)

    def _forward(self, **inputs: Tensor | None) -> Tensor:
        """Run the model on ``inputs`` (None entries dropped) and stop at the tapped projection."""
        store: list[Tensor] = []

        def hook(_m, args):
            store.append(args[0].detach())
            raise _Stop

        h = self.tap.first.register_forward_pre_hook(hook)
        kwargs = {k: v for k, v in inputs.items() if v is not None}
        try:
            with torch.no_grad():
                self.model(**kwargs)
        except _Stop:
            pass
        finally:
            h.remove()
        if not store:
            raise DagerPreconditionError(f"block {self.tap.block_index}'s input projection never ran")
        return store[0]


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def first_layer_vectors(inputs: LayerInputs, token_ids: Tensor, position: int, *, chunk: int = 4096) -> Tensor:
    """Layer-1 inputs of every token in ``token_ids`` placed alone at ``position`` -> [N, d] (model dtype)."""
    dev = model_device(inputs.model)
    outs = []
    for s in range(0, token_ids.numel(), chunk):
        ids = token_ids[s:s + chunk].to(dev).view(-1, 1)
        pos = torch.full_like(ids, position)
        outs.append(inputs(ids, position_ids=pos)[:, 0])
    return torch.cat(outs, 0)


def decoder_last_inputs(inputs: LayerInputs, prefixes: Sequence[Sequence[int]],
                        candidates: Sequence[Sequence[int]], *, max_tokens: int = 16384,
                        dtype: torch.dtype | None = torch.float64) -> list[Tensor]:
    """Layer inputs at the appended position for every ``prefix + [c]`` with ``c`` in ``candidates[i]``.

    All candidates of one prefix share a single row: ``prefix, c_1, ..., c_K`` with a custom 4-D
    additive mask (each ``c_j`` sees the prefix and itself) and position id ``len(prefix)`` for
    every ``c_j``, so a prefix of length L costs L + K tokens instead of K (L + 1).
    Returns, per prefix, a [K_i, d] tensor (``dtype`` on the CPU, float64 by default; ``dtype=None``: as the
    forward gave it: the model's dtype and device).
    """
    dev = model_device(inputs.model)
    out_dtype = dtype
    dtype = next(inputs.model.parameters()).dtype
    rows = [(list(p), list(c)) for p, c in zip(prefixes, candidates, strict=True)]
    results: list[Tensor | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    i = 0
    neg = torch.finfo(dtype).min
    while i < len(order):
        t_len = len(rows[order[i]][0]) + len(rows[order[i]][1])
        j = i
        while j < len(order) and (j - i + 1) * max(t_len, len(rows[order[j]][0]) + len(rows[order[j]][1])) <= max_tokens:
            t_len = max(t_len, len(rows[order[j]][0]) + len(rows[order[j]][1]))
            j += 1
        j = max(j, i + 1)
        idx = order[i:j]
        n = len(idx)
        ids = torch.zeros(n, t_len, dtype=torch.long)
        pos = torch.zeros(n, t_len, dtype=torch.long)
        allow = torch.zeros(n, t_len, t_len, dtype=torch.bool)
        for r, k in enumerate(idx):
            p, c = rows[k]
            L, K = len(p), len(c)
            ids[r, :L] = torch.tensor(p, dtype=torch.long) if L else ids[r, :0]
            ids[r, L:L + K] = torch.tensor(c, dtype=torch.long)
            pos[r, :L] = torch.arange(L)
            pos[r, L:L + K] = L
            if L:
                allow[r, :L, :L] = torch.tril(torch.ones(L, L, dtype=torch.bool))
                allow[r, L:L + K, :L] = True
            ar = torch.arange(L, t_len)
            allow[r, ar, ar] = True  # candidates (and padding) see themselves
        mask = torch.zeros(n, 1, t_len, t_len, dtype=dtype)
        mask.masked_fill_(~allow.unsqueeze(1), neg)
        x = inputs(ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev))
        for r, k in enumerate(idx):
            L, K = len(rows[k][0]), len(rows[k][1])
            results[k] = x[r, L:L + K].to(out_dtype).cpu() if out_dtype is not None else x[r, L:L + K]
        i = j
    return results  # type: ignore[return-value]
