"""Incremental first block for GPT-2-family (pre-LayerNorm, learned positions) decoders: the
feed-forward input of ``prefix + [c]`` for many prefixes and candidates at once (an addition for speed).

The ranked decoder search (``frontier.search_decoder``) scores every (live path, candidate) pair at
the first block's feed-forward input ``LN_2(x + Attn(LN_1(x)))`` of the appended position. In the
first block everything before the attention is position-local: the query, key and value of token
``t`` at position ``p`` depend on ``(t, p)`` only. So they are computed once per position for the
candidate list (``PositionTable``) and every path's prefix keys and values are gathered from the
tables of earlier positions; only the attention of each candidate's query over its path's prefix,
the output projection and ``LN_2`` are computed per pair. The model forward instead recomputes
``Q/K/V`` of every prefix and candidate for every path (``span.decoder_last_inputs``).

The block is built only for modules with GPT-2's layout (``ln_1``, ``attn.c_attn``, ``attn.c_proj``,
``ln_2``, ``mlp.c_fc``) and only when it reproduces the model's own feed-forward inputs on a
probe (``build``); otherwise the search uses the model forward. Distances to a span whose
complement is small (the saturated rank of the ranked search) are measured against the
complement (``ComplementDistance``: ``|C^T y| / |y|`` equals ``sqrt(1 - |B^T y|^2 / |y|^2)``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .prior import learned_position_table
from .span import LayerInputs, decoder_last_inputs, transformer_blocks

PAIR_CHUNK = 4_000_000  # attention weights (paths x heads x candidates x prefix) per chunk


@dataclass
class PositionTable:
    """The candidates of one position: token ids, their row index, and their block-0 inputs."""
    ids: list[int]
    row: dict[int, int]
    x: Tensor  # [K, d] word + position embedding (the residual)
    q: Tensor  # [H, K, dh]
    k: Tensor  # [K, H, dh]
    v: Tensor  # [K, H, dh]


class PreLNDecoderBlock:
    """GPT-2's first block up to its feed-forward input, evaluated incrementally (module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        blk = transformer_blocks(model)[0]
        self.wte = model.get_input_embeddings().weight.detach()
        self.wpe = learned_position_table(model).weight.detach()  # type: ignore[union-attr]
        self.ln1, self.ln2 = blk.ln_1, blk.ln_2
        self.w_attn, self.b_attn = blk.attn.c_attn.weight.detach(), blk.attn.c_attn.bias.detach()
        self.w_proj, self.b_proj = blk.attn.c_proj.weight.detach(), blk.attn.c_proj.bias.detach()
        self.d = int(self.wte.shape[1])
        self.h = int(getattr(model.config, "n_head", 0) or model.config.num_attention_heads)
        self.dh = self.d // self.h
        self.tables: dict[int, PositionTable] = {}

    @classmethod
    def build(cls, model: nn.Module, li: LayerInputs, probe: list[int]) -> PreLNDecoderBlock | None:
        """The block when ``li`` taps GPT-2's first ``mlp.c_fc`` and the block reproduces the model's
        feed-forward inputs on ``probe`` (prefixes of it, with other candidates), else None."""
        try:
            blk = transformer_blocks(model)[0]
            if li.tap.first is not blk.mlp.c_fc or learned_position_table(model) is None:
                return None
            if getattr(blk.attn, "is_cross_attention", False) or getattr(blk.attn, "scale_attn_by_inverse_layer_idx", False):
                return None
            self = cls(model)
        except (AttributeError, TypeError, ValueError):
            return None
        if not getattr(blk.attn, "scale_attn_weights", True) or self.h * self.dh != self.d:
            return None
        vocab = int(self.wte.shape[0])
        others = [(t * 7919 + 13) % vocab for t in range(5)]
        prefixes = [probe[:k] for k in range(len(probe))]
        cands = [[probe[k]] + others for k in range(len(probe))]
        for p, c in enumerate(cands):
            self.table(p, sorted(set(c) | {probe[p]}))
        want = decoder_last_inputs(li, prefixes, cands)
        for p, (pre, c) in enumerate(zip(prefixes, cands)):
            got = self.extend([pre], p, c)[0].double().cpu()  # decoder_last_inputs: CPU float64
            w = want[p]
            if not torch.allclose(got, w, rtol=1e-4, atol=1e-4 * float(w.abs().max())):
                return None
        self.tables.clear()
        return self

    @torch.no_grad()
    def table(self, pos: int, ids: list[int]) -> PositionTable:
        """Cache the block-0 query, key and value of ``ids`` at ``pos`` (replacing an earlier table)."""
        idx = torch.tensor(ids, dtype=torch.long, device=self.wte.device)
        x = self.wte[idx] + self.wpe[pos]
        qkv = F.layer_norm(x, (self.d,), self.ln1.weight, self.ln1.bias, self.ln1.eps) @ self.w_attn + self.b_attn
        q, k, v = qkv.split(self.d, dim=1)
        n = len(ids)
        t = PositionTable(list(ids), {int(a): i for i, a in enumerate(ids)}, x,
                          q.reshape(n, self.h, self.dh).transpose(0, 1).contiguous() / math.sqrt(self.dh),
                          k.reshape(n, self.h, self.dh), v.reshape(n, self.h, self.dh))
        self.tables[pos] = t
        return t

    @torch.no_grad()
    def extend(self, prefixes: list[list[int]], pos: int, cands: list[int], *,
               reduce: Callable[[Tensor], Tensor] | None = None,
               finish: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
        """Feed-forward inputs [P, K, d] of ``prefix + [c]`` (``c`` in ``cands``, placed at ``pos`` =
        every prefix's length) for every prefix; the tables of positions ``< pos`` must hold the
        prefixes' tokens and the table of ``pos`` every candidate. ``reduce`` maps each chunk's
        [p, K, d] inputs to [p, K] (a span distance) so that only the reduced values are kept.
        ``finish(o, x)`` replaces the step from the attention output ``o`` [p, K, d] and the residual
        ``x`` [K, d] to the feed-forward input (``l2_block.py``: on to the second block's input)."""
        post = self._finish if finish is None else finish
        tab = self.tables[pos]
        rows = torch.tensor([tab.row[c] for c in cands], dtype=torch.long)
        q, kc, vc, x = tab.q[:, rows], tab.k[rows], tab.v[rows], tab.x[rows]  # [H,K,dh], [K,H,dh], .., [K,d]
        n_p, n_k = len(prefixes), len(cands)
        ss = (q * kc.transpose(0, 1)).sum(-1)  # [H, K] the candidate's own key
        fin = (lambda o: post(o, x)) if reduce is None else (lambda o: reduce(post(o, x)))
        if pos == 0:
            y = fin(vc.reshape(1, n_k, self.d))
            return y.expand(n_p, *y.shape[1:])
        out: list[Tensor] = []
        kp, vp = prefix_kv(self.tables, prefixes, pos)
        kp, vp = kp.permute(0, 2, 3, 1), vp.permute(0, 2, 1, 3)  # [P, H, dh, L], [P, H, L, dh]
        step = max(1, PAIR_CHUNK // max(1, self.h * n_k * pos))
        for s in range(0, n_p, step):
            sc = torch.matmul(q.unsqueeze(0), kp[s:s + step])  # [p, H, K, L]
            m = torch.maximum(sc.amax(-1), ss.unsqueeze(0))
            e = torch.exp(sc - m.unsqueeze(-1))
            es = torch.exp(ss.unsqueeze(0) - m)  # [p, H, K]
            o = torch.matmul(e, vp[s:s + step]) + es.unsqueeze(-1) * vc.transpose(0, 1).unsqueeze(0)
            o = o / (e.sum(-1) + es).unsqueeze(-1)
            out.append(fin(o.permute(0, 2, 1, 3).reshape(-1, n_k, self.d)))
        return torch.cat(out, 0)

    @torch.no_grad()
    def ffn_distances(self, prefixes: list[list[int]], pos: int, cands: list[int], dist: ComplementDistance) -> Tensor:
        """``extend(prefixes, pos, cands, reduce=dist)`` (the feed-forward input's span distances [P, K] of the
        exact decoder search's prefilter) with the output projection and the complement folded into the
        values (issue 18). After the attention the residual is ``r = x + b + sum_h sum_l a_hl W_h v_l`` and
        ``C^T LN_2(r) = (C^T G r - mean(r) C^T gamma) / std(r) + C^T beta`` (``G = diag(gamma)``), so each
        prefix token's and candidate's value is projected once per step, by ``W_h`` and by ``C^T G W_h``, and
        a pair costs ``H (L + 1) (d + m)`` multiply-adds (``m`` the complement's width) instead of
        ``d^2 + d m``. The same distances up to float32 round-off (they only gate which extensions the
        model tests at layer 2). Without a prefix, or with a long one (``3 H (L + 1) > d``), ``extend``
        (on GPT-2's first block with 16 paths x 253 candidates the fold measured 1.5-2.5x faster at 1-5
        prefix tokens, even at 20, slower at 40)."""
        if pos == 0 or 3 * self.h * (pos + 1) > self.d:
            return self.extend(prefixes, pos, cands, reduce=dist)
        n_m = int(dist.comp32.shape[1])
        comp = dist.comp32.to(self.w_proj.device)
        tab = self.tables[pos]
        rows = torch.tensor([tab.row[c] for c in cands], dtype=torch.long)
        q, kc, vc, x = tab.q[:, rows], tab.k[rows], tab.v[rows], tab.x[rows]
        n_p, n_k, h = len(prefixes), len(cands), self.h
        gam, beta = self.ln2.weight.detach(), self.ln2.bias.detach()
        cg = gam.unsqueeze(1) * comp  # [d, m]: G C
        c_gam, c_beta = gam @ comp, beta @ comp  # C^T gamma, C^T beta
        wh = self.w_proj.view(h, self.dh, self.d)
        whc = torch.matmul(wh, cg)  # [H, dh, m]
        vct = vc.transpose(0, 1)  # [H, K, dh]
        vpc = torch.matmul(vct, wh).transpose(0, 1)  # [K, H, d] the candidates' projected values
        vcc = torch.matmul(vct, whc).transpose(0, 1)  # [K, H, m]
        base = x + self.b_proj
        base_c = base @ cg
        ss = (q * kc.transpose(0, 1)).sum(-1)  # [H, K]
        kp, vp = prefix_kv(self.tables, prefixes, pos)
        kp = kp.permute(0, 2, 3, 1)  # [P, H, dh, L]
        vh = vp.permute(2, 0, 1, 3).reshape(h, n_p * pos, self.dh)
        # the prefixes' projected values, head-major as the weights below: [P, H L, d] and [P, H L, m]
        vpp = torch.matmul(vh, wh).view(h, n_p, pos, self.d).transpose(0, 1).reshape(n_p, h * pos, self.d)
        vpm = torch.matmul(vh, whc).view(h, n_p, pos, n_m).transpose(0, 1).reshape(n_p, h * pos, n_m)
        out: list[Tensor] = []
        for r, t in fold_mix(q, ss, kp, (vpp, vpm), (vpc, vcc), (base, base_c), heads=h, n_k=n_k, pos=pos):
            y, mu, inv = torch.native_layer_norm(r, [self.d], gam, beta, self.ln2.eps)  # mean, 1 / std [p, K, 1]
            cy = (t - mu * c_gam) * inv + c_beta  # C^T LN_2(r)
            out.append(cy.norm(dim=-1).double() / y.norm(dim=-1).double().clamp_min(1e-300))
        return torch.cat(out, 0).cpu()  # as span_distance: CPU float64

    def residual(self, o: Tensor, x: Tensor) -> Tensor:
        """The residual stream after the attention: ``x + c_proj(o)``."""
        return torch.matmul(o, self.w_proj) + self.b_proj + x

    def _finish(self, o: Tensor, x: Tensor) -> Tensor:
        h = self.residual(o, x)
        return F.layer_norm(h, (self.d,), self.ln2.weight, self.ln2.bias, self.ln2.eps)


class ComplementDistance:
    """Span distance ``|C^T y| / |y|`` with ``C`` the orthonormal complement of ``basis`` [d, r]
    (float64 result on the CPU, as ``span.span_distance``'s: the same quantity, cheaper when ``d - r`` is small)."""

    def __init__(self, basis: Tensor) -> None:
        d, r = basis.shape
        q, _ = torch.linalg.qr(basis.double().cpu(), mode="complete")  # the last d - r columns span
        self.comp = q[:, r:].contiguous()  # the complement (as the leading singular vectors of I - B B^T did)
        self.comp32 = self.comp.float()
        self._on: dict = {}

    def on(self, like: Tensor) -> Tensor:
        """The complement as ``__call__`` uses it for ``like`` (float32 kept, else ``like``'s dtype), on ``like``'s
        device (cached: the block runs on the model's device, the basis is made on the CPU)."""
        key = (like.dtype, like.device)
        if key not in self._on:
            c = self.comp32 if like.dtype == torch.float32 else self.comp.to(like.dtype)
            self._on[key] = c.to(like.device)
        return self._on[key]

    def __call__(self, y: Tensor) -> Tensor:
        lead = y.shape[:-1]
        y = y.reshape(-1, y.shape[-1])
        num = (y @ self.on(y)).double().norm(dim=1)
        return (num / y.double().norm(dim=1).clamp_min(1e-300)).view(lead).cpu()


def prefix_kv(tables: dict[int, PositionTable], prefixes: list[list[int]], pos: int) -> tuple[Tensor, Tensor]:
    """The prefixes' keys and values from the position tables: [P, L, H(kv), dh] each (``L = pos``)."""
    kp = torch.stack([tables[j].k[[tables[j].row[p[j]] for p in prefixes]] for j in range(pos)], 1)
    vp = torch.stack([tables[j].v[[tables[j].row[p[j]] for p in prefixes]] for j in range(pos)], 1)
    return kp, vp


def fold_mix(q: Tensor, ss: Tensor, kp: Tensor, prefix_vals: tuple[Tensor, Tensor], own_vals: tuple[Tensor, Tensor],
             bases: tuple[Tensor, Tensor], *, heads: int, n_k: int, pos: int):
    """The folded prefilters' attention mix (``ffn_distances`` of both blocks), chunk by chunk of paths: for each
    (path, candidate) pair the softmax over the prefix keys ``kp`` [P, G, dh, L] and the candidate's own key (scores
    ``ss`` [G, R K]) of the queries ``q`` [G, R K, dh] (``G`` key/value groups of ``R`` query heads each; ``G = H``,
    ``R = 1`` without grouping), then the weighted sums of the projected values: yields ``(r, t)`` per chunk,
    ``r = base + sum a v`` [p, K, d] and ``t = base_c + sum a v_c`` [p, K, m] with the prefixes' projected values
    ``prefix_vals`` ([P, H L, d], [P, H L, m]), the candidates' ``own_vals`` ([K, H, d], [K, H, m]) and ``bases``
    ([K, d], [K, m])."""
    (vpp, vpm), (vpc, vcc), (base, base_c) = prefix_vals, own_vals, bases
    n_p, d, n_m = int(kp.shape[0]), int(base.shape[1]), int(base_c.shape[1])
    step = max(1, PAIR_CHUNK // max(1, heads * n_k * pos))
    for s in range(0, n_p, step):
        p_n = min(step, n_p - s)
        sc = torch.matmul(q.unsqueeze(0), kp[s:s + step])  # [p, G, R K, L]
        m = torch.maximum(sc.amax(-1), ss.unsqueeze(0))
        e = torch.exp(sc - m.unsqueeze(-1))
        es = torch.exp(ss.unsqueeze(0) - m)  # [p, G, R K]
        z = 1.0 / (e.sum(-1) + es)
        a = (e * z.unsqueeze(-1)).view(p_n, heads, n_k, pos).permute(0, 2, 1, 3).reshape(p_n, n_k, heads * pos)
        own = (es * z).view(p_n, heads, n_k).permute(2, 0, 1)  # [K, p, H]
        r = torch.baddbmm(base.expand(p_n, n_k, d), a, vpp[s:s + step])
        r += torch.matmul(own, vpc).transpose(0, 1)
        t = torch.baddbmm(base_c.expand(p_n, n_k, n_m), a, vpm[s:s + step])
        t += torch.matmul(own, vcc).transpose(0, 1)
        yield r, t
