"""The federation's own pieces: the model, the clients' data, local training.

The rows are encoded with the schema exported from the audit case
(``python -m eval schema export tabular/adult-fc/fedsgd > schema.json``) through
``tableak.schema.load_schema`` + ``encode_frame``: the audit then knows the encoding
exactly. The model is the federation's own (not one of the suite's): the audit reads it
with ``--model flower_tabular.task:make_model``.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torch import nn

from tableak.schema import encode_frame, load_schema

WIDTH = 105  # the exported Adult schema's encoded width (schema.json "dim")
CONFIG_ENV = "FLOWER_TABULAR_CONFIG"


def run_config(context) -> dict:
    """The run config: ``[tool.flwr.app.config]`` of pyproject.toml (what ``flwr run`` passes in
    ``context.run_config``), overridden by JSON in $FLOWER_TABULAR_CONFIG (``run.py``: Flower's
    ``run_simulation`` takes no run config)."""
    import json
    import os
    import tomllib

    base = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    cfg = dict(base["tool"]["flwr"]["app"]["config"])
    cfg.update(dict(context.run_config))
    cfg.update(json.loads(os.environ.get(CONFIG_ENV, "{}")))
    here = Path(__file__).resolve().parents[1]  # relative paths: from the example's folder
    for key in ("schema", "capture-dir"):
        if not Path(str(cfg[key])).is_absolute():
            cfg[key] = str(here / str(cfg[key]))
    return cfg


def make_model(input_dim: int = WIDTH, hidden: int = 64, num_classes: int = 2) -> nn.Module:
    """The federation's model: an MLP of its own width. Parameter names (what a capture is keyed
    by) are ``named_parameters()``: encoder.weight, encoder.bias, head.weight, head.bias."""
    with torch.random.fork_rng():  # the same initial model in every run, the caller's RNG untouched
        torch.manual_seed(0)
        return _MLP(input_dim, hidden, num_classes)


class _MLP(nn.Module):
    def __init__(self, input_dim: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = nn.Linear(input_dim, hidden)
        self.act = nn.ReLU()
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.encoder(x)))


def client_rows(partition_id: int, num_partitions: int, *, rows_per_client: int, seed: int = 0) -> pd.DataFrame:
    """The client's private rows (here: a disjoint sample of Adult per partition)."""
    from tableak.data import adult_frame

    df = adult_frame().sample(rows_per_client * num_partitions, random_state=seed).reset_index(drop=True)
    return df.iloc[partition_id * rows_per_client:(partition_id + 1) * rows_per_client].reset_index(drop=True)


def encode(df: pd.DataFrame, schema_path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows -> (inputs, class ids) with the exported schema: exactly the audit case's encoding."""
    x, y = encode_frame(df, load_schema(schema_path))
    return x, y


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float, epochs: int, batch_size: int,
          shuffle: bool, generator: torch.Generator) -> float:
    """Plain local SGD on the mean cross-entropy; returns the last batch loss."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
        for s in range(0, len(x), batch_size):
            idx = order[s:s + batch_size]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    return float(loss.detach())
