"""The second block's input of ``prefix + [c]`` for many prefixes and candidates at once, on the
incremental first block (an addition for speed, issue 18).

The exact decoder search tests every (live path, candidate) extension at the second block's
attention input: ``N_1(h)`` with ``h = r + MLP(N_2(r))`` and ``r = x + Attn(N_0(x))`` the residual
after the first block's attention at the appended position (``N_0``, ``N_2`` the first block's norms,
``N_1`` the second block's input norm). The model forward (``span.decoder_last_inputs``) recomputes,
for every path, the projections of the prefix tokens and of every candidate, and an attention over
the whole row (prefix and every candidate, under a 4-D mask). In a causal model the prefix's states
do not depend on what is appended, and in the first block a token's query, key and value depend on
(token, position) only: the incremental first block (``dec_block.PreLNDecoderBlock``,
``rope_block.RopeDecoderBlock``) already holds them per position, so per pair only the candidate's
attention over its prefix, the output projection, the feed-forward and the two norms remain. The
feed-forward runs in chunks of ``ROWS`` rows and each chunk is reduced to span distances at once.

The stage is built only when it reproduces the model's own second-block inputs on a probe
(``build``); otherwise the search uses the model forward. Deviation from the model's arithmetic:
float32 round-off of the attention (the model's softmax runs over the whole row with masked
entries, the query is scaled first); the search's decisions are unchanged (same token ids on the
development batches and in ``tests/textleak/test_dager_l2.py``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .dec_block import PreLNDecoderBlock
from .rope_block import RopeDecoderBlock
from .span import LayerInputs, decoder_last_inputs, find_tap, span_distance, transformer_blocks

ROWS = 2048  # (path, candidate) rows per feed-forward chunk


class Layer2Stage:
    """The incremental first block carried on to the second block's input (module docstring)."""

    def __init__(self, blk: PreLNDecoderBlock | RopeDecoderBlock, model: nn.Module) -> None:
        blocks = transformer_blocks(model)
        b0, b1 = blocks[0], blocks[1]
        self.blk = blk
        self.mlp = b0.mlp
        self.norm = b1.input_layernorm if isinstance(blk, RopeDecoderBlock) else b1.ln_1

    @classmethod
    def build(cls, model: nn.Module, li2: LayerInputs, probe_ids: Tensor, l1) -> Layer2Stage | None:
        """The stage when ``li2`` taps the second block's attention input and the stage reproduces the
        model's inputs there on the first candidates of the first four positions (prefixes of them,
        with other candidates), else None. ``probe_ids`` [1, n]: a forward that finds the first block's
        feed-forward input (``span.find_tap``)."""
        if not l1 or not l1[0][0]:
            return None
        probe = [l1[p][0][0] for p in range(min(4, len(l1)))]
        try:
            blocks = transformer_blocks(model)
            b1 = blocks[1]
            attn = getattr(b1, "self_attn", None) or getattr(b1, "attn", None)
            mods = [m for m in (getattr(attn, "q_proj", None), getattr(attn, "c_attn", None)) if m is not None]
            if li2.tap.first not in mods and li2.tap.first not in (getattr(attn, "k_proj", None),
                                                                 getattr(attn, "v_proj", None)):
                return None
            # the first block, built against its own feed-forward input (its build checks it on the probe)
            li = LayerInputs(model, find_tap(model, 0, probe_ids, group=2))
            blk = PreLNDecoderBlock.build(model, li, probe) or RopeDecoderBlock.build(model, li, probe)
            if blk is None:
                return None
            self = cls(blk, model)
        except (AttributeError, TypeError, ValueError, IndexError):
            return None
        vocab = int(blk.wte.shape[0])
        others = [(t * 7919 + 13) % vocab for t in range(5)]
        prefixes = [probe[:k] for k in range(len(probe))]
        cands = [[probe[k]] + others for k in range(len(probe))]
        try:
            want = decoder_last_inputs(li2, prefixes, cands)
            for p, c in enumerate(cands):
                blk.table(p, sorted(set(c)))
            for p, (pre, c) in enumerate(zip(prefixes, cands)):
                got = blk.extend([pre], p, c, finish=self.finish)[0].double().cpu()  # CPU float64 as want
                w = want[p]
                if got.shape != w.shape or not torch.allclose(got, w, rtol=1e-4, atol=1e-4 * float(w.abs().max())):
                    return None
        except (RuntimeError, TypeError, ValueError, KeyError):
            return None
        blk.tables.clear()
        return self

    @torch.no_grad()
    def finish(self, o: Tensor, x: Tensor) -> Tensor:
        """From the attention output ``o`` [p, K, d] and the residual ``x`` [K, d] to the second block's
        input [p, K, d]."""
        r = self.blk.residual(o, x)
        return self.norm(r + self.mlp(self.blk.ln2(r)))

    @torch.no_grad()
    def distances(self, prefixes: list[list[int]], pos: int, cands: list[int], basis: Tensor, *,
                  exact_below: float = 0.1) -> Tensor:
        """Span distances [P, K] (float64, as ``span.span_distance`` with ``exact_below``: exact where under
        it, float32 round-off above) of the second block's input of every ``prefix + [c]`` (every prefix of
        length ``pos``)."""
        tabs = self.blk.tables
        for j in range(pos):  # earlier positions: every prefix token in that position's table
            need = {p[j] for p in prefixes}
            if j not in tabs or not need <= tabs[j].row.keys():
                self.blk.table(j, sorted(need | set(tabs[j].ids if j in tabs else ())))
        if pos not in tabs or tabs[pos].ids != list(cands):
            self.blk.table(pos, list(cands))

        def reduce_(o: Tensor, x: Tensor) -> Tensor:
            p, k, d = o.shape
            flat = o.reshape(p * k, d)
            xs = x.repeat(p, 1) if p > 1 else x
            out = [span_distance(basis, self.finish(flat[s:s + ROWS], xs[s:s + ROWS]), exact_below=exact_below)
                   for s in range(0, p * k, ROWS)]
            return torch.cat(out).view(p, k)

        return self.blk.extend(prefixes, pos, cands, finish=reduce_)
