"""The tabular kit: loads tables and models, samples client batches, builds priors, scores."""
from __future__ import annotations

import json

from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.func import functional_call

from common.case import Case
from common.kit import ContinuousPrior, build_prior
from common.labels import label_accuracy
from common.matching import assignment
from common.seed import derive_seed, make_generator
from common.types import Batch, Reconstruction

from .data import load_table
from .models import FullyConnected, train_model
from .schema import CONT_TOL, TabularSchema

__all__ = ["CONT_TOL", "TabularKit", "TabularPool", "tabular_scores", "entropy_quartiles"]


def _read_table(case: Case, data_path: str | None) -> tuple[pd.DataFrame, TabularSchema]:
    source = str(data_path or case.data)
    opts = case.options
    if opts.get("schema"):  # a declared encoding (python -m eval schema export): the data never changes it
        from .data import read_rows
        from .schema import frame_for_schema, load_schema

        schema = load_schema(opts["schema"])
        return frame_for_schema(read_rows(source), schema, source=Path(source).name), schema
    return load_table(source, label=opts.get("label"), categorical=_names(opts.get("categorical", ())),
                      continuous=_names(opts.get("continuous", ())), drop=_names(opts.get("drop", ())))


def _names(v) -> list[str]:
    """Column lists from case options: a list/tuple or a comma-separated string (hashable in case keys)."""
    if isinstance(v, str):
        return [c.strip() for c in v.split(",") if c.strip()]
    return [str(c) for c in v]


class TabularPool:
    def __init__(self, dataset, frame: pd.DataFrame, schema: TabularSchema) -> None:
        self.dataset = dataset  # datasets.Dataset view of the table
        self.frame = frame
        self.schema = schema
        self.x = schema.encode(frame)
        self.y = schema.encode_labels(frame)

    def marginals(self) -> tuple[dict, dict]:
        cat, hist = {}, {}
        for f, _ in self.schema.categorical:
            counts = self.frame[f.name].astype(str).str.strip().value_counts()
            p = np.array([counts.get(c, 0) for c in f.categories], dtype=float)
            cat[f.name] = p / p.sum()
        for f, _ in self.schema.continuous:
            v = pd.to_numeric(self.frame[f.name], errors="coerce").dropna().to_numpy(float)
            nb = int(min(100, max(1, len(np.unique(v)))))
            counts, edges = np.histogram(v, bins=nb, range=(f.lower, f.upper if f.upper > f.lower else f.lower + 1))
            hist[f.name] = (edges, counts / counts.sum())
        return cat, hist


def matched_errors(pred_cat, pred_cont, true_cat, true_cont, schema: TabularSchema) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian-match predicted rows to true rows on the mean feature error.
    Returns (errors [n_true, n_features] of the matched rows, perm)."""
    e = schema.feature_errors(pred_cat, pred_cont, true_cat, true_cont)
    perm = assignment(e.mean(-1))
    return e[perm, np.arange(e.shape[1])], perm


def tabular_scores(pred: pd.DataFrame, true: pd.DataFrame, schema: TabularSchema) -> dict[str, float]:
    """TabLeak's accuracy after Hungarian row matching, plus its categorical/continuous split."""
    pc, pn = schema.frame_to_arrays(pred)
    tc, tn = schema.frame_to_arrays(true)
    return _scores(pc, pn, tc, tn, schema)[0]


def _scores(pc, pn, tc, tn, schema) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    m, perm = matched_errors(pc, pn, tc, tn, schema)
    nc = tc.shape[1]
    out = {"accuracy": float(1 - m.mean()), "exact_row": float((m.sum(1) == 0).mean())}
    if nc:
        out["cat_accuracy"] = float(1 - m[:, :nc].mean())
    if tn.shape[1]:
        out["cont_accuracy"] = float(1 - m[:, nc:].mean())
        err = np.where(np.isfinite(pn[perm]), pn[perm] - tn, np.inf) / schema.cont_std  # NaN/Inf: worst
        out["nrmse"] = float(np.sqrt((err ** 2).mean(0)).mean())  # per-feature RMSE / σ, averaged
    return out, m, perm


def entropy_quartiles(errors: np.ndarray, entropy: np.ndarray) -> tuple[float, float]:
    """Accuracy of the lowest- and highest-entropy 25 % of cells (ties broken by position)."""
    e, h = errors.ravel(), entropy.ravel()
    if e.size == 0:
        return float("nan"), float("nan")
    k = max(1, int(round(0.25 * e.size)))
    order = np.argsort(h, kind="stable")
    return float(1 - e[order[:k]].mean()), float(1 - e[order[-k:]].mean())


class TabularKit:
    modality = "tabular"
    optional: ClassVar[frozenset[str]] = frozenset({"truth_from_file", "save_artifacts"})
    _pools: dict = {}  # class-level cache: a new kit is made per trial

    def load_pool(self, case: Case, *, data_path: str | None) -> TabularPool:
        key = (str(data_path or case.data), tuple(sorted((k, str(v)) for k, v in case.options.items())))
        if key not in self._pools:
            import datasets

            df, schema = _read_table(case, data_path)
            self._pools[key] = TabularPool(datasets.Dataset.from_pandas(df, preserve_index=False), df, schema)
        return self._pools[key]

    def load_model(self, case: Case, *, device: torch.device, generator: torch.Generator) -> nn.Module:
        pool = self.load_pool(case, data_path=None)
        layout = case.options.get("layout", (100, 100, 2))
        if isinstance(layout, str):  # from --option layout=100,100,2
            try:
                layout = [int(v) for v in layout.split(",") if v.strip()]
            except ValueError:
                raise ValueError(f"option layout={layout!r}: expected comma-separated layer widths, e.g. 100,100,2") from None
        layout = tuple(int(v) for v in layout)
        model = FullyConnected(pool.schema.dim, layout, generator=generator)
        epochs = int(case.options.get("train_epochs", 0))
        if epochs:
            model = train_model(model, pool.x, pool.y, epochs=epochs,
                                generator=make_generator(derive_seed(generator.initial_seed(), "train")))
        return model.to(device).eval()

    def sample(self, pool: TabularPool, case: Case, *, model, device, generator) -> tuple[Batch, Any]:
        b = case.protocol.batch_size
        idx = torch.randint(0, len(pool.frame), (b,), generator=generator)  # with replacement, as TabLeak
        batch = Batch({"x": pool.x[idx].to(device)}, pool.y[idx].to(device))
        truth = pool.frame.iloc[idx.numpy()].reset_index(drop=True)
        return batch, {"frame": truth, "schema": pool.schema, "labels": pool.y[idx], "x": pool.x[idx]}

    @staticmethod
    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch.inputs["x"]), batch.labels, reduction="none")

    def _tabular_prior(self, case: Case, model: nn.Module, *, device) -> Any:
        from .prior import TabularPrior

        pool = self.load_pool(case, data_path=None)
        names = {id(p): n for n, p in model.named_parameters()}
        last = model.last
        cat, hist = pool.marginals()
        return TabularPrior(
            schema=pool.schema, forward=lambda p, x: functional_call(model, p, (x,)),
            penultimate=lambda x: model.penultimate(x),
            last_weight=names[id(last.weight)], last_bias=names[id(last.bias)], marginals=cat, histograms=hist)

    def _continuous_prior(self, case: Case, model: nn.Module, *, device) -> ContinuousPrior:
        schema = self.load_pool(case, data_path=None).schema
        names = {id(p): n for n, p in model.named_parameters()}
        last = model.last
        lo, hi = schema.bounds()
        return ContinuousPrior(
            input_shape=(schema.dim,), num_classes=len(schema.classes),
            build_batch=lambda x, y: Batch({"x": x}, y), loss_fn=self.loss_fn,
            label_weight=names[id(last.weight)], label_bias=names[id(last.bias)],
            lower=lo.to(device), upper=hi.to(device),
            sample_inputs=lambda n, g: (torch.rand((n, schema.dim), generator=g) * 2 - 1).to(device),
        )

    #: prior kind (an attack's ``info.prior``) -> builder
    priors: ClassVar[Mapping[str, Callable[..., Any]]] = {"tabular": _tabular_prior, "continuous": _continuous_prior}

    def make_prior(self, case: Case, model: nn.Module, prior_kind: str, *, device) -> Any:
        return build_prior(self, case, model, prior_kind, device=device)

    def score(self, reconstruction: Reconstruction, truth: Any, *, case: Case) -> tuple[dict[str, float], str]:
        schema: TabularSchema = truth["schema"]
        data = reconstruction.data
        if isinstance(data, pd.DataFrame):
            pc, pn = schema.frame_to_arrays(data)
        else:
            pc, pn = schema.decode_arrays(data)
        tc, tn = schema.frame_to_arrays(truth["frame"])
        metrics, m, perm = _scores(pc, pn, tc, tn, schema)
        ex = reconstruction.extras or {}
        nc = tc.shape[1]
        if "entropy_cat" in ex and nc:
            lo, hi = entropy_quartiles(m[:, :nc], np.asarray(ex["entropy_cat"])[perm])
            metrics["cat_acc_low_entropy"], metrics["cat_acc_high_entropy"] = lo, hi
        if "entropy_cont" in ex and tn.shape[1] and np.asarray(ex["entropy_cont"]).std() > 0:
            lo, hi = entropy_quartiles(m[:, nc:], np.asarray(ex["entropy_cont"])[perm])
            metrics["cont_acc_low_entropy"], metrics["cont_acc_high_entropy"] = lo, hi
        if "certified" in ex:  # tabular-exact: fraction of rows certified exact
            metrics["certified_rows"] = float(np.mean(ex["certified"])) if len(ex["certified"]) else 0.0
        if reconstruction.labels is not None:
            acc = label_accuracy(reconstruction.labels.tolist(), truth["labels"].tolist())
            if acc is not None:
                metrics["label_accuracy"] = acc
        return metrics, "hungarian:tabular-feature-error"

    def truth_from_file(self, case: Case, path, *, model=None) -> dict[str, Any]:
        """Ground truth for ``eval audit``: a CSV of the client's rows in the case's schema."""
        schema = self.load_pool(case, data_path=None).schema
        frame = pd.read_csv(path)
        return {"frame": frame, "schema": schema, "labels": schema.encode_labels(frame), "x": schema.encode(frame)}

    def save_artifacts(self, rec: Reconstruction, truth: Any, *, case: Case, directory) -> dict[str, str]:
        """``cells.json``: the batch's rows decoded, matched to the truth, with the wrong cells marked
        (the report's table view); with ``save_heatmap``, also the entropy heat map and the CSV."""
        ex = rec.extras or {}
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        schema: TabularSchema = truth["schema"]
        pc, pn = schema.decode_arrays(rec.data)
        tc, tn = schema.frame_to_arrays(truth["frame"])
        m, perm = matched_errors(pc, pn, tc, tn, schema)
        names = [f.name for f, _ in schema.categorical] + [f.name for f, _ in schema.continuous]

        def rows(c, n):
            out = []
            for i in range(c.shape[0]):
                cat = [f.categories[j] if j >= 0 else None for (f, _), j in zip(schema.categorical, c[i])]
                out.append(cat + [None if not np.isfinite(v) else round(float(v), 4) for v in n[i]])
            return out

        cells = {"columns": names, "reconstruction": rows(pc[perm], pn[perm]), "truth": rows(tc, tn),
                 "wrong": m.astype(bool).tolist()}
        (directory / "cells.json").write_text(json.dumps(cells), encoding="utf-8")
        out = {"cells": str(directory / "cells.json")}
        if not ex.get("save_heatmap") or "entropy_cat" not in ex:
            return out
        from .entropy import save_heatmap

        path = directory / "entropy_heatmap.png"
        save_heatmap(path, schema, np.asarray(ex["entropy_cat"])[perm], np.asarray(ex["entropy_cont"])[perm], m)
        schema.arrays_to_frame(pc[perm], pn[perm]).to_csv(directory / "reconstruction.csv", index=False)
        return {**out, "heatmap": str(path), "reconstruction": str(directory / "reconstruction.csv")}

