"""Text kit: offline assets, sampling, scoring and clear errors."""
from dataclasses import replace

import pytest
import torch
from torch import nn

from common.seed import make_generator
from common.types import Reconstruction
from textleak.cases import CASES
from textleak.kit import TextKit
from textleak.models import embedding_param_name, gpt2_tokenizer, input_embedding, load_text_model


def test_gpt2_tokenizer_matches_real_gpt2_ids():
    tok = gpt2_tokenizer()
    assert len(tok) == 50257
    assert tok("Hello world")["input_ids"] == [15496, 995]


def test_rotten_tomatoes_pool():
    pytest.importorskip("datasets")
    import importlib.util

    if importlib.util.find_spec("gensim") is None:
        pytest.skip("gensim wheel (data file) not installed")
    from textleak.data import rotten_tomatoes

    ds = rotten_tomatoes()
    assert len(ds) == 200 and sum(ds["label"]) == 100
    assert all(isinstance(t, str) and t for t in ds["text"])


def test_sample_and_score_with_hungarian_alignment():
    kit = TextKit()
    case = CASES["text/tiny-gpt2/fedsgd"].with_batch_size(3)
    model = kit.load_model(case, device=torch.device("cpu"), generator=make_generator(0))
    pool = kit.load_pool(case, data_path=None)
    batch, truth = kit.sample(pool, case, model=model, device=torch.device("cpu"), generator=make_generator(1))
    assert batch.labels is None  # a causal LM's tokens are never sent as labels
    assert batch.meta["seq_lens"] == [len(t) for t in truth["token_ids"]]
    m, how = kit.score(Reconstruction(data=list(reversed(truth["sentences"]))), truth, case=case)
    assert m["rouge1"] == 1.0 and m["exact_match"] == 1.0 and how.startswith("hungarian")
    m2, _ = kit.score(Reconstruction(data=["completely unrelated words"] * 3), truth, case=case)
    assert m2["rouge1"] < 0.3
    per = kit.loss_fn(model, batch)
    assert per.shape == (3,) and bool(torch.isfinite(per).all())


def test_embedding_found_by_identity():
    m = load_text_model("tiny-llama", generator=make_generator(0))
    name = embedding_param_name(m)
    assert dict(m.named_parameters())[name] is input_embedding(m).weight


def test_bad_model_id_is_a_one_line_error():
    with pytest.raises(ValueError, match="neither a kit model") as e:
        load_text_model("no-such-org/no-such-model-xyz", generator=make_generator(0))
    assert "\n" not in str(e.value)


def test_model_without_input_embeddings_is_rejected():
    class NoEmb(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def get_input_embeddings(self):
            return None

    with pytest.raises(ValueError, match="no token input embeddings"):
        input_embedding(NoEmb())


def test_sequence_longer_than_model_max_is_rejected(tmp_path):
    p = tmp_path / "long.txt"
    p.write_text(" ".join(["word"] * 200) + "\n", encoding="utf-8")
    kit = TextKit()
    case = replace(CASES["text/tiny-gpt2/fedsgd"], options={})  # tiny GPT-2 accepts 128 positions
    model = kit.load_model(case, device=torch.device("cpu"), generator=make_generator(0))
    pool = kit.load_pool(case, data_path=str(p))
    with pytest.raises(ValueError, match="accepts at most 128"):
        kit.sample(pool, case, model=model, device=torch.device("cpu"), generator=make_generator(1))


def test_missing_data_file():
    with pytest.raises(FileNotFoundError):
        TextKit().load_pool(CASES["text/tiny-gpt2/fedsgd"], data_path="/nonexistent/file.txt")


def test_attack_needs_sequence_lengths():
    from common.fl import client_update
    from common.observe import observe
    from common.threat import HONEST
    from textleak.attacks.tag import TAG

    kit = TextKit()
    case = replace(CASES["text/tiny-gpt2/fedsgd"], threat=HONEST)
    model = kit.load_model(case, device=torch.device("cpu"), generator=make_generator(0))
    batch, _ = kit.sample(kit.load_pool(case, data_path=None), case, model=model, device=torch.device("cpu"),
                          generator=make_generator(1))
    obs = observe(client_update(model, batch, kit.loss_fn, case.protocol, generator=make_generator(2)), case.threat)
    with pytest.raises(ValueError, match="SEQUENCE_LENGTHS"):
        TAG().reconstruct(obs, model, kit.make_prior(case, model, "text", device="cpu"), generator=make_generator(0))
