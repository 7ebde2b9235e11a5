"""DAGER past its rank limit: the incremental GPT-2 first block, the batch token set and first tokens read
from the embedding updates, and the best-effort search that uses them (issue 20)."""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)
pytest.importorskip("transformers")

from .test_dager import _attack, _setup  # noqa: E402


def test_incremental_decoder_block_equals_model_forward():
    """``PreLNDecoderBlock.extend`` gives the model's own feed-forward inputs of ``prefix + [c]`` for
    many prefixes and candidates (float32 round-off), and ``ComplementDistance`` the same span distance
    as ``span_distance``."""
    from textleak.attacks.dager import frontier
    from textleak.attacks.dager.dec_block import ComplementDistance, PreLNDecoderBlock
    from textleak.attacks.dager.span import decoder_last_inputs, span_distance

    _, _, model, obs, _, _, batch = _setup("text/tiny-gpt2/dager", 8)
    model.eval()
    li, sp = frontier.ffn_inputs(obs, model, torch.tensor([[1, 2, 3]]), 0.0)
    ids = batch.inputs["input_ids"]
    blk = PreLNDecoderBlock.build(model, li, ids[0, :4].tolist())
    assert blk is not None
    rows = [ids[i].tolist() for i in range(8)]
    cands = sorted(set(range(200, 260)) | {r[5] for r in rows})
    for p in range(6):
        blk.table(p, sorted(set(cands) | {r[p] for r in rows}))
    prefixes = [r[:5] for r in rows]
    got = blk.extend(prefixes, 5, cands).double()
    want = torch.stack(decoder_last_inputs(li, prefixes, [cands] * 8))
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    dist = ComplementDistance(sp.basis)
    d_fast = blk.extend(prefixes, 5, cands, reduce=dist)
    d_ref = span_distance(sp.basis, want.reshape(-1, want.shape[-1]), exact_below=1.01).view(8, -1)
    assert d_fast.shape == (8, len(cands)) and (d_fast - d_ref).abs().max() < 1e-5
    root = blk.extend([[]] * 3, 0, cands)  # position 0: the candidate attends to itself only
    want0 = decoder_last_inputs(li, [[]], [cands])[0]
    assert (root[1].double() - want0).abs().max() < 1e-5 * want0.abs().max()


def test_batch_token_set_and_first_tokens_from_the_embedding_updates():
    """Past the rank limit (tiny GPT-2, 81 tokens in width 64) the tied word-embedding update still
    names the batch's distinct tokens exactly (norm gap), and the pursuit over the position-0 row finds
    every sentence's first token."""
    from textleak.attacks.dager import frontier

    _, _, model, obs, _, truth, _ = _setup("text/tiny-gpt2/dager", 8)
    tids = [list(map(int, t)) for t in truth["token_ids"]]
    want = sorted({t for s in tids for t in s})
    assert frontier.batch_token_set(obs, model) == want
    firsts = frontier.first_tokens(obs, model, want, 8)
    assert {s[0] for s in tids} <= set(firsts) and len(firsts) <= 8


def test_token_set_search_past_the_rank_limit_recovers_first_tokens():
    """With the token set and first tokens (both layers saturated), the best-effort search on the
    incremental block returns B sentences, none certified, with at least 6 of the 8 true first
    tokens and part of the text (ROUGE-1 >= 0.25); without the token set's first tokens the beam
    collapsed onto one sentence's variants (2 distinct first tokens)."""
    kit, case, model, obs, prior, truth, _ = _setup("text/tiny-gpt2/dager", 8)
    rec = _attack(obs, model, prior, on_failure="raise")
    assert rec.stats["token_set"] == 68.0 and rec.stats["fast_decoder_block"] == 1.0
    assert rec.extras["certified"] == [False] * 8 and all(rec.data)
    got = [t[0] for t in rec.extras["token_ids"] if t]
    want = [int(t[0]) for t in truth["token_ids"]]
    assert sum(min(got.count(t), want.count(t)) for t in set(want)) >= 6, (rec.data, truth["sentences"])
    metrics, _ = kit.score(rec, truth, case=case)
    assert metrics["rouge1"] >= 0.25, (rec.data, truth["sentences"])


def test_feed_forward_activation_span_is_exact_past_the_rank_limit_once_prefixes_are_peeled():
    """Tiny GPT-2 at B=8 (81 tokens in width 64): the first block's ``mlp.c_proj`` update [256, 64] is
    saturated (rank 64), so the activation's distance to its column space alone does not separate true
    extensions from wrong ones; with the true activations of positions < 3 peeled off (``ffn_span``:
    fewer than 64 tokens missing) every true extension at positions 3 and 4 lies in the span to float32
    round-off and every wrong batch token at the true prefix lies far outside (the exact test again)."""
    from textleak.attacks.dager.dec_block import PreLNDecoderBlock
    from textleak.attacks.dager.ffn_span import ActivationSpan

    _, _, model, obs, _, truth, _ = _setup("text/tiny-gpt2/dager", 8)
    model.eval()
    tids = [list(map(int, t)) for t in truth["token_ids"]]
    assert sum(len(s) for s in tids) > 64
    aspan = ActivationSpan.build(obs, model)
    assert aspan is not None
    assert torch.linalg.matrix_rank(aspan.g.float()) >= 63  # saturated: only 64 columns
    blk = PreLNDecoderBlock(model)
    toks = sorted({t for s in tids for t in s})
    for p in range(5):
        blk.table(p, toks)

    def act(pre: list[int], cands: list[int]) -> torch.Tensor:
        return aspan.activations(blk.extend([pre], len(pre), cands)[0])

    def split(p: int) -> tuple[float, float]:
        true_d, wrong_d = [], []
        for s in tids:
            if p >= len(s) - 1:  # the last token has no gradient (it predicts padding)
                continue
            wrong = [t for t in toks if t not in {x[p] for x in tids if x[:p] == s[:p] and len(x) > p}]
            true_d.append(float(aspan.distance(act(s[:p], [s[p]]))[0]))
            wrong_d.append(float(aspan.distance(act(s[:p], wrong)).min()))
        return max(true_d), min(wrong_d)

    t_alone, w_alone = split(3)
    assert t_alone > 1e-2 and w_alone < 10 * t_alone  # col(G) alone: no exact separation
    for s in tids:  # peel the true prefixes of positions < 3
        for p in range(min(3, len(s) - 1)):
            aspan.add(tuple(s[: p + 1]), act(s[:p], [s[p]])[0])
    aspan.refresh(force=True)
    assert not aspan.saturated and aspan.res_rank < 60
    for p in (3, 4):
        t_max, w_min = split(p)
        assert t_max < 1e-4 and w_min > 1e-2, (p, t_max, w_min)


def test_token_set_search_runs_exact_once_enough_true_prefixes_are_peeled(monkeypatch):
    """The search's exact stage end to end (tiny GPT-2, B=8, both layers saturated): seeded with the true
    activations of positions < 3 (an oracle standing in for the prefixes a search has accepted), the
    activation span is exact from the root on, and the beam, accepting only extensions under its
    threshold, recovers every sentence exactly (the last token by the last-token completion); the same
    search without the activation span (the ranked beam alone) reaches far less."""
    from textleak.attacks.dager import frontier
    from textleak.attacks.dager.dec_block import PreLNDecoderBlock
    from textleak.attacks.dager.ffn_span import ActivationSpan, learn

    kit, case, model, obs, prior, truth, _ = _setup("text/tiny-gpt2/dager", 8)
    model.eval()
    tids = [list(map(int, t)) for t in truth["token_ids"]]

    def seeded(o, m):
        aspan = ActivationSpan.build(o, m)
        blk = PreLNDecoderBlock(m)
        toks = sorted({t for s in tids for t in s})
        for p in range(3):
            blk.table(p, toks)
        learn(aspan, blk, {tuple(s[: p + 1]) for s in tids for p in range(min(3, len(s) - 1))})
        aspan.refresh(force=True)
        assert aspan.exact
        return aspan

    base = _attack(obs, model, prior, on_failure="raise")
    monkeypatch.setattr(frontier, "activation_span", seeded)
    rec = _attack(obs, model, prior, on_failure="raise")
    assert rec.stats["ffn_span_exact_from"] == 0.0
    got = set(rec.data)
    assert sum(s in got for s in truth["sentences"]) >= 7, (rec.data, truth["sentences"])
    m_exact, _ = kit.score(rec, truth, case=case)
    m_base, _ = kit.score(base, truth, case=case)
    assert m_exact["rouge1"] >= 0.9 and m_base["rouge1"] < 0.5, (m_exact["rouge1"], m_base["rouge1"])


def test_deep_rerank_tap_ranks_true_extensions_first_more_often_than_layer_2(monkeypatch):
    """The token-set search can rerank its shortlist at a deeper block's feed-forward input
    (``deep_rerank.deep_inputs`` with ``FRONTIER_RERANK_TAP = (3, 2)``; on the 2-block tiny GPT-2 the last block's
    ``mlp.c_fc``). On the true prefixes of the tiny GPT-2 past its rank limit (B=8), over the whole batch token
    set, the true next token is the nearest at that span at 33 of 65 steps, against 24 at layer 2."""
    from textleak.attacks.dager import deep_rerank, frontier
    from textleak.attacks.dager.span import decoder_last_inputs, span_distance

    _, _, model, obs, _, truth, _ = _setup("text/tiny-gpt2/dager", 8)
    model.eval()
    probe = torch.tensor([[1, 2, 3]])
    tok = frontier.batch_token_set(obs, model)
    monkeypatch.setattr(deep_rerank, "FRONTIER_RERANK_TAP", (3, 2))
    deep = deep_rerank.deep_inputs(obs, model, probe)
    assert deep is not None and deep[0].tap.names == ["transformer.h.1.mlp.c_fc.weight"]
    monkeypatch.setattr(deep_rerank, "FRONTIER_RERANK_TAP", (1, 0))  # layer 2 (the second block's attention input)
    layer2 = deep_rerank.deep_inputs(obs, model, probe)
    assert layer2 is not None and layer2[0].tap.names[0].startswith("transformer.h.1.attn.c_attn")

    def first(test) -> int:
        li, sp = test
        hits = 0
        for x in (list(map(int, t)) for t in truth["token_ids"]):
            for p in range(1, len(x) - 1):  # (the last token is unobservable)
                d = span_distance(sp.basis, decoder_last_inputs(li, [x[:p]], [tok])[0].double(), exact_below=1.01)
                hits += int(tok[int(d.argmin())] == x[p])
        return hits

    got_deep, got_l2 = first(deep), first(layer2)
    assert got_deep >= 30 and got_deep >= got_l2 + 6, (got_deep, got_l2)


def test_gapless_saturation_is_detected_where_numpys_rank_rule_hides_it():
    """A smooth spectrum that reaches the width (a pretrained model's layer 2 past its rank, SmolLM2 B=32: no
    drop to round-off) is called saturated although NumPy's rank rule cuts it far below the width; a span whose
    weak directions are float32 round-off (the exact regime) is not."""
    from textleak.attacks.dager.frontier_rope import gapless_saturated
    from textleak.attacks.dager.span import span_of

    g = torch.Generator().manual_seed(0)
    d, m = 96, 960
    u = torch.linalg.qr(torch.randn(m, d, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    smooth = torch.logspace(0, -5.2, d, dtype=torch.float64)  # no gap: s_k / s_0 from 1 to 6e-6
    sp = span_of(u @ torch.diag(smooth) @ v.t())
    assert sp.rank <= d - 9  # NumPy's rule (s_0 * max(m, d) * eps) cuts it: the reference's test misses it
    assert gapless_saturated(sp, 9)
    exact = torch.cat([torch.logspace(0, -4, 60, dtype=torch.float64), torch.full((d - 60,), 1e-10, dtype=torch.float64)])
    sp2 = span_of(u @ torch.diag(exact) @ v.t())
    assert sp2.rank == 60 and not gapless_saturated(sp2, 9)


def test_rotary_ranked_search_bans_repeats_past_the_second_layers_rank(monkeypatch):
    """Tiny Llama (rotary, width 64) at B=8 (66 predicting tokens, 58 distinct): layer 2 saturates, layer 1's exact
    lists hold, and the ranked search runs on the rotary incremental block. Rotary values carry no position, so
    repeating the path's last token, or a bigram it already holds, reproduces an accepted input and passes
    (``frontier_rope.RunGuard`` bans them): with the guard ROUGE-1 >= 0.6 and no immediate repeats, without it
    the beam fills with runs ("the the the ...", ROUGE-1 about 0.2)."""
    from textleak.attacks.dager import frontier_rope

    kit, case, model, obs, prior, truth, _ = _setup("text/tiny-llama/dager", 8, seed=1)
    rec = _attack(obs, model, prior, on_failure="raise")
    assert rec.stats["saturated_l2"] == 1.0 and not rec.stats.get("saturated_l1")
    assert rec.stats["fast_decoder_block"] == 1.0
    ids = [t for t in rec.extras["token_ids"] if t]
    # certify.py: only sentences recovered exactly are certified (test_dager_certify_dec.py)
    assert all(c <= (t in truth["token_ids"]) for c, t in zip(rec.extras["certified"], rec.extras["token_ids"]))
    assert len(ids) == 8 and not any(a == b for t in ids for a, b in zip(t[:-2], t[1:-1]))  # (the completed last token aside)
    guarded = kit.score(rec, truth, case=case)[0]["rouge1"]
    assert guarded >= 0.6, (rec.data, truth["sentences"])
    monkeypatch.setattr(frontier_rope, "NO_REPEAT", False)
    plain = kit.score(_attack(obs, model, prior, on_failure="raise"), truth, case=case)[0]["rouge1"]
    assert plain < guarded - 0.2
