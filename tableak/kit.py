"""The tabular kit: loads tables and models, samples client batches, builds priors, scores."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from common.case import Case
from common.kit import ContinuousPrior
from common.matching import assignment
from common.types import Batch, Reconstruction

from .data import ADULT_CONTINUOUS, adult_frame
from .models import FullyConnected
from .schema import TabularSchema

CONT_TOL = 0.319  # TabLeak create_tolerance_map(tol=0.319)


def _read_table(case: Case, data_path: str | None) -> tuple[pd.DataFrame, TabularSchema]:
    source = data_path or case.data
    if source == "adult":
        df = adult_frame()
        schema = TabularSchema.infer(df, label="salary", continuous=ADULT_CONTINUOUS)
        return df, schema
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"tabular data {source!r}: not a known dataset (adult) or an existing CSV file")
    import datasets

    ds = datasets.load_dataset("csv", data_files=str(path), split="train")
    df = ds.to_pandas()
    label = case.options.get("label")
    if not label:
        raise ValueError("a CSV needs its label column: pass --label COL")
    df = df.dropna(subset=[label])
    schema = TabularSchema.infer(df, label=label, categorical=list(case.options.get("categorical", [])),
                                 continuous=list(case.options.get("continuous", [])))
    keep = [f.name for f in schema.features] + [label]
    return df[keep].dropna().reset_index(drop=True), schema


class TabularPool:
    def __init__(self, dataset, frame: pd.DataFrame, schema: TabularSchema) -> None:
        self.dataset = dataset  # datasets.Dataset view of the table
        self.frame = frame
        self.schema = schema
        self.x = schema.encode(frame)
        self.y = schema.encode_labels(frame)


def row_errors(pred: pd.DataFrame, true: pd.DataFrame, schema: TabularSchema) -> np.ndarray:
    """[n_pred, n_true, n_features] 0/1 error (categorical exact, continuous within 0.319 σ)."""
    errs = []
    for f in schema.features:
        p, t = pred[f.name].to_numpy(), true[f.name].to_numpy()
        if f.kind == "categorical":
            errs.append(p.astype(str)[:, None] != t.astype(str)[None, :])
        else:
            errs.append(np.abs(p.astype(float)[:, None] - t.astype(float)[None, :]) > CONT_TOL * f.std)
    return np.stack(errs, axis=-1).astype(float)


def tabular_scores(pred: pd.DataFrame, true: pd.DataFrame, schema: TabularSchema) -> dict[str, float]:
    """TabLeak's accuracy after Hungarian row matching, plus its categorical/continuous split."""
    e = row_errors(pred, true, schema)
    perm = assignment(e.mean(-1))
    matched = e[perm, np.arange(len(true))]  # [n_true, n_features]
    cat = np.array([f.kind == "categorical" for f in schema.features])
    out = {"accuracy": float(1 - matched.mean()), "exact_row": float((matched.sum(1) == 0).mean())}
    if cat.any():
        out["cat_accuracy"] = float(1 - matched[:, cat].mean())
    if (~cat).any():
        out["cont_accuracy"] = float(1 - matched[:, ~cat].mean())
    return out


class TabularKit:
    modality = "tabular"

    def load_pool(self, case: Case, *, data_path: str | None) -> TabularPool:
        import datasets

        df, schema = _read_table(case, data_path)
        return TabularPool(datasets.Dataset.from_pandas(df, preserve_index=False), df, schema)

    def load_model(self, case: Case, *, device: torch.device, generator: torch.Generator) -> nn.Module:
        pool = self._schema_pool(case)
        layout = tuple(case.options.get("layout", (100, 100, 2)))
        return FullyConnected(pool.schema.dim, layout, generator=generator).to(device).eval()

    def _schema_pool(self, case: Case) -> TabularPool:
        key = (case.data, tuple(sorted(case.options.items())))
        cache = self.__dict__.setdefault("_pools", {})
        if key not in cache:
            cache[key] = self.load_pool(case, data_path=None)
        return cache[key]

    def sample(self, pool: TabularPool, case: Case, *, model, device, generator) -> tuple[Batch, Any]:
        b = case.protocol.batch_size
        idx = torch.randint(0, len(pool.frame), (b,), generator=generator)  # with replacement, as TabLeak
        batch = Batch({"x": pool.x[idx].to(device)}, pool.y[idx].to(device))
        truth = pool.frame.iloc[idx.numpy()].reset_index(drop=True)
        return batch, {"frame": truth, "schema": pool.schema, "labels": pool.y[idx]}

    @staticmethod
    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch.inputs["x"]), batch.labels, reduction="none")

    def make_prior(self, case: Case, model: nn.Module, prior_kind: str, *, device) -> Any:
        if prior_kind != "continuous":
            raise ValueError(f"the tabular kit cannot build a {prior_kind!r} prior")
        schema = self._schema_pool(case).schema
        lo, hi = schema.bounds()
        last = model.last
        names = {id(p): n for n, p in model.named_parameters()}
        return ContinuousPrior(
            input_shape=(schema.dim,), num_classes=len(schema.classes),
            build_batch=lambda x, y: Batch({"x": x}, y), loss_fn=self.loss_fn,
            label_weight=names[id(last.weight)], label_bias=names[id(last.bias)],
            lower=lo.to(device), upper=hi.to(device),
            sample_inputs=lambda n, g: (torch.rand((n, schema.dim), generator=g) * 2 - 1).to(device),
        )

    def score(self, reconstruction: Reconstruction, truth: Any, *, case: Case) -> tuple[dict[str, float], str]:
        schema: TabularSchema = truth["schema"]
        data = reconstruction.data
        pred = data if isinstance(data, pd.DataFrame) else schema.decode(data)
        metrics = tabular_scores(pred, truth["frame"], schema)
        if reconstruction.labels is not None:
            from common.metrics.classification import accuracy

            p = sorted(reconstruction.labels.tolist())
            t = sorted(truth["labels"].tolist())
            metrics["label_accuracy"] = accuracy(predictions=p, references=t)["accuracy"]
        return metrics, "hungarian:tabular-feature-error"
