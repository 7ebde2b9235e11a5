"""Honest text audits (issue 22): every text audit also runs the ``text-prior`` baseline (public
sentences, never the update or the truth) on the same capture and compares ROUGE-1."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from eval.__main__ import main

CASE = "text/tiny-gpt2/dager"
#: the client's own sentences (not in the public Rotten Tomatoes pool)
CLIENT = ["my cat sleeps on the warm red sofa", "we sold the old boat last summer",
          "please send the quarterly tax forms today", "her brother plays jazz piano at night"]


@pytest.fixture(scope="module")
def tiny():
    from common.seed import make_generator
    from eval.catalog import catalog
    from textleak.kit import TextKit
    from textleak.models import info_of

    case = catalog().cases.get(CASE)
    kit = TextKit()
    model = kit.load_model(case, device=torch.device("cpu"), generator=make_generator(0))
    return case, kit, model, info_of(model).tokenizer


def _obs(b: int, seq_lens=None, tensors=None):
    from common.types import Observation

    return Observation(kind="gradient", tensors=tensors or {}, num_examples=b,
                       seq_lens=None if seq_lens is None else tuple(seq_lens))


def _baseline():
    from eval.catalog import catalog

    _, cls, overrides = catalog().resolve("text-prior")
    assert overrides == {}
    return cls()


def test_the_baseline_returns_b_pool_sentences_deterministically_and_never_reads_the_update(tiny):
    from common.seed import make_generator

    case, kit, model, tok = tiny
    prior = kit.make_prior(case, model, "text-pool", device="cpu")
    pool = set(prior.sentences)
    assert len(pool) >= 20 and all(n <= 12 for n in prior.lengths)  # the case's max_tokens
    base = _baseline()
    for b in (1, 3, 4):
        a = base.reconstruct(_obs(b), model, prior, generator=make_generator(7)).data
        assert len(a) == b and len(set(a)) == b and set(a) <= pool
        assert base.reconstruct(_obs(b), model, prior, generator=make_generator(7)).data == a
    draws = {tuple(base.reconstruct(_obs(4), model, prior, generator=make_generator(s)).data) for s in range(5)}
    assert len(draws) > 1  # the seed matters
    # the update is never read: any tensors give the same draw
    junk = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    assert base.reconstruct(_obs(4, tensors=junk), model, prior, generator=make_generator(3)).data == \
        base.reconstruct(_obs(4), model, prior, generator=make_generator(3)).data
    # granted lengths: one sentence per length, with that token count where the pool has one
    want = [4, 9, 12]
    got = base.reconstruct(_obs(3, seq_lens=want), model, prior, generator=make_generator(1)).data
    assert [len(tok(s)["input_ids"]) for s in got] == want


def test_without_a_pool_the_baseline_draws_random_vocabulary_tokens(tiny, tmp_path):
    from common.seed import make_generator

    case, kit, model, tok = tiny
    prior = kit.make_prior(replace(case, data=str(tmp_path / "absent.txt")), model, "text-pool", device="cpu")
    assert prior.sentences == ()
    base = _baseline()
    rec = base.reconstruct(_obs(3, seq_lens=[5, 8, 2]), model, prior, generator=make_generator(2))
    assert len(rec.data) == 3 and all(rec.data) and rec.stats["pool_size"] == 0.0
    assert rec.data == base.reconstruct(_obs(3, seq_lens=[5, 8, 2]), model, prior, generator=make_generator(2)).data
    ids = [tok(s, add_special_tokens=False)["input_ids"] for s in rec.data]
    assert all(abs(len(x) - n) <= 2 for x, n in zip(ids, [5, 8, 2])), ids  # re-tokenised: about the granted count


def _audit_client_update(model, enc, tmp_path) -> dict:
    """Capture the FedSGD update of ``model`` on the tokenised CLIENT batch ``enc``, audit it with
    DAGER from the CLI, and return the one record."""
    from common.types import Batch
    from eval.capture import write_capture
    from textleak.kit import text_loss

    batch = Batch({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, None, {})
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(text_loss(model, batch).mean(), list(model.parameters()))
    (tmp_path / "truth.txt").write_text("\n".join(CLIENT) + "\n")
    write_capture(tmp_path / "cap", round=1, client_id="c0", kind="gradient", num_examples=len(CLIENT),
                  before={n: p.detach() for n, p in model.named_parameters()}, update=dict(zip(names, grads)),
                  truth=tmp_path / "truth.txt")
    assert main(["audit", str(tmp_path / "cap"), "--attack", "dager", "--case", CASE,
                 "--out", str(tmp_path / "o")]) == 0
    (rec,) = [json.loads(x) for x in (tmp_path / "o" / "records.jsonl").read_text().splitlines()]
    return rec


def test_a_text_audit_records_the_prior_baseline_and_dager_leaks(tiny, tmp_path, capsys):
    from eval.audit_report import render

    _, _, model, tok = tiny
    enc = tok(CLIENT, padding=True, return_tensors="pt")
    rec = _audit_client_update(model, enc, tmp_path)
    assert "NOT better" not in capsys.readouterr().err
    assert rec["status"] == "ok", rec.get("error")
    assert rec["metrics"]["rouge1"] == 1.0
    b = rec["baseline"]
    assert b["preset"] == "text-prior" and b["metric"] == "rouge1" and b["verdict"] == "leaks"
    assert 0.0 <= b["value"] < 0.4 and b["metrics"]["exact_match"] == 0.0, b
    table = render([rec])
    assert "| client | attack | rouge1 | baseline | verdict | status |" in table
    assert f"| c0 | dager | 1.000 | {b['value']:.3f} | leaks | ok |" in table


def test_a_federation_that_tokenised_with_another_tokenizer_is_flagged_not_better(tiny, tmp_path, capsys):
    """The clients fed MiniLM WordPiece ids to the GPT-2 model: DAGER recovers the ids, decoded as
    GPT-2 tokens they are junk, and the audit says the attack is not better than the prior baseline."""
    from textleak.models import minilm_tokenizer

    _, _, model, _ = tiny
    wrong = minilm_tokenizer()
    enc = wrong(CLIENT, padding=True, return_tensors="pt")
    rec = _audit_client_update(model, enc, tmp_path)
    err = capsys.readouterr().err
    assert rec["status"] == "ok", rec.get("error")
    assert rec["baseline"]["verdict"] == "NOT better than baseline", (rec["metrics"], rec["baseline"])
    assert "is not better than the text-prior baseline" in err and "is NOT better than the random baseline" in err
