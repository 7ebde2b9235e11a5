"""LAMP's memory (issue 18): the sentence pool is held without importing ``datasets`` (~85 MB RSS)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest


def _need_data():
    if importlib.util.find_spec("gensim") is None:
        pytest.skip("gensim wheel (data file) not installed")


def test_pool_loads_without_datasets_and_matches_the_file():
    _need_data()
    code = ("import sys\nfrom textleak.data import load_sentences, rotten_tomatoes_path\n"
            "ds = load_sentences('rotten-tomatoes')\n"
            "assert 'datasets' not in sys.modules and 'pyarrow' not in sys.modules, sorted(sys.modules)\n"
            "lines = [l.strip() for l in rotten_tomatoes_path().read_bytes().decode('cp1252').splitlines() if l.strip()]\n"
            "assert [r['text'] for r in ds] == ds['text'] == [l.partition(' ')[2].strip() for l in lines]\n"
            "assert ds['label'] == [int(l.startswith('__label__pos')) for l in lines]\n"
            "assert len(ds) == 200 and sum(ds['label']) == 100 and ds[5] == {'text': ds['text'][5], 'label': 0}\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_text_file_rows(tmp_path):
    from textleak.data import text_file

    p = tmp_path / "s.txt"
    p.write_text("  first one \n\nsecond\r\nthird\n", encoding="utf-8")
    ds = text_file(p)
    assert ds["text"] == ["first one", "second", "third"] and ds["label"] == [0, 0, 0]
    assert list(ds)[1] == {"text": "second", "label": 0} and len(ds) == 3
    with pytest.raises(KeyError):
        ds["speaker"]


def test_streamed_head_forms_at_most_max_rows_and_matches_the_full_cross_entropy():
    import torch

    from common.seed import make_generator
    from textleak.prior import _streamed_ce

    g = make_generator(0)
    vocab, d = 5000, 24
    w = torch.randn(vocab, d, generator=g)
    h = torch.randn(3, d, generator=g)  # few states: without the cap one block would be the whole head
    tgt = torch.tensor([7, 4999, 1234, 2048, 0])
    owner = torch.tensor([0, 0, 1, 2, 2])
    sizes = []

    def rows(s: int, e: int):
        sizes.append(e - s)
        return w[s:e]

    got = _streamed_ce(h, tgt, rows, vocab, owner=owner, max_rows=1024)
    ref = torch.nn.functional.cross_entropy(h[owner] @ w.T, tgt, reduction="none")
    assert max(sizes) == 1024 and sum(sizes) == vocab
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)
    sizes.clear()
    uncapped = _streamed_ce(h, tgt, rows, vocab, owner=owner, max_rows=vocab)
    assert sizes == [vocab] and torch.allclose(uncapped, ref, atol=1e-5, rtol=0)


def test_text_prior_embedding_is_a_read_only_view_of_the_model():
    """The text prior's embedding matrix shares the model's storage (a copy cost ~47 MB for MiniLM and made the model's
    mapped embedding pages resident; issue 18), and a LAMP/TAG run leaves it, and so the model, unchanged."""
    import torch

    from eval.catalog import catalog
    from eval.pipeline import Resources, TrialSpec, make_kit, prepare, prepare_trial
    from textleak.models import input_embedding

    case = catalog().cases.get("text/tiny-bert/fedsgd")
    p = prepare(TrialSpec(case, "lamp-cos", seed=0, overrides={"n_steps": "4", "init_candidates": "4",
                                                                "init_permutations": "4", "use_swaps": "false"}))
    t = prepare_trial(p, make_kit("text"), Resources(), device=torch.device("cpu"))
    model, prior = t.attacker.model, t.attacker.prior
    weight = input_embedding(model).weight
    assert prior.embedding.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
    assert not prior.embedding.requires_grad
    before = weight.detach().clone()
    from common.seed import make_generator

    rec = p.attack.reconstruct(t.attacker.observation, model, prior, generator=make_generator(0))
    assert len(rec.data) == 1 and rec.data[0]
    assert torch.equal(weight.detach(), before)
