"""DAGER speed-ups for decoders at B=16 (issue 18): the rotary incremental first block against the
model's own feed-forward inputs, and the batched last-token terms against one backward per sentence."""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)
pytest.importorskip("transformers")

from .test_dager import _completion, _sentences, _setup  # noqa: E402


def _gqa_llama(seed: int = 0):
    """A 2-layer Llama with grouped-query attention (4 query heads, 2 key/value heads), random init."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, attn_implementation="eager")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = tf.LlamaForCausalLM(cfg)
    return model.eval()


def _check_rope_block(model, rows: list[list[int]]) -> None:
    from textleak.attacks.dager.rope_block import RopeDecoderBlock
    from textleak.attacks.dager.span import LayerInputs, decoder_last_inputs, find_tap

    tap = find_tap(model, 0, torch.tensor([[1, 2, 3]]), group=2)
    li = LayerInputs(model, tap)
    blk = RopeDecoderBlock.build(model, li, rows[0][:4])
    assert blk is not None
    n = len(rows)
    cands = sorted(set(range(200, 260)) | {r[5] for r in rows})
    for p in range(6):
        blk.table(p, sorted(set(cands) | {r[p] for r in rows}))
    prefixes = [r[:5] for r in rows]
    got = blk.extend(prefixes, 5, cands).double()
    want = torch.stack(decoder_last_inputs(li, prefixes, [cands] * n))
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    for p in (0, 2):  # position 0: the candidate attends to itself only
        got_p = blk.extend([r[:p] for r in rows], p, cands).double()
        want_p = torch.stack(decoder_last_inputs(li, [r[:p] for r in rows], [cands] * n))
        assert (got_p - want_p).abs().max() < 1e-5 * want_p.abs().max()


def test_rope_block_equals_model_forward_tiny_llama():
    """``RopeDecoderBlock.extend`` gives the tiny Llama's own feed-forward inputs of ``prefix + [c]``
    (float32 round-off) for many prefixes and candidates, positions 0, 2 and 5."""
    _, _, model, _, _, _, batch = _setup("text/tiny-llama/dager", 6)
    model.eval()
    ids = batch.inputs["input_ids"]
    _check_rope_block(model, [ids[i].tolist() for i in range(ids.shape[0])])


def test_rope_block_grouped_query_attention():
    """The same with grouped-query attention (2 query heads per key/value head, as SmolLM2's 3)."""
    model = _gqa_llama()
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(0, 300, (6, 8), generator=g).tolist()
    _check_rope_block(model, rows)


def test_rope_block_refused_for_gpt2():
    """No rotary block for a learned-position GPT-2 (its own block is ``PreLNDecoderBlock``)."""
    from textleak.attacks.dager.rope_block import RopeDecoderBlock
    from textleak.attacks.dager.span import LayerInputs, find_tap

    _, _, model, _, _, _, _ = _setup("text/tiny-gpt2/dager", 1)
    model.eval()
    li = LayerInputs(model, find_tap(model, 0, torch.tensor([[1, 2, 3]]), group=2))
    assert RopeDecoderBlock.build(model, li, [5, 6, 7]) is None


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_jacobian_vector_product_gives_each_terms_dot_product(name):
    """The early exit's bound rests on ``g . U_y = -g[y] . h - w_y . D``: the dot product of a
    candidate's exact term (one backward per candidate) with the residual equals the one from the
    single forward-mode product ``D``, for every sentence and candidate."""
    from textleak.attacks.dager import last_exit, last_token

    model, obs, batch, sents, out, key, (g, hs, _, graph) = _completion(name, 4)
    dvec = last_exit._jvp(model, graph, sents, g)
    cands = [[5, 17, 40, s[0]] for s in sents]  # s[0]: a token of the sentence itself
    ges = last_token._packed_terms(graph, out.weight, sents, cands)
    for i, s in enumerate(sents):
        for k, y in enumerate(cands[i]):
            _, rows = last_token._order(s, [y], hs[i], ges[i][k:k + 1], g, 1.0)
            exact = sum(float(g[r] @ v) for r, v in rows[0].items())
            via_d = float(-(g[y] @ hs[i]) - out.weight[y].detach().double() @ dvec[i])
            assert via_d == pytest.approx(exact, rel=1e-4, abs=1e-6 * float(g.norm()) * float(hs[i].norm()))


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_last_token_early_exit_is_certified_and_equal(name, monkeypatch):
    """The certified choice holds on the true prefixes (B=6) and returns exactly the full ranking and
    joint fit's tokens, which are the true last tokens."""
    from textleak.attacks.dager import last_token

    _, _, model, obs, _, truth, batch = _setup(f"text/{name}/dager", 6)
    model.eval()
    sents = _sentences(batch)
    got: list[bool] = []
    orig = last_token.certified_choice

    def spy(*a, **k):
        r = orig(*a, **k)
        got.append(r is not None)
        return r

    monkeypatch.setattr(last_token, "certified_choice", spy)
    fast = last_token.complete_last(obs, model, sents)
    full = last_token.complete_last(obs, model, sents, early_exit=False)
    assert got == [True]
    assert fast == full
    assert sum(a == b for a, b in zip(fast, truth["token_ids"])) >= 5


def _fold_case(case: str, build):
    """The folded-prefilter tests' set-up: a 3-sentence batch of ``case`` (an unsaturated span), its first block
    built by ``build(model, layer_inputs, first_ids)`` with tables for position 2's candidates (the true tokens and
    60 others), and the reference distances: ``(blk, prefixes, pos, cands, dist, rows, want, ref)`` with ``want``
    from the model's own feed-forward inputs and ``ref`` from ``blk.extend`` + ``ComplementDistance``."""
    from textleak.attacks.dager import frontier
    from textleak.attacks.dager.dec_block import ComplementDistance
    from textleak.attacks.dager.span import decoder_last_inputs, span_distance

    _, _, model, obs, _, _, batch = _setup(case, 3)  # (an unsaturated span: 3 x 12 tokens < 64)
    model.eval()
    li, sp = frontier.ffn_inputs(obs, model, torch.tensor([[1, 2, 3]]), 0.0)
    ids = batch.inputs["input_ids"]
    blk = build(model, li, ids[0, :4].tolist())
    assert blk is not None
    rows = [ids[i].tolist() for i in range(3)]
    pos = 2
    assert 3 * blk.h * (pos + 1) <= blk.d  # the folded path, not the fallback
    cands = sorted(set(range(200, 260)) | {r[pos] for r in rows})
    for p in range(pos + 1):
        blk.table(p, sorted(set(cands) | {r[p] for r in rows}))
    prefixes = [r[:pos] for r in rows]
    dist = ComplementDistance(sp.basis)
    want_x = torch.stack(decoder_last_inputs(li, prefixes, [cands] * 3))
    want = span_distance(sp.basis, want_x.reshape(-1, want_x.shape[-1]), exact_below=1.01).view(3, -1)
    ref = blk.extend(prefixes, pos, cands, reduce=dist)
    return blk, prefixes, pos, cands, dist, rows, want, ref


def test_folded_feed_forward_distances_equal_model_forward(monkeypatch):
    """``PreLNDecoderBlock.ffn_distances`` (output projection and complement folded into the values) gives
    the span distances of the model's own feed-forward inputs (as ``extend`` + ``ComplementDistance``):
    true extensions near 0, every distance within float32 round-off; without calling ``extend``."""
    from textleak.attacks.dager.dec_block import PreLNDecoderBlock

    blk, prefixes, pos, cands, dist, rows, want, ref = _fold_case("text/tiny-gpt2/dager", PreLNDecoderBlock.build)

    def no_extend(*a, **k):
        raise AssertionError("fell back to extend")

    monkeypatch.setattr(blk, "extend", no_extend)
    got = blk.ffn_distances(prefixes, pos, cands, dist)
    assert got.shape == (3, len(cands)) and got.dtype == torch.float64
    assert (got - want).abs().max() < 1e-5 and (got - ref).abs().max() < 1e-5
    true = torch.tensor([got[i, cands.index(r[pos])] for i, r in enumerate(rows)])
    assert float(true.max()) < 1e-3 and float(got.median()) > 0.05  # the prefilter's gate separates them
