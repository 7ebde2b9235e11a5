"""Cuts of an encoder beam's sentences at the shorter candidate lengths (issue 18, ``encoder.HARVEST``; an addition
to the reference).

A beam at length L that finds nothing has, on the development MiniLM batches, mostly followed the prefix of another
sentence still missing, token for token over 12-40 positions (seed 2 at B=8: of 21 failed beams 9 held, in their
first beam or their repaired sentence, the exact prefix of a shorter missing sentence). When that sentence is
shorter (L' < L), the cut ``s[:L' - 1] + [sep]`` is that sentence. Every cut at a candidate length (a position where
the separator passes layer 1) is screened by the layer-2 distance of its last row alone, the separator's, on the
incremental first block (a sentence is accepted only when every row passes, so the screen never drops one that the
full test accepts; float32 round-off is covered by ``SCREEN_SLACK``); the few that pass get the search's own test
(``beam.score_seqs``: every row through the model's forward). A cut is thus accepted by exactly the test a beam's
sentence is: what changes is when a sentence is found, not which.
"""
from __future__ import annotations

import torch

from .beam import score_seqs
from .block import PostLNBlock
from .span import LayerInputs, Span, model_device, span_distance

#: a cut goes to the full test when its separator row's distance is below this times tau_2 (the screen's float32
#: block against the model's forward: ~1e-6 relative; true sentences sit near 1e-6 absolute)
SCREEN_SLACK = 2.0


def separator_lengths(l1, sep: int | None) -> list[int]:
    """The sentence lengths at which the separator passes layer 1 (its position, from 1, plus one), ascending:
    the candidate lengths of the encoder search (``encoder._EncoderSearch._lengths`` orders them) and of its cuts."""
    return [p + 1 for p, (c, _) in enumerate(l1) if sep is not None and p > 0 and sep in c]


@torch.no_grad()
def sep_rows(blk: PostLNBlock, li1: LayerInputs, seq: list[int], ends: list[int], sep: int) -> torch.Tensor:
    """Layer-2 inputs [len(ends), d] of the separator row of each cut ``seq[:e] + [sep]`` (``e`` in ``ends``, the
    separator's position), on the incremental block: its query against the keys of ``seq[:e]`` and its own."""
    dev = model_device(blk.q)
    x = li1(torch.tensor([seq], device=dev))[0]  # [L, d] (layer-1 inputs are position-local)
    pos = torch.tensor(ends, device=dev).view(-1, 1)
    xs = li1(torch.full_like(pos, sep), position_ids=pos)[:, 0]  # [k, d]: the separator at each end
    r, rs = blk.rows(x, ov=False), blk.rows(xs, ov=False)
    lg = torch.einsum("khd,jhd->khj", rs.q, r.k) * blk.scale  # [k, H, L]
    cut = torch.arange(x.shape[0], device=dev).view(1, 1, -1) >= pos.view(-1, 1, 1)
    lg = lg.masked_fill(cut, -torch.inf)
    own = (rs.q * rs.k).sum(-1, keepdim=True) * blk.scale  # [k, H, 1]
    w = torch.softmax(torch.cat([lg, own], -1), -1)
    a = torch.einsum("khj,jhd->khd", w[..., :-1], r.v) + w[..., -1:] * rs.v  # [k, H, dh]
    return blk._tail(a.flatten(-2), xs)


def harvest(blk: PostLNBlock | None, li1: LayerInputs | None, li2: LayerInputs, span2: Span, tau2: float,
            src: list[list[int]], lengths: list[int], length: int, sep: int, skip) -> list[tuple[list[int], float]]:
    """The cuts of ``src`` (sentences of ``length``) at the shorter ``lengths`` whose max layer-2 distance is below
    ``tau2``, with that distance (``score_seqs``); ``skip(seq)``: True for sentences already found or peeled.
    Without the incremental block every cut gets the full test."""
    ns = sorted({n for n in lengths if 2 <= n < length})
    cuts: list[list[int]] = []
    for s in src:
        if len(s) != length or not ns:
            continue
        mine = [s[:n - 1] + [sep] for n in ns]
        if blk is not None and li1 is not None:  # the screen: the separator row alone
            d = span_distance(span2.basis, sep_rows(blk, li1, s, [n - 1 for n in ns], sep))
            mine = [c for c, v in zip(mine, d.tolist()) if v < SCREEN_SLACK * tau2]
        cuts += [c for c in mine if c not in cuts and not skip(c)]
    out = []
    for c in cuts:
        _, mx = score_seqs(li2, span2, [c])
        if float(mx[0]) < tau2:
            out.append((c, float(mx[0])))
    return out
