"""The federation's pieces: the model (the audit case's tiny GPT-2, loaded from the local
cache), each client's sentences, one local SGD pass on the mean next-token loss."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

CASE = "text/tiny-gpt2/dager"
CONFIG_ENV = "FLOWER_TEXT_CONFIG"
SENTENCES = [["the movie was great fun", "a dull and tired plot"], ["what a lovely little film", "i would watch it again"]]


def run_config(context) -> dict:
    """``[tool.flwr.app.config]`` of pyproject.toml, then ``context.run_config``, then $FLOWER_TEXT_CONFIG."""
    import tomllib

    here = Path(__file__).resolve().parents[1]
    cfg = dict(tomllib.loads((here / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    cfg.update(dict(context.run_config))
    cfg.update(json.loads(os.environ.get(CONFIG_ENV, "{}")))
    if not Path(str(cfg["capture-dir"])).is_absolute():
        cfg["capture-dir"] = str(here / str(cfg["capture-dir"]))
    return cfg


def make_model() -> torch.nn.Module:
    from common.seed import make_generator
    from eval.catalog import catalog
    from textleak.kit import TextKit

    return TextKit().load_model(catalog().cases.get(CASE), device=torch.device("cpu"), generator=make_generator(0))


def client_sentences(partition_id: int) -> list[str]:
    return SENTENCES[partition_id % len(SENTENCES)]


def train(model: torch.nn.Module, texts: list[str], *, lr: float, epochs: int) -> float:
    """Full-batch local SGD on the mean language-model loss of the client's sentences."""
    from common.types import Batch
    from textleak.kit import TextKit
    from textleak.models import info_of

    tok = info_of(model).tokenizer
    enc = tok(texts, padding=True, return_tensors="pt")
    batch = Batch({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, None,
                  {"seq_lens": enc["attention_mask"].sum(1).tolist()})
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        opt.zero_grad()
        loss = TextKit.loss_fn(model, batch).mean()
        loss.backward()
        opt.step()
    return float(loss.detach())
