"""Incremental first block for rotary decoders with the Llama layout (RMSNorm, rotary positions,
grouped-query attention: Llama, SmolLM2): the feed-forward input of ``prefix + [c]`` for many prefixes
and candidates at once (an addition for speed, issue 18; the rotary counterpart of
``dec_block.PreLNDecoderBlock``).

In the first block everything before the attention is position-local: with ``x`` the word row of
token ``t`` (no position embedding), ``q = R_p W_q RMSNorm_1(x)``, ``k = R_p W_k RMSNorm_1(x)`` and
``v = W_v RMSNorm_1(x)`` depend on ``(t, p)`` only (``R_p`` the rotation of position ``p``, taken
from the model's own rotary module). So they are computed once per position for the candidate list
(``table``) and every path's prefix keys and values are gathered from the tables of earlier
positions; per (path, candidate) pair only the candidate's attention over its prefix (the query
heads of one key/value group share that group's keys, no repetition), ``o_proj`` and
``RMSNorm_2`` remain. The model forward instead recomputes every prefix token's projections for
every path (``span.decoder_last_inputs``).

The block is built only for modules with this layout (``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
``post_attention_layernorm``, ``mlp.gate_proj``/``up_proj`` tapped) and only when it reproduces the
model's own feed-forward inputs on a probe (``build``, as the GPT-2 block); otherwise the search uses
the model forward. Deviation from the model's arithmetic: the query is scaled before the dot product
(float32 round-off).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .dec_block import PAIR_CHUNK, PositionTable, fold_mix, prefix_kv
from .span import LayerInputs, decoder_last_inputs, transformer_blocks


#: (session 20) the prefilter's distances with o_proj, RMSNorm_2's weight and the complement folded into the values
#: (``RopeDecoderBlock.ffn_distances``); False: the block's feed-forward inputs, then the distance (sessions 12-19)
ROPE_FOLD = True
FOLD_HEADS = 3  # the fold while FOLD_HEADS * H * (L + 1) <= d (L the prefix length; the GPT-2 block's rule)


def _rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rotary_module(model: nn.Module) -> nn.Module | None:
    """The model's rotary embedding (a module with ``inv_freq`` called as ``(x, position_ids)``)."""
    for _, m in model.named_modules():
        if type(m).__name__.endswith("RotaryEmbedding") and hasattr(m, "inv_freq"):
            return m
    return None


class RopeDecoderBlock:
    """A Llama-layout first block up to its feed-forward input, evaluated incrementally (module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        blk = transformer_blocks(model)[0]
        attn = blk.self_attn
        self.wte = model.get_input_embeddings().weight.detach()
        self.ln1, self.ln2 = blk.input_layernorm, blk.post_attention_layernorm
        self.qp, self.kp, self.vp, self.op = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.dh = int(attn.head_dim)
        self.h = int(self.qp.out_features) // self.dh
        self.hkv = int(self.kp.out_features) // self.dh
        self.rep = self.h // self.hkv
        self.scale = float(attn.scaling)
        rope = _rotary_module(model)
        if rope is None:
            raise ValueError("no rotary embedding module")
        self.rope = rope
        self.d = int(self.wte.shape[1])
        self.tables: dict[int, PositionTable] = {}

    @classmethod
    def build(cls, model: nn.Module, li: LayerInputs, probe: list[int]) -> RopeDecoderBlock | None:
        """The block when ``li`` taps the first block's ``mlp.gate_proj`` / ``up_proj`` of a Llama-layout
        model and the block reproduces the model's feed-forward inputs on ``probe`` (its prefixes, with
        other candidates), else None."""
        try:
            blk = transformer_blocks(model)[0]
            if li.tap.first not in (blk.mlp.gate_proj, blk.mlp.up_proj):
                return None
            self = cls(model)
        except (AttributeError, TypeError, ValueError):
            return None
        if self.h * self.dh != self.op.in_features or self.h % self.hkv or not probe:
            return None
        vocab = int(self.wte.shape[0])
        others = [(t * 7919 + 13) % vocab for t in range(5)]
        prefixes = [probe[:k] for k in range(len(probe))]
        cands = [[probe[k]] + others for k in range(len(probe))]
        try:
            for p, c in enumerate(cands):
                self.table(p, sorted(set(c)))
            want = decoder_last_inputs(li, prefixes, cands)
            for p, (pre, c) in enumerate(zip(prefixes, cands)):
                got = self.extend([pre], p, c)[0].double().cpu()  # decoder_last_inputs: CPU float64
                w = want[p]
                if got.shape != w.shape or not torch.allclose(got, w, rtol=1e-4, atol=1e-4 * float(w.abs().max())):
                    return None
        except (RuntimeError, TypeError, ValueError):
            return None
        self.tables.clear()
        return self

    @torch.no_grad()
    def table(self, pos: int, ids: list[int]) -> PositionTable:
        """Cache the block-0 query [H, K, dh] (rotated, scaled), key and value [K, Hkv, dh] of ``ids``
        at ``pos`` (replacing an earlier table)."""
        idx = torch.tensor(ids, dtype=torch.long, device=self.wte.device)
        x = self.wte[idx]
        n = len(ids)
        xn = self.ln1(x.unsqueeze(0))[0]
        q = self.qp(xn).view(n, self.h, self.dh)
        k = self.kp(xn).view(n, self.hkv, self.dh)
        v = self.vp(xn).view(n, self.hkv, self.dh)
        cos, sin = self.rope(x.unsqueeze(0), torch.full((1, n), pos, dtype=torch.long, device=x.device))
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [K, 1, dh]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        t = PositionTable(list(ids), {int(a): i for i, a in enumerate(ids)}, x,
                          (q * self.scale).transpose(0, 1).contiguous(), k.contiguous(), v.contiguous())
        self.tables[pos] = t
        return t

    @torch.no_grad()
    def extend(self, prefixes: list[list[int]], pos: int, cands: list[int], *,
               reduce: Callable[[Tensor], Tensor] | None = None,
               finish: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
        """Feed-forward inputs [P, K, d] of ``prefix + [c]`` (``c`` in ``cands``, placed at ``pos`` =
        every prefix's length) for every prefix, as ``PreLNDecoderBlock.extend`` (same contract)."""
        post = self._finish if finish is None else finish
        tab = self.tables[pos]
        rows = torch.tensor([tab.row[c] for c in cands], dtype=torch.long)
        q, kc, vc, x = tab.q[:, rows], tab.k[rows], tab.v[rows], tab.x[rows]  # [H,K,dh], [K,Hkv,dh], .., [K,d]
        n_p, n_k, g, r = len(prefixes), len(cands), self.hkv, self.rep
        fin = (lambda o: post(o, x)) if reduce is None else (lambda o: reduce(post(o, x)))
        if pos == 0:  # the candidate attends to itself only: its value, in every query head of the group
            o = vc.repeat_interleave(r, dim=1).reshape(1, n_k, self.h * self.dh)
            y = fin(o)
            return y.expand(n_p, *y.shape[1:])
        qg = q.view(g, r * n_k, self.dh)  # query head h = group * rep + j -> [Hkv, rep K, dh]
        ss = (q * kc.repeat_interleave(r, dim=1).transpose(0, 1)).sum(-1).view(g, r * n_k)  # own key
        vself = vc.transpose(0, 1).unsqueeze(1).expand(g, r, n_k, self.dh).reshape(g, r * n_k, self.dh)
        kp, vp = prefix_kv(self.tables, prefixes, pos)
        kp, vp = kp.permute(0, 2, 3, 1), vp.permute(0, 2, 1, 3)  # [P, Hkv, dh, L], [P, Hkv, L, dh]
        out: list[Tensor] = []
        step = max(1, PAIR_CHUNK // max(1, self.h * n_k * pos))
        for s in range(0, n_p, step):
            sc = torch.matmul(qg.unsqueeze(0), kp[s:s + step])  # [p, Hkv, rep K, L]
            m = torch.maximum(sc.amax(-1), ss.unsqueeze(0))
            e = torch.exp(sc - m.unsqueeze(-1))
            es = torch.exp(ss.unsqueeze(0) - m)
            o = torch.matmul(e, vp[s:s + step]) + es.unsqueeze(-1) * vself.unsqueeze(0)
            o = o / (e.sum(-1) + es).unsqueeze(-1)  # [p, Hkv, rep K, dh]
            o = o.view(-1, g, r, n_k, self.dh).permute(0, 3, 1, 2, 4).reshape(-1, n_k, self.h * self.dh)
            out.append(fin(o))
        return torch.cat(out, 0)

    @torch.no_grad()
    def ffn_distances(self, prefixes: list[list[int]], pos: int, cands: list[int], dist) -> Tensor:
        """``extend(prefixes, pos, cands, reduce=dist)`` (the prefilter's feed-forward-input span distances [P, K],
        CPU float64) with ``o_proj``, ``RMSNorm_2``'s weight and the complement folded into the values (session 20;
        the rotary counterpart of ``PreLNDecoderBlock.ffn_distances``). ``RMSNorm_2(r) = gamma * r / rms(r)`` and the
        distance ``|C^T y| / |y|`` is scale-free, so it is ``|C^T G r| / |G r|`` (``G = diag(gamma)``) with
        ``r = x + b + sum_h sum_l a_hl W_h v_l``: each prefix token's and candidate's value is projected once per step
        by ``G W_h`` and ``C^T G W_h`` (query head ``h`` reads its key/value group's value), and a pair costs
        ``H (L + 1) (d + m)`` multiply-adds instead of ``d H dh + d m``. The same distances up to float32 round-off
        (they only gate which extensions reach layer 2). Without a prefix, with a long one (``3 H (L + 1) > d``, the
        GPT-2 block's rule) or with ``ROPE_FOLD`` off: ``extend``."""
        if not ROPE_FOLD or pos == 0 or FOLD_HEADS * self.h * (pos + 1) > self.d:
            return self.extend(prefixes, pos, cands, reduce=dist)
        tab = self.tables[pos]
        rows = torch.tensor([tab.row[c] for c in cands], dtype=torch.long)
        q, kc, vc, x = tab.q[:, rows], tab.k[rows], tab.v[rows], tab.x[rows]  # [H,K,dh], [K,Hkv,dh], .., [K,d]
        n_p, n_k, g, r, h, dh = len(prefixes), len(cands), self.hkv, self.rep, self.h, self.dh
        comp = dist.on(x)  # [d, m]
        n_m = int(comp.shape[1])
        gam = self.ln2.weight.detach().to(x.dtype)
        whg = self.op.weight.detach().t().reshape(h, dh, self.d) * gam  # [H, dh, d]: G W_h (rows of o_proj^T)
        whc = torch.matmul(whg, comp)  # [H, dh, m]
        base = x if self.op.bias is None else x + self.op.bias.detach()
        base = base * gam  # [K, d]
        base_c = base @ comp  # [K, m]
        vch = vc.repeat_interleave(r, dim=1).transpose(0, 1)  # [H, K, dh]: each query head's group value
        vpc = torch.matmul(vch, whg).transpose(0, 1)  # [K, H, d]
        vcc = torch.matmul(vch, whc).transpose(0, 1)  # [K, H, m]
        qg = q.view(g, r * n_k, dh)
        ss = (q * kc.repeat_interleave(r, dim=1).transpose(0, 1)).sum(-1).view(g, r * n_k)  # own key
        kp, vp = prefix_kv(self.tables, prefixes, pos)
        kp = kp.permute(0, 2, 3, 1)  # [P, Hkv, dh, L]
        vh = vp.repeat_interleave(r, dim=2).permute(2, 0, 1, 3).reshape(h, n_p * pos, dh)  # [H, P L, dh]
        vpp = torch.matmul(vh, whg).view(h, n_p, pos, self.d).transpose(0, 1).reshape(n_p, h * pos, self.d)
        vpm = torch.matmul(vh, whc).view(h, n_p, pos, n_m).transpose(0, 1).reshape(n_p, h * pos, n_m)
        out: list[Tensor] = []
        for gr, t in fold_mix(qg, ss, kp, (vpp, vpm), (vpc, vcc), (base, base_c), heads=h, n_k=n_k, pos=pos):
            out.append(t.norm(dim=-1).double() / gr.norm(dim=-1).double().clamp_min(1e-300))
        return torch.cat(out, 0).cpu()

    def residual(self, o: Tensor, x: Tensor) -> Tensor:
        """The residual stream after the attention: ``x + o_proj(o)``."""
        return self.op(o) + x

    def _finish(self, o: Tensor, x: Tensor) -> Tensor:
        return self.ln2(self.residual(o, x))
