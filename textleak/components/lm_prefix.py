"""LM-prior NLLs of many texts with every shared prefix computed once (a token trie).

A LAMP swap round scores ~114 distinct re-orderings of the current text: a causal LM's hidden state
at a token depends only on the tokens up to it, so texts that agree up to a position share all
hidden states up to there. :func:`trie_nll` puts the token sequences in a prefix tree and runs
each *node* once through a Llama-architecture model, layer by layer over the flat nodes (no padding
through the weights; a packed weight is de-quantised once per call): a node attends to the keys and
values of its ancestors and itself, at its depth as position (RoPE); each edge's cross-entropy (the
parent's hidden state predicting the child's token) is computed once and a text's NLL is the mean
over its path. Same model and arithmetic as the padded batch forward; the values differ by float
rounding only (other matrix shapes: ~1e-6 nats, tested against the padded path). On a round of
114 texts of ~15 tokens about a third of the tokens are shared prefixes.

Covered: ``transformers`` Llama models (eager or :mod:`textleak.components.gguf_lm`'s packed one)
without attention/MLP biases; :func:`supports` tells, and the caller keeps the padded forward otherwise.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["supports", "trie", "trie_nll"]


def supports(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return (getattr(cfg, "model_type", None) == "llama" and not getattr(cfg, "attention_bias", True)
            and not getattr(cfg, "mlp_bias", True) and hasattr(getattr(model, "model", None), "layers")
            and getattr(cfg, "hidden_act", None) == "silu" and not getattr(model, "training", False))


def trie(seqs: Sequence[Sequence[int]]) -> tuple[list[int], list[int], list[list[int]]]:
    """Prefix tree of ``seqs``: per node its token and parent (``-1`` for a root), in creation order
    (a parent before its children), and per sequence the node ids of its path."""
    index: dict[tuple[int, int], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    paths = []
    for s in seqs:
        node, path = -1, []
        for t in s:
            key = (node, int(t))
            nxt = index.get(key)
            if nxt is None:
                nxt = index[key] = len(tokens)
                tokens.append(int(t))
                parents.append(node)
            node = nxt
            path.append(node)
        paths.append(path)
    return tokens, parents, paths


def _weight(lin: nn.Module) -> Tensor:
    blocks = getattr(lin, "blocks", None)
    return blocks.dequant() if blocks is not None else lin.weight


def _rms(x: Tensor, norm: nn.Module) -> Tensor:
    """``LlamaRMSNorm``'s arithmetic (float32 input)."""
    var = x.pow(2).mean(-1, keepdim=True)
    return norm.weight * (x * torch.rsqrt(var + norm.variance_epsilon))


def _rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


@torch.no_grad()
def trie_nll(model: nn.Module, seqs: Sequence[Sequence[int]], *,
             ce: Callable[..., Tensor], grouped: bool = False, node_chunk: int = 256) -> Tensor:
    """Per sequence of ``seqs`` (token ids, the start token included): the mean NLL of its tokens
    1.. given the earlier ones (0 for a sequence of one token), each shared prefix computed once;
    ``ce(hidden [N, d], targets [N])`` is the head's per-row cross-entropy (streamed or full). With
    ``grouped``, ``ce(hidden [U, d], targets [N], rows [N])`` gets each distinct parent state once and
    per edge its row (a node with many children: the head's log-normaliser once).

    Only nodes with a child run through the layers: a leaf's state predicts nothing and its keys and values
    serve no descendant, so each text's last token is never computed (as the padded forward's last position
    is dropped; ~11 % of a swap round's nodes). ``node_chunk`` nodes at a time gather their ancestors' keys and
    values (bounds that transient; the values do not depend on it: each node's attention is its own product)."""
    cfg = model.config
    dev = next(iter(model.model.norm.parameters())).device
    tokens_all, parents_all, paths = trie(seqs)
    if len(tokens_all) == 0:
        return torch.zeros(len(seqs))
    # inner nodes only (a parent is created before its children, so the order stays parent-first)
    inner = sorted({p for p in parents_all if p >= 0})
    new = {old: i for i, old in enumerate(inner)}
    tokens = [tokens_all[i] for i in inner]
    parents = [new[parents_all[i]] if parents_all[i] >= 0 else -1 for i in inner]
    n = len(tokens)
    edge = torch.zeros(len(tokens_all) + 1, dtype=torch.float64)  # per node: the NLL of the edge into it
    # the last entry: padding of the paths below
    steps, ok = _padded([p[1:] for p in paths], "cpu", fill=len(tokens_all))  # a path's edges: its nodes after the first
    count = ok.sum(1).clamp(min=1)
    if n == 0:  # every sequence is a single token
        return (edge[steps].sum(1) / count).float()
    anc: list[list[int]] = []  # per node: its ancestors and itself, root first
    for p in parents:
        anc.append((anc[p] if p >= 0 else []) + [len(anc)])
    idx, valid = _padded(anc, dev)
    depth = idx.shape[1]
    pos = valid.sum(1) - 1  # a node's position is its depth
    h_n, kv_n = cfg.num_attention_heads, cfg.num_key_value_heads
    rep = h_n // kv_n
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // h_n
    x = model.model.embed_tokens(torch.tensor(tokens, dtype=torch.long, device=dev)).float()
    cos, sin = model.model.rotary_emb(x, pos[None])
    cos, sin = cos[0][:, None, :], sin[0][:, None, :]  # [N, 1, hd]
    mask = torch.zeros(n, 1, 1, depth, dtype=x.dtype, device=dev)
    mask.masked_fill_(~valid[:, None, None, :], torch.finfo(x.dtype).min)
    scale = hd ** -0.5
    for layer in model.model.layers[:cfg.num_hidden_layers]:
        at = layer.self_attn
        h = _rms(x, layer.input_layernorm)
        q = nn.functional.linear(h, _weight(at.q_proj)).view(n, kv_n, rep, hd)
        k = nn.functional.linear(h, _weight(at.k_proj)).view(n, kv_n, hd)
        v = nn.functional.linear(h, _weight(at.v_proj)).view(n, kv_n, hd)
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos + _rotate_half(k) * sin
        o = torch.empty(n, h_n * hd, dtype=x.dtype, device=dev)
        for s in range(0, n, node_chunk):  # the ancestors' keys/values gathered for a chunk of nodes at a time
            e = min(n, s + node_chunk)
            fi = idx[s:e].flatten()
            kp = k.index_select(0, fi).view(e - s, depth, kv_n, hd).permute(0, 2, 3, 1)  # [n, KV, hd, depth]
            vp = v.index_select(0, fi).view(e - s, depth, kv_n, hd).transpose(1, 2)  # [n, KV, depth, hd]
            w = torch.matmul(q[s:e], kp) * scale + mask[s:e]  # [n, KV, rep, depth]
            w = nn.functional.softmax(w, dim=-1, dtype=torch.float32)
            o[s:e] = torch.matmul(w, vp).reshape(e - s, h_n * hd)
        x = x + nn.functional.linear(o, _weight(at.o_proj))
        m = layer.mlp
        h = _rms(x, layer.post_attention_layernorm)
        gate = nn.functional.silu(nn.functional.linear(h, _weight(m.gate_proj)))
        x = x + nn.functional.linear(gate * nn.functional.linear(h, _weight(m.up_proj)), _weight(m.down_proj))
    x = _rms(x, model.model.norm)
    # one cross-entropy per edge: the parent's hidden state predicting the child's token
    child = [c for c, p in enumerate(parents_all) if p >= 0]
    par = torch.tensor([new[parents_all[c]] for c in child], dtype=torch.long, device=dev)
    tgt = torch.tensor([tokens_all[c] for c in child], dtype=torch.long, device=dev)
    vals = ce(x, tgt, par) if grouped else ce(x[par], tgt)
    edge[torch.tensor(child, dtype=torch.long)] = vals.double().cpu()
    return (edge[steps].sum(1) / count).float()


def _padded(rows: Sequence[Sequence[int]], dev, fill: int = 0) -> tuple[Tensor, Tensor]:
    """``rows`` as a ``[len(rows), longest]`` index tensor (``fill`` past each row's end) and its validity mask."""
    width = max(1, max((len(r) for r in rows), default=0))
    out = np.full((len(rows), width), fill, dtype=np.int64)
    ok = np.zeros((len(rows), width), dtype=bool)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
        ok[i, :len(r)] = True
    return torch.from_numpy(out).to(dev), torch.from_numpy(ok).to(dev)
