"""TabularExact: orchestration (span -> candidates -> second-layer filter -> certificate -> fallback)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn

from common.attack import AttackInfo
from common.threat import Capability
from common.types import Observation, Reconstruction

from ..attack import CITATION as TABLEAK_CITATION
from ..prior import TabularPrior
from .budget import NEVER, Deadline, OutOfTime
from .fallback import fallback
from .layer2 import noise_slack, two_pass_roots
from .span import FREE_TOL, enumerate_rows, free_continuous, merge_near, project, row_span, unique_rows
from .stages import PeelStages, certifies, gaussian_sigma, labels_match, noise_model
from .verify import (find_layers, fit_counts, layer2_residual, observed_names, second_inputs, sum_scale,
                     unit_resolution)

CITATION = ("Exact tabular row recovery from the first-layer gradient span (this suite, issue 19), after "
            "Dimitrov, Balunović, Konstantinov, Vechev. SPEAR: Exact Gradient Inversion of Batches in Federated "
            "Learning. NeurIPS 2024 (arXiv 2403.03945) and Petrov et al. DAGER: Exact Gradient Inversion for Large "
            "Language Models. NeurIPS 2024 (arXiv 2405.15586); fallback: " + TABLEAK_CITATION)


@dataclass(frozen=True)
class TabularExactConfig:
    """Tolerances of the exact stage and the TabLeak fallback (paper defaults of TabLeak)."""

    RANGES: ClassVar[dict[str, str]] = {
        "rank_tol": "(0,1)", "present_tol": "(0,1)", "span_tol": ">0", "layer2_tol": ">0", "fit_tol": ">0",
        "integer_tol": "(0,0.5)", "max_half": ">=1", "max_candidates": ">=1", "max_fit": ">=1", "starts": ">=1", "pass1_starts": ">=1",
        "fallback_iterations": ">=1", "fallback_ensemble": ">=1", "noise_factor": ">0", "cond_ref": ">=1",
        "act_tol": "(0,1)", "peel_tol": ">0", "g_tol": ">0", "max_patterns": ">=1", "rest_max": ">=1",
        "time_budget": ">0", "noise_edge": ">0", "noise_merge": ">=0",
        "pursuit_starts": ">=1", "pursuit_rounds": ">=1", "pursuit_seed": ">=0"}
    rank_tol: float = 1e-5  # singular values below rank_tol * s_1 are float round-off
    present_tol: float = 1e-4  # a category is absent when its raw-space gradient column is this small (relative)
    span_tol: float = 1e-5  # distance of a valid row to the first-layer span (standardised units)
    layer2_tol: float = 1e-4  # relative distance of the second layer's input to its gradient's row space
    fit_tol: float = 1e-4  # relative residual of the whole-gradient fit that certifies the batch
    integer_tol: float = 0.1  # counts within this of an integer
    max_half: int = 400_000  # combinations per meet-in-the-middle half (beyond: rank limit, fall back)
    max_candidates: int = 100_000  # valid rows in the first-layer span kept for the second-layer filter
    max_fit: int = 400  # distinct candidate rows for the whole-gradient fit
    starts: int = 32  # Gauss-Newton starts per pattern that has a root (continuous values layer 1 leaves open)
    pass1_starts: int = 2  # Gauss-Newton starts for every candidate pattern (the least-squares point first)
    cond_ref: float = 300.0  # span conditioning s_1/s_r up to which span_tol / layer2_tol apply unscaled
    noise_factor: float = 4.0  # declared Gaussian noise: tolerances widened by this many noise deviations
    noise_merge: float = 0.02  # declared noise: roots with one pattern this close (standard deviations) are one row
    noise_edge: float = 1.5  # declared noise: singular values below this many noise edges sigma (sqrt h + sqrt d) dropped
    peel: bool = True  # past the first layer's rank: peel rows of categories seen once, then all patterns on layer 2
    act_tol: float = 1e-4  # a first-layer unit is off for a row when its gradient entry is this small (relative)
    peel_tol: float = 1e-2  # relative second-layer residual of a peeled row / of a pattern root
    g_tol: float = 1e-3  # relative error of a peeled row's own first-layer gradient against its category column
    max_patterns: int = 160_000  # patterns left after peeling that the root search tries (beyond: fall back)
    resolution: bool = True  # report ``unit_resolved``: certified values the gradient tells from their +-1 neighbour
    rest_max: int = 24  # rows the pattern roots miss that the span stage may take as a batch of their own
    pursuit: bool = True  # patterns past max_patterns: coordinate descent on layer 2 with deflation (pursuit.py)
    pursuit_starts: int = 256  # random starts per pursuit round
    pursuit_rounds: int = 40  # pursuit rounds at most (each stops the search when it finds no new row)
    pursuit_seed: int = 0  # the pursuit's random starts (a generator of its own; no global RNG)
    time_budget: float = 300.0  # seconds of exact stage; past them: the fallback, seeded with the rows certified so far
    fallback: Literal["tableak", "none"] = "tableak"  # rows not certified: TabLeak (rows overwritten by certified ones)
    fallback_iterations: int = 1500
    fallback_ensemble: int = 30


class TabularExact(PeelStages):
    """Exact whole-row recovery for FedSGD on tabular models whose first layer is ``nn.Linear``.

    1. Span: the first weight gradient ``dW1 = sum_i g_i x_i^T`` spans the standardised rows; its
       raw-space categorical columns ``dW1[:, j] * scale_j + mean_j * db1 = sum_{i in category j} g_i``
       vanish exactly for absent categories (the issue's per-category handle), which prunes them.
    2. Candidates: every valid row (one category per block, best continuous values by least
       squares) in the span, by meet in the middle over the present categories (``span.py``;
       replaces the probe's big-M MILP).
    3. Second layer: the next Linear's input on a candidate must lie in its weight gradient's row
       space; this removes the affine recombinations that appear from B ~ 24 on Adult.
    4. Certificate: non-negative least squares of the whole observed gradient on per-example
       gradients of the candidates under both labels (``verify.py``). Residual ~0 with integer
       counts summing to B and linearly independent candidate gradients means the decomposition is
       unique among all valid rows of the span: every row, duplicate and label is certified.
    5. Fallback: when the certificate fails (rank limit: B close to or above the first layer's
       width or to the number of present categories; rows sharing a categorical pattern, which
       leaves continuous directions inside the span; undeclared noise; FedAvg deltas), TabLeak runs
       on the whole update with the same generator and the rows certified by steps 1-3 (continuous
       values identified, second-layer check passed) overwrite the TabLeak rows they match
       (Hungarian on the feature error). With no certified row the output is TabLeak's; under
       declared noise a decomposition into B rows that fails the noise certificate replaces it
       (uncertified, status ``best-effort``) when it explains the update better (``fallback.py``).
    6. Time: the exact stage stops at ``time_budget`` seconds (``budget.py``) and falls back as in 5
       with the rows certified so far (stat ``exact_timeout``).
    7. Past the first layer's rank (``stages.py``): rows of categories seen once are peeled off, the
       patterns left are solved on the second layer, and past ``max_patterns`` (German B = 64, 13
       blocks) a greedy pursuit finds the rows one second-layer root at a time and deflates each by
       a rank-one downdate of ``dW2`` (``pursuit.py``; 2-class heads); step 4's fit certifies.

    Deviations from SPEAR: no sampling of sparse directions in the gradient's column space (the
    categorical structure identifies rows directly), no ReLU sign assumptions; from DAGER: the
    candidate pool is the set of valid table rows, not the vocabulary. Declared Gaussian noise
    (a public defense): singular directions below ``noise_edge`` noise edges are dropped, and each
    candidate's span tolerances grow by its first-order perturbation ``noise_factor * sigma *
    sqrt(m - r) * ||S^-1 V^T a||`` (``layer2.noise_slack``), the whole-gradient fit by
    ``noise_factor`` noise norms; the certificate is then relative to the declared noise model
    (categories, labels and counts exact, continuous values within noise: fnlwgt a few units off).
    """

    info: ClassVar[AttackInfo] = AttackInfo(
        "tabular-exact", "tabular", frozenset({Capability.BATCH_SIZE, Capability.PUBLIC_PRIOR}), CITATION,
        prior="tabular")

    def __init__(self, config: TabularExactConfig | None = None) -> None:
        self.config = config or self.default_config()

    @classmethod
    def default_config(cls) -> TabularExactConfig:
        return TabularExactConfig()

    # -- exact stage ------------------------------------------------------------------------
    def _exact(self, obs: Observation, model: nn.Module, prior: TabularPrior, b: int, stats: dict,
               deadline: Deadline = NEVER) -> tuple:
        """(all rows certified: Fit or None, partially certified distinct rows [n, d], best-effort Fit or None)."""
        cfg = self.config
        schema = prior.schema
        empty = np.zeros((0, schema.dim))
        layers = find_layers(model, schema.dim)
        tensors = obs.tensors
        if layers.first_weight not in tensors:
            stats["exact_status"] = 1.0  # first layer not observed
            return None, empty, None
        dw = tensors[layers.first_weight].detach().double().cpu().numpy()
        sigma = gaussian_sigma(obs)
        h, d = dw.shape
        floor = cfg.noise_edge * sigma * (math.sqrt(h) + math.sqrt(d))  # declared noise: its singular values
        mean, scale = np.asarray(schema.mean, float), np.asarray(schema.scale, float)
        ci = schema.continuous_index
        present = np.ones(d, dtype=bool)
        if layers.first_bias is not None and layers.first_bias in tensors:
            db = tensors[layers.first_bias].detach().double().cpu().numpy()
            raw = dw * scale + np.outer(db, mean)
            norms = np.linalg.norm(raw, axis=0)
            norms[ci] = 0.0
            noise = cfg.noise_factor * sigma * math.sqrt(h) * np.sqrt(scale ** 2 + mean ** 2)
            present = (norms > cfg.present_tol * norms.max()) & (norms > noise)
            present[ci] = True
        span = row_span(dw, max_rank=b, rel_tol=cfg.rank_tol, floor=floor)
        stats.update(rank=float(span.rank), present_categories=float(present.sum() - len(ci)))
        if span.rank == 0:
            return None, empty, None
        # float rounding tilts weakly determined span directions by about eps * s_1 / s_r: tolerances
        # grow with the conditioning beyond ``cond_ref`` (trained models: confident rows have tiny gradients)
        s_r = span.singular[span.rank - 1]
        cond1 = max(1.0, span.singular[0] / s_r / cfg.cond_ref)
        tol = radius = cfg.span_tol * cond1
        noise1 = noise_model(span, sigma, d, cfg.noise_factor)
        if noise1 is not None:  # per row: tol + noise_slack (``layer2.py``); the search radius covers rows of norm 2 sqrt(d)
            radius = tol + noise1[1] * 2 * math.sqrt(d) / s_r
        # declared noise tilts the span by about floor / s_r: a continuous direction inside it looks that far out
        free_tol = max(FREE_TOL, 2 * floor / s_r)
        free = free_continuous(schema, span, free_tol=free_tol)
        stats["free_continuous"] = float(free.shape[1])
        span2, tol2, strict2, noise2 = None, 0.0, 0.0, None
        # the second layer's inputs span its weight gradient's row space only when their output-side
        # factors (B vectors of its width) are independent: B <= its width (not the 2-class output layer)
        if layers.second is not None and layers.second_weight in tensors and b <= layers.second.out_features:
            dw2 = tensors[layers.second_weight].detach().double().cpu().numpy()
            floor2 = cfg.noise_edge * sigma * (math.sqrt(dw2.shape[0]) + math.sqrt(dw2.shape[1]))
            span2 = row_span(dw2, max_rank=b, rel_tol=cfg.rank_tol, floor=floor2)
            if 0 < span2.rank < dw2.shape[1]:
                strict2 = cfg.layer2_tol
                noise2 = noise_model(span2, sigma, dw2.shape[1], cfg.noise_factor)
                cond2 = max(1.0, span2.singular[0] / span2.singular[span2.rank - 1] / cfg.cond_ref)
                tol2 = strict2 + cfg.layer2_tol * (cond2 - 1)
            else:
                span2 = None  # the second layer's span is not informative (e.g. it is the 2-class output)
        filter2 = span2 is not None and not free.shape[1]  # continuous values pinned: filter on layer 2 while enumerating

        def accept(rows: np.ndarray) -> np.ndarray:
            ok = np.linalg.norm(rows - rows @ span.basis.T @ span.basis, axis=1) <= tol + noise_slack(rows, noise1) * \
                np.linalg.norm(rows, axis=1)
            if filter2 and ok.any():
                a = second_inputs(model, layers.second, rows[ok])
                ok[ok] = layer2_residual(a, span2.basis) <= tol2 + noise_slack(a, noise2)
            return ok

        cand = enumerate_rows(schema, span, present, tol=radius, free_tol=free_tol, max_half=cfg.max_half,
                              max_candidates=cfg.max_candidates, deadline=deadline,
                              accept=accept if (filter2 or noise1 is not None) else None)
        stats.update(combinations=float(cand.combos), layer1_candidates=float(len(cand.rows)),
                     truncated=float(cand.truncated), continuous_identified=float(span.cont_identified))
        if cand.truncated:  # rank limit: too many valid rows in the span to identify the batch
            return None, empty, None
        layer2 = span2 is not None
        if free.shape[1] and layer2 and len(cand.raw_rows):  # rows share categorical patterns: layer 2 solves them
            w1 = layers.first.weight.detach().double().cpu().numpy()
            b1 = layers.first.bias.detach().double().cpu().numpy() if layers.first.bias is not None else np.zeros(h)
            lo, hi = (v.double().numpy()[ci] for v in schema.bounds())
            y0 = cand.raw_rows
            found, n_hit = two_pass_roots((y0[i:i + 2000] for i in range(0, len(y0), 2000)), free, w1, b1,
                                          span2.basis, lo, hi, ci, starts=cfg.pass1_starts, more_starts=cfg.starts,
                                          tol=tol2, deadline=deadline, noise=noise2)
            rows = unique_rows(schema, project(schema, found))
            stats["layer2_patterns"] = float(n_hit)
        else:
            rows = unique_rows(schema, cand.rows)
        strict = np.ones(len(rows), dtype=bool)
        if len(rows) and layer2:
            a = second_inputs(model, layers.second, rows)
            res2, slack = layer2_residual(a, span2.basis), noise_slack(a, noise2)
            keep = res2 <= tol2 + slack
            rows, strict, z = rows[keep], (res2 <= strict2 + slack)[keep], (res2 / (tol2 + slack))[keep]
            if noise2 is not None:  # the best max_fit rows in noise units; two roots of one row a little apart: one
                if len(rows) > cfg.max_fit:
                    best = np.sort(np.argsort(z, kind="stable")[:cfg.max_fit])
                    rows, z, stats["noise_ranked"] = rows[best], z[best], 1.0
                rows = merge_near(schema, rows, z, keep=0, rel=cfg.noise_merge)
                strict = np.zeros(len(rows), dtype=bool)  # (no per-row certificates under noise)
        stats["layer2_candidates"] = float(len(rows))
        stats["layer2_used"] = float(layer2)
        sound = (span.cont_identified or layer2) and not cand.truncated
        # rows passing both span checks are certified one by one only without noise and when they
        # are not more than B (under declared noise only the whole-gradient certificate counts)
        # (and within the unscaled second-layer tolerance)
        partial = rows[strict] if (sound and layer2 and not sigma and len(rows) <= b) else empty
        if not sound or len(rows) == 0 or len(rows) > cfg.max_fit:
            return None, partial, None
        names, scale = observed_names(obs, model), sum_scale(obs, b)
        n_cls = len(schema.classes)
        fit = fit_counts(model, prior.loss_fn, names, dict(tensors), rows, n_cls, batch_size=b,
                         scale=scale, integer_tol=cfg.integer_tol, total=bool(sigma))
        n_params = sum(int(tensors[k].numel()) for k in names)
        obs_norm = float(torch.sqrt(sum((tensors[k].double() ** 2).sum() for k in names))) * scale
        tol_fit = cfg.fit_tol + (cfg.noise_factor * sigma * math.sqrt(n_params) * scale / max(obs_norm, 1e-30)
                                 if sigma else 0)
        stats.update(fit_residual=fit.rel_residual, fit_integral=float(fit.integral), fit_full_rank=float(fit.full_rank),
                     fit_tol=tol_fit, fit_total=float(fit.total))
        labels = None if obs.labels is None else [int(v) for v in obs.labels.tolist()]
        if certifies(fit, b, labels, tol_fit):
            return fit, partial, None
        if not sigma:
            return None, partial, None
        # under noise the roots' continuous values are a little off: re-read them from the first layer; else
        # a decomposition into B rows (with the granted labels) is the best effort (``fallback.py``)
        ref = self._refine(obs, model, prior, names, fit, rows, b, labels, tol_fit, stats, total=True)
        ok = fit.total == b and len(fit.rows) == b and labels_match(fit, labels)
        return ref, partial, (fit if ref is None and ok else None)

    # -- main -----------------------------------------------------------------------------
    def reconstruct(self, obs: Observation, model: nn.Module, prior: TabularPrior, *,
                    generator: torch.Generator) -> Reconstruction[Tensor]:
        """Certified rows where the update determines them; TabLeak (same generator) elsewhere."""
        t0 = time.perf_counter()
        cfg = self.config
        schema = prior.schema
        b = obs.require_num_examples()
        stats: dict[str, float] = {}
        fit, partial, best = None, np.zeros((0, schema.dim)), None
        deadline = Deadline.after(cfg.time_budget)
        if obs.kind == "gradient":
            try:
                fit, partial, best = self._exact(obs, model, prior, b, stats, deadline)
            except OutOfTime:  # the rows certified so far (none in this stage) seed the fallback
                stats["exact_timeout"] = 1.0
            if fit is None and cfg.peel and not deadline.expired:
                fit2, partial2 = self._peeled(obs, model, prior, b, stats, deadline)
                fit = fit2
                partial = partial2 if fit is None and len(partial2) > len(partial) else partial
        else:
            stats["exact_status"] = 2.0  # FedAvg delta: no exactness claimed
        stats["exact_s"] = time.perf_counter() - t0
        if fit is not None:
            certified = [True] * b
            ints = [(j, 1.0 / schema.scale[j]) for (f, sl), j in zip(schema.continuous, schema.continuous_index)
                    if f.integer]
            if ints and cfg.resolution and not deadline.expired:
                res = unit_resolution(model, prior.loss_fn, observed_names(obs, model), dict(obs.tensors), fit.rows,
                                      fit.labels, np.array([st for _, st in ints]), np.array([j for j, _ in ints]),
                                      scale=sum_scale(obs, b))
                stats["unit_resolved"] = float(res.mean())
            labels = torch.as_tensor(fit.labels, dtype=torch.long)  # per row; equal to granted ones as a multiset
            rec = Reconstruction(data=torch.as_tensor(fit.rows, dtype=torch.float32), labels=labels, stats=stats,
                                 confidence=[1.0] * b,
                                 extras={"certified": certified, "status": "certified"})
        else:
            rec = fallback(self.config, obs, model, prior, generator, partial[:b], stats, best=best)
        rec.stats["certified_rows"] = float(np.mean(rec.extras["certified"])) if b else 0.0
        rec.stats["attack_s"] = time.perf_counter() - t0
        return rec


def certified_fraction(rec: Reconstruction) -> float:
    """The ``certified_rows`` metric: share of rows the attack certified exact (``extras["certified"]``)."""
    cert = (rec.extras or {}).get("certified", [])
    return float(np.mean(cert)) if len(cert) else 0.0
