"""DAGER's encoder search, session 21 (issue 18): the cuts of a beam's sentence at the shorter candidate lengths
(``enc_cuts.harvest``, ``encoder.HARVEST``), on a real MiniLM FedSGD batch."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from .test_dager import _setup  # noqa: E402


def test_cut_of_a_beam_that_followed_a_shorter_sentence():
    """MiniLM (pretrained, B=4, FedSGD): a sentence of the longest true length whose first tokens are those of a
    shorter true sentence (what a failed beam returns on the development batches) gives, cut at every shorter length,
    exactly that sentence and nothing else, with or without the separator-row screen; the screen's row equals the
    model's layer-2 input at the separator to float32 round-off; sentences already found are skipped."""
    from textleak.attacks.dager import DAGER
    from textleak.attacks.dager.block import PostLNBlock
    from textleak.attacks.dager.enc_cuts import harvest, sep_rows
    from textleak.attacks.dager.span import LayerInputs

    model, obs, prior, truth = _setup("text/minilm-bert/dager", 4)[2:6]
    tok = prior.tokenizer
    sep, pad = tok.sep_token_id, tok.pad_token_id
    sents = sorted(([int(x) for x in s if int(x) != pad] for s in truth["token_ids"]), key=len)
    probe = torch.arange(1000, 1024).unsqueeze(0)
    taps, spans, _ = DAGER().spans(obs, model, probe)
    li1, li2, span2 = LayerInputs(model, taps[0]), LayerInputs(model, taps[1]), spans[1]
    blk = PostLNBlock.build(model, li1, li2, probe)
    assert blk is not None
    tau2 = 1e-3  # the configured tau_2 (true sentences sit near 1e-6, wrong ones near 1e-1)
    long = sents[-1]
    lengths = list(range(2, len(long) + 1))  # every length: the separator passes layer 1 almost anywhere
    for t in sents[:-1]:
        if len(t) == len(long):
            continue
        src = t[:-1] + long[len(t) - 1:]  # a beam at the longest length that followed t
        assert len(src) == len(long) and src[-1] == sep
        row = sep_rows(blk, li1, t, [len(t) - 1], sep)[0]
        ref = li2(torch.tensor([t]))[0, -1]
        assert float((row - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
        for b in (blk, None):
            got = harvest(b, li1, li2, span2, tau2, [src], lengths, len(long), sep, lambda s: False)
            assert [s for s, _ in got] == [t] and got[0][1] < 1e-2 * tau2
        assert harvest(blk, li1, li2, span2, tau2, [src], lengths, len(long), sep, lambda s: s == t) == []
    # a cut is never longer than the beam: the longest sentence itself is not among its own cuts
    assert harvest(blk, li1, li2, span2, tau2, [long], lengths, len(long), sep, lambda s: False) == []
