"""Auditing a model the suite has never seen (issue 22), from the command line: the user's own
Hugging Face directory (``save_pretrained``) or ``package.module:factory`` for text, a factory for
speech; parameter names come from that model, the tokenizer from its directory or ``--tokenizer``,
and a model an attack cannot use is refused with one line (exit 2) before any attack."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eval.__main__ import main

CASE = "text/tiny-gpt2/dager"


def gpt2_dir(path: Path, *, width: int, layers: int, with_tokenizer: bool = True, seed: int = 3):
    """A randomly initialised GPT-2-style LM of a width no case uses, saved as a user would."""
    import transformers as tf

    from textleak.models import gpt2_tokenizer

    tok = gpt2_tokenizer()
    cfg = tf.GPT2Config(vocab_size=len(tok), n_embd=width, n_layer=layers, n_head=4, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(path)
    if with_tokenizer:
        tok.save_pretrained(path)
    return model, tok


def fedsgd_capture(root: Path, model, tok, texts: list[str], *, seq_lens: bool = False) -> Path:
    """One FedSGD client update (mean next-token loss over the batch) with its sentences as truth."""
    from common.types import Batch
    from eval.capture import write_capture
    from textleak.kit import text_loss

    enc = tok(texts, padding=True, return_tensors="pt")
    batch = Batch({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, None, {})
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(text_loss(model, batch).mean(), list(model.parameters()))
    truth = root.parent / f"{root.name}-truth.txt"
    truth.write_text("\n".join(texts) + "\n")
    write_capture(root, round=1, client_id="c0", kind="gradient", num_examples=len(texts),
                  before={n: p.detach() for n, p in model.named_parameters()}, update=dict(zip(names, grads)),
                  truth=truth, seq_lens=enc["attention_mask"].sum(1).tolist() if seq_lens else None)
    return root


def rotten_tomatoes(tok, n: int, *, max_tokens: int = 12) -> list[str]:
    from textleak.data import rotten_tomatoes as rt

    return [t for t in rt()["text"] if len(tok(t)["input_ids"]) <= max_tokens][:n]


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]


def test_dager_recovers_real_sentences_exactly_from_a_users_hf_directory(tmp_path, capsys):
    """GPT-2-style, hidden 96 (the suite's widths: 64, 256, 768), random init; the model saved
    without its tokenizer (given by --tokenizer), 4 Rotten Tomatoes sentences, FedSGD B = 4."""
    model_dir, tok_dir = tmp_path / "my-lm", tmp_path / "my-tokenizer"
    model, tok = gpt2_dir(model_dir, width=96, layers=2, with_tokenizer=False)
    tok.save_pretrained(tok_dir)
    texts = rotten_tomatoes(tok, 4)
    caps = fedsgd_capture(tmp_path / "caps", model, tok, texts)
    cmd = ["audit", str(caps), "--attack", "dager", "--case", CASE, "--model", str(model_dir), "--out",
           str(tmp_path / "out")]
    assert main(cmd) == 2  # no tokenizer in the directory: refused before any attack, with the fix
    assert "pass --tokenizer" in capsys.readouterr().err
    assert main([*cmd, "--tokenizer", str(tok_dir)]) == 0
    (rec,) = records(tmp_path / "out")
    assert rec["status"] == "ok", rec.get("error")
    assert rec["case"]["model"] == str(model_dir) and rec["case"]["tokenizer"] == str(tok_dir)
    assert rec["metrics"]["exact_match"] == 1.0 and rec["metrics"]["rouge1"] == 1.0
    decoded = Path(rec["artifacts"]["decoded"]).read_text().splitlines()
    assert sorted(" ".join(s.split()) for s in decoded) == sorted(texts)


def test_a_user_model_that_does_not_fit_the_attack_is_refused_with_one_line(tmp_path, capsys, monkeypatch):
    import transformers as tf

    model, tok = gpt2_dir(tmp_path / "one-block", width=48, layers=1)  # DAGER needs two blocks
    caps = fedsgd_capture(tmp_path / "caps", model, tok, ["a dull and tired plot ."])
    out = str(tmp_path / "out")
    assert main(["audit", str(caps), "--attack", "dager", "--case", CASE, "--model", str(tmp_path / "one-block"),
                 "--out", out]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "%|" not in line]  # no bars
    assert len(err) == 1 and err[0].startswith("error: --model") and "two transformer blocks" in err[0], err
    assert not (tmp_path / "out" / "records.jsonl").exists()
    # TAG needs no second block but each example's token count: refused until the capture records it
    tag = ["audit", "--attack", "tag", "--case", "text/tiny-gpt2/fedsgd", "--model", str(tmp_path / "one-block"),
           "--set", "n_steps=2"]
    assert main([*tag[:1], str(caps), *tag[1:], "--out", out]) == 2
    assert "needs each example's token count" in capsys.readouterr().err
    caps_lens = fedsgd_capture(tmp_path / "caps-lens", model, tok, ["a dull and tired plot ."], seq_lens=True)
    assert main([*tag[:1], str(caps_lens), *tag[1:], "--out", str(tmp_path / "tag")]) == 0
    (rec,) = records(tmp_path / "tag")
    assert rec["status"] == "ok" and rec["case"]["model"] == str(tmp_path / "one-block"), rec.get("error")
    (tmp_path / "mytext.py").write_text(
        "import torch, transformers as tf\n"
        "def linear():\n    return torch.nn.Linear(4, 4)\n"
        "def lm():\n    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=50257, n_embd=48, n_layer=2, n_head=4,"
        " n_positions=64))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec, extra, needle in (("mytext:lm", [], "pass --tokenizer"),
                                ("mytext:linear", ["--tokenizer", "gpt2"], "no token input embeddings"),
                                (str(tmp_path / "nowhere"), [], "neither a kit model")):
        code = main(["audit", str(caps), "--attack", "dager", "--case", CASE, "--model", spec, *extra, "--out", out])
        err = capsys.readouterr().err
        assert code == 2 and needle in err, (spec, err)
    # a factory with --tokenizer is the model the capture is loaded into (names from the model itself)
    from eval.audit_models import check_text_model, user_text_model

    net = user_text_model("mytext:lm", tokenizer="gpt2")
    check_text_model(net, "dager", spec="mytext:lm")
    assert isinstance(net, tf.GPT2LMHeadModel) and net.textleak_info.kind == "decoder"


@pytest.mark.slow  # ~40-60 s: DAGER at hidden 384
def test_dager_recovers_sentences_from_a_users_bert_classifier_directory(tmp_path):
    """BERT-style: the user's classifier (pretrained MiniLM encoder + its own 2-way head) saved
    with its WordPiece tokenizer; FedSGD B = 3 on real Rotten Tomatoes sentences with labels."""
    import transformers as tf

    from common.assets import MissingAsset
    from common.types import Batch
    from eval.capture import write_capture
    from textleak.kit import text_loss

    try:
        from textleak.models import minilm_dir, minilm_tokenizer

        src, tok = minilm_dir(), minilm_tokenizer()
    except (ValueError, MissingAsset) as e:
        pytest.skip(str(e))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = tf.AutoModelForSequenceClassification.from_pretrained(
            str(src), num_labels=2, local_files_only=True, attn_implementation="eager").eval()
    model.save_pretrained(tmp_path / "my-classifier")
    tok.save_pretrained(tmp_path / "my-classifier")
    from textleak.data import rotten_tomatoes as rt

    ds = rt()
    rows = [(t, y) for t, y in zip(ds["text"], ds["label"]) if len(tok(t)["input_ids"]) <= 16][:3]
    texts = [t for t, _ in rows]
    enc = tok(texts, padding=True, return_tensors="pt")
    batch = Batch({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]},
                  torch.tensor([y for _, y in rows]), {})
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(text_loss(model, batch).mean(), list(model.parameters()))
    (tmp_path / "truth.txt").write_text("\n".join(texts) + "\n")
    write_capture(tmp_path / "caps", round=1, client_id="c0", kind="gradient", num_examples=3,
                  before={n: p.detach() for n, p in model.named_parameters()}, update=dict(zip(names, grads)),
                  truth=tmp_path / "truth.txt")
    assert main(["audit", str(tmp_path / "caps"), "--attack", "dager", "--case", "text/minilm-bert/dager",
                 "--model", str(tmp_path / "my-classifier"), "--out", str(tmp_path / "out")]) == 0
    (rec,) = records(tmp_path / "out")
    assert rec["status"] == "ok" and rec["metrics"]["rouge1"] == 1.0, (rec.get("error"), rec.get("metrics"))
    assert rec["metrics"]["exact_match"] == 1.0
