"""Incremental evaluation of a post-LN (BERT-family) encoder's first block for DAGER's encoder search.

The encoder beam scores, at every step, many sequences that differ from a shared base in one
position only (``prefix + [candidate] + suffix``; a single-token repair of a sentence). Running the
model on each of them costs a full first block over every position. Here the block is evaluated from
its inputs (the embedding LayerNorm output, position-local) directly:

* keys and values of the base are computed once per base and reused by every candidate; the
  candidate adds one key/value column, folded into the softmax by rescaling the base's partial sums
  (``Z = sum exp(l - M)``, ``S = sum exp(l - M) v``), so a candidate costs one query row per position;
* only the query positions that are scored go through the output projection and the feed-forward
  (a beam step scores the prefix, not the suffix).

:meth:`PostLNBlock.rows` / :meth:`PostLNBlock.vary_rows` (issue 18) do the same from per-position
tables: queries, keys and values are position-local, so a candidate's are projected once per position
(``beam.beam`` builds the tables once per length) and every base gathers its rows instead of
projecting them at every step; at the query positions other than the varied one the attention output
is a convex combination, head by head, of the base's output and the candidate's value, so the output
projection is applied to each once (not once per candidate and position). Only the feed-forward of the
scored rows remains per candidate (about 8 d^2 of the 9 d^2 multiply-adds per scored row).

Same arithmetic as the Hugging Face layer (``BertLayer``: self-attention, output dense + residual
LayerNorm, GELU feed-forward + residual LayerNorm); :meth:`PostLNBlock.build` returns None unless the
result matches the model's own layer-2 inputs on a probe sentence, so other architectures fall back
to the generic model forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .span import LayerInputs, model_device, transformer_blocks


@dataclass(frozen=True)
class Rows:
    """Position-local projections of layer-1 input rows ``x`` [..., d] (``PostLNBlock.rows``): queries,
    keys and values [..., H, dh], and ``ov`` [..., H, d], each head's value through its slice of the
    attention output projection (no bias), or None where not needed (a base's rows)."""
    x: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    ov: Tensor | None = None

    def take(self, idx: Tensor) -> Rows:
        """Rows at ``idx`` along the leading dimension (any index shape)."""
        return Rows(self.x[idx], self.q[idx], self.k[idx], self.v[idx], None if self.ov is None else self.ov[idx])

    def expand(self, n: int) -> Rows:
        """A new leading dimension of size ``n`` (a view)."""
        return Rows(*(None if t is None else t.expand(n, *t.shape) for t in (self.x, self.q, self.k, self.v, self.ov)))


class PostLNBlock:
    """First block of a post-LN encoder: layer-1 inputs [.., L, d] -> layer-2 inputs."""

    def __init__(self, layer: nn.Module) -> None:
        sa, so = layer.attention.self, layer.attention.output
        self.q, self.k, self.v = sa.query, sa.key, sa.value
        self.h = int(sa.num_attention_heads)
        self.dh = int(sa.attention_head_size)
        self.scale = float(getattr(sa, "scaling", self.dh ** -0.5))
        self.out, self.ln1 = so.dense, so.LayerNorm
        self.ffn_in, self.act = layer.intermediate.dense, layer.intermediate.intermediate_act_fn
        self.ffn_out, self.ln2 = layer.output.dense, layer.output.LayerNorm
        if not all(isinstance(m, nn.Linear) for m in (self.q, self.k, self.v, self.out, self.ffn_in, self.ffn_out)):
            raise AttributeError("not a linear post-LN block")

    @classmethod
    def build(cls, model: nn.Module, li1: LayerInputs, li2: LayerInputs, probe: Tensor) -> PostLNBlock | None:
        """The fast block when it reproduces ``li2`` from ``li1`` on ``probe`` [1, L], else None."""
        if li1.tap.block_index != 0 or li2.tap.block_index != 1:
            return None
        try:
            fast = cls(transformer_blocks(model)[0])
        except AttributeError:
            return None
        probe = probe.to(model_device(model))
        with torch.no_grad():
            x1, x2 = li1(probe), li2(probe)
            if x1.shape != x2.shape:
                return None
            got = fast.forward(x1)
            q = x1.shape[1] // 2
            alt = fast.vary(x1, q, x1[:, q:q + 1], list(range(x1.shape[1])))[:, 0]
            r = fast.rows(x1)
            tab = fast.vary_rows(r, q, r.take((slice(None), slice(q, q + 1))), list(range(x1.shape[1])))[:, 0]
        tol = 1e-4 * float(x2.abs().max())
        if any((y - x2).abs().max() > tol for y in (got, alt, tab)):
            return None
        return fast

    def _heads(self, lin: nn.Linear, x: Tensor) -> Tensor:
        """[..., d] -> [..., H, dh]"""
        return lin(x).unflatten(-1, (self.h, self.dh))

    def _tail(self, a: Tensor, x1: Tensor) -> Tensor:
        """attention output (heads concatenated) and residual input -> layer-2 input"""
        h = self.ln1(self.out(a) + x1)
        return self.ln2(self.ffn_out(self.act(self.ffn_in(h))) + h)

    @torch.no_grad()
    def forward(self, x1: Tensor, queries: list[int] | None = None) -> Tensor:
        """[n, L, d] -> [n, nq, d] at the ``queries`` positions (all by default)."""
        idx = slice(None) if queries is None else torch.tensor(queries, device=x1.device)
        q = self._heads(self.q, x1[:, idx]).transpose(1, 2)  # [n, H, nq, dh]
        k = self._heads(self.k, x1).transpose(1, 2)
        v = self._heads(self.v, x1).transpose(1, 2)
        a = torch.softmax(q @ k.transpose(-1, -2) * self.scale, -1) @ v  # [n, H, nq, dh]
        return self._tail(a.transpose(1, 2).flatten(-2), x1[:, idx])

    @torch.no_grad()
    def vary(self, base: Tensor, pos: int, cand: Tensor, queries: list[int]) -> Tensor:
        """Layer-2 inputs of ``base`` [nb, L, d] with row ``pos`` replaced by each candidate row.

        ``cand`` is [m, d] (the same candidates for every base) or [nb, m, d]; returns
        [nb, m, nq, d] at the ``queries`` positions. The base's own row ``pos`` is ignored."""
        nb, L, d = base.shape
        if cand.dim() == 2:
            cand = cand.unsqueeze(0).expand(nb, -1, -1)
        m = cand.shape[1]
        kb = self._heads(self.k, base).transpose(1, 2)  # [nb, H, L, dh]
        vb = self._heads(self.v, base).transpose(1, 2)
        kc, vc = self._heads(self.k, cand), self._heads(self.v, cand)  # [nb, m, H, dh]
        out = torch.empty(nb, m, len(queries), self.h, self.dh, dtype=base.dtype, device=base.device)
        others = [i for i in queries if i != pos]
        if others:
            slot = [j for j, i in enumerate(queries) if i != pos]
            qi = self._heads(self.q, base[:, others]).transpose(1, 2)  # [nb, H, nI, dh]
            lf = qi @ kb.transpose(-1, -2) * self.scale  # [nb, H, nI, L]
            lf[..., pos] = -torch.inf
            mf = lf.amax(-1, keepdim=True)
            ef = torch.exp(lf - mf)
            zf, sf = ef.sum(-1), ef @ vb  # [nb, H, nI], [nb, H, nI, dh]
            lc = torch.einsum("bhid,bmhd->bhim", qi, kc) * self.scale  # [nb, H, nI, m]
            mx = torch.maximum(mf, lc)
            af, ac = torch.exp(mf - mx), torch.exp(lc - mx)
            num = sf.unsqueeze(3) * af.unsqueeze(-1) + ac.unsqueeze(-1) * vc.permute(0, 2, 1, 3).unsqueeze(2)
            o = num / (zf.unsqueeze(-1) * af + ac).unsqueeze(-1)  # [nb, H, nI, m, dh]
            out[:, :, slot] = o.permute(0, 3, 2, 1, 4)
        if pos in queries:
            qc = self._heads(self.q, cand)  # [nb, m, H, dh]
            lq = torch.einsum("bmhd,bhjd->bmhj", qc, kb) * self.scale  # [nb, m, H, L]
            lq[..., pos] = (qc * kc).sum(-1) * self.scale
            w = torch.softmax(lq, -1)
            own = w[..., pos].unsqueeze(-1) * vc
            w = w.clone()
            w[..., pos] = 0.0
            out[:, :, queries.index(pos)] = torch.einsum("bmhj,bhjd->bmhd", w, vb) + own
        resid = base[:, queries].unsqueeze(1).expand(nb, m, len(queries), d).clone()
        if pos in queries:
            resid[:, :, queries.index(pos)] = cand
        return self._tail(out.flatten(-2), resid)

    # -- the same arithmetic from per-position tables (issue 18) --------------------------------------
    @torch.no_grad()
    def rows(self, x: Tensor, *, ov: bool = True) -> Rows:
        """Queries, keys, values (and, with ``ov``, the head-wise projected values) of layer-1 input
        rows ``x`` [..., d]: position-local, so a candidate's are computed once per position and
        gathered by every base and every beam step that places it there."""
        v = self._heads(self.v, x)
        pov = torch.einsum("...hc,ehc->...he", v, self.out.weight.view(-1, self.h, self.dh)) if ov else None
        return Rows(x, self._heads(self.q, x), self._heads(self.k, x), v, pov)

    @torch.no_grad()
    def vary_rows(self, base: Rows, pos: int, cand: Rows, queries: list[int]) -> Tensor:
        """:meth:`vary` from projected rows: ``base`` [nb, L] and ``cand`` [nb, m] (with ``ov``) ->
        layer-2 inputs [nb, m, nq, d] at ``queries``.

        At a query position other than ``pos`` the attention output is a convex combination, head by
        head, of the base's output without ``pos`` (``alpha``) and the candidate's value (``beta``),
        and the output projection is linear, so it is applied to the base's outputs once and to the
        candidate's values once (``cand.ov``) instead of once per (candidate, position): the same
        value as :meth:`vary` to float round-off (tested against the model forward)."""
        nb, L, d = base.x.shape
        m = cand.x.shape[1]
        kb, vb = base.k.transpose(1, 2), base.v.transpose(1, 2)  # [nb, H, L, dh]
        others = [i for i in queries if i != pos]
        attn = resid = None  # attention-sublayer outputs and residual inputs [nb, m, n, d] (or broadcastable)
        if others:
            qi = base.q[:, others].transpose(1, 2)  # [nb, H, nI, dh]
            lf = qi @ kb.transpose(-1, -2) * self.scale  # [nb, H, nI, L]
            lf[..., pos] = -torch.inf
            mf = lf.amax(-1, keepdim=True)
            ef = torch.exp(lf - mf)
            zf = ef.sum(-1, keepdim=True)  # [nb, H, nI, 1]
            ob = (ef @ vb) / zf  # the base's attention outputs without pos [nb, H, nI, dh]
            pb = torch.einsum("bhic,ehc->bihe", ob, self.out.weight.view(d, self.h, self.dh))  # [nb, nI, H, d]
            lc = torch.einsum("bhid,bmhd->bhim", qi, cand.k) * self.scale  # [nb, H, nI, m]
            mx = torch.maximum(mf, lc)
            wf, wc = zf * torch.exp(mf - mx), torch.exp(lc - mx)
            den = wf + wc
            attn = (torch.einsum("bhim,bihe->bmie", wf / den, pb) + torch.einsum("bhim,bmhe->bmie", wc / den, cand.ov)
                    + self.out.bias)
            resid = base.x[:, others].unsqueeze(1)
        if pos in queries:
            qc, kc, vc = cand.q, cand.k, cand.v  # [nb, m, H, dh]
            lq = torch.einsum("bmhd,bhjd->bmhj", qc, kb) * self.scale  # [nb, m, H, L]
            lq[..., pos] = (qc * kc).sum(-1) * self.scale
            w = torch.softmax(lq, -1)
            own = w[..., pos].unsqueeze(-1) * vc
            w[..., pos] = 0.0
            a_p = self.out((torch.einsum("bmhj,bhjd->bmhd", w, vb) + own).flatten(-2)).unsqueeze(2)  # [nb, m, 1, d]
            if attn is None:
                attn, resid = a_p, cand.x.unsqueeze(2)
            else:  # the varied position among others: assemble in the order of queries
                j = queries.index(pos)
                attn = torch.cat([attn[:, :, :j], a_p, attn[:, :, j:]], 2)
                resid = torch.cat([resid.expand(nb, m, -1, d)[:, :, :j], cand.x.unsqueeze(2),
                                   resid.expand(nb, m, -1, d)[:, :, j:]], 2)
        h = self.ln1(attn + resid)
        return self.ln2(self.ffn_out(self.act(self.ffn_in(h))) + h)
