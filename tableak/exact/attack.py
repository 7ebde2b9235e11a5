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
from common.functional import trainable_params
from common.matching import assignment
from common.threat import Capability
from common.types import Observation, Reconstruction

from ..attack import CITATION as TABLEAK_CITATION
from ..attack import TabLeak, TabLeakConfig
from ..prior import TabularPrior
from .budget import NEVER, Deadline, OutOfTime
from .layer2 import two_pass_roots
from .peel import Peeled, all_pattern_roots, peel, rest_batch, rest_counts
from .span import FREE_TOL, enumerate_rows, free_continuous, merge_near, project, row_span, unique_rows
from .verify import find_layers, fit_counts, layer2_residual, refine_continuous, second_inputs, unit_resolution

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
        "time_budget": ">0"}
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
    noise_factor: float = 4.0  # declared Gaussian noise: thresholds widened by this many noise standard deviations
    peel: bool = True  # past the first layer's rank: peel rows of categories seen once, then all patterns on layer 2
    act_tol: float = 1e-4  # a first-layer unit is off for a row when its gradient entry is this small (relative)
    peel_tol: float = 1e-2  # relative second-layer residual of a peeled row / of a pattern root
    g_tol: float = 1e-3  # relative error of a peeled row's own first-layer gradient against its category column
    max_patterns: int = 160_000  # patterns left after peeling that the root search tries (beyond: fall back)
    resolution: bool = True  # report ``unit_resolved``: certified values the gradient tells from their +-1 neighbour
    rest_max: int = 24  # rows the pattern roots miss that the span stage may take as a batch of their own
    time_budget: float = 300.0  # seconds of exact stage; past them: the fallback, seeded with the rows certified so far
    fallback: Literal["tableak", "none"] = "tableak"  # rows not certified: TabLeak (rows overwritten by certified ones)
    fallback_iterations: int = 1500
    fallback_ensemble: int = 30


def _certifies(fit, b: int, labels: list[int] | None, tol: float) -> bool:
    """The whole-gradient certificate: integral counts summing to B, independent candidate gradients,
    residual within ``tol``, and the granted label multiset (when granted)."""
    ok = fit.integral and fit.full_rank and fit.total == b and fit.rel_residual <= tol
    return bool(ok and (labels is None or sorted(fit.labels.tolist()) == sorted(labels)))


def _gaussian_sigma(obs: Observation) -> float:
    return float(sum(float(d.get("sigma", 0.0)) for d in obs.defenses if d.get("name") == "gaussian"))


class TabularExact:
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
       (Hungarian on the feature error). With no certified row the output is TabLeak's.

    Deviations from SPEAR: no sampling of sparse directions in the gradient's column space (the
    categorical structure identifies rows directly), no ReLU sign assumptions; from DAGER: the
    candidate pool is the set of valid table rows, not the vocabulary. Declared Gaussian noise
    (a public defense) widens every threshold by ``noise_factor`` noise deviations; there the
    certificate is relative to the declared noise model.
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
        """(all rows certified: Fit or None, partially certified distinct rows [n, d])."""
        cfg = self.config
        schema = prior.schema
        empty = np.zeros((0, schema.dim))
        layers = find_layers(model, schema.dim)
        tensors = obs.tensors
        if layers.first_weight not in tensors:
            stats["exact_status"] = 1.0  # first layer not observed
            return None, empty
        dw = tensors[layers.first_weight].detach().double().cpu().numpy()
        sigma = _gaussian_sigma(obs)
        h, d = dw.shape
        floor = cfg.noise_factor * sigma * (math.sqrt(h) + math.sqrt(d))
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
            return None, empty
        # float rounding tilts weakly determined span directions by about eps * s_1 / s_r: tolerances
        # grow with the conditioning beyond ``cond_ref`` (trained models: confident rows have tiny gradients)
        cond1 = max(1.0, span.singular[0] / span.singular[span.rank - 1] / cfg.cond_ref)
        tol = cfg.span_tol * cond1 + (cfg.noise_factor * floor / span.singular[span.rank - 1] * math.sqrt(d) if sigma else 0)
        # declared noise tilts the span by about floor / s_r: a continuous direction inside it looks that far out
        free_tol = max(FREE_TOL, 2 * floor / span.singular[span.rank - 1])
        free = free_continuous(schema, span, free_tol=free_tol)
        stats["free_continuous"] = float(free.shape[1])
        span2, tol2, strict2 = None, 0.0, 0.0
        # the second layer's inputs span its weight gradient's row space only when their output-side
        # factors (B vectors of its width) are independent: B <= its width (not the 2-class output layer)
        if layers.second is not None and layers.second_weight in tensors and b <= layers.second.out_features:
            dw2 = tensors[layers.second_weight].detach().double().cpu().numpy()
            floor2 = cfg.noise_factor * sigma * (math.sqrt(dw2.shape[0]) + math.sqrt(dw2.shape[1]))
            span2 = row_span(dw2, max_rank=b, rel_tol=cfg.rank_tol, floor=floor2)
            if 0 < span2.rank < dw2.shape[1]:
                strict2 = cfg.layer2_tol + (cfg.noise_factor * floor2 / span2.singular[span2.rank - 1] if sigma else 0)
                cond2 = max(1.0, span2.singular[0] / span2.singular[span2.rank - 1] / cfg.cond_ref)
                tol2 = strict2 + cfg.layer2_tol * (cond2 - 1)
            else:
                span2 = None  # the second layer's span is not informative (e.g. it is the 2-class output)
        accept = None
        if span2 is not None and not free.shape[1]:  # continuous values pinned: filter on layer 2 while enumerating
            def accept(rows: np.ndarray) -> np.ndarray:
                return layer2_residual(second_inputs(model, layers.second, rows), span2.basis) <= tol2
        cand = enumerate_rows(schema, span, present, tol=tol, free_tol=free_tol, max_half=cfg.max_half,
                              max_candidates=cfg.max_candidates, accept=accept, deadline=deadline)
        stats.update(combinations=float(cand.combos), layer1_candidates=float(len(cand.rows)),
                     truncated=float(cand.truncated), continuous_identified=float(span.cont_identified))
        if cand.truncated:  # rank limit: too many valid rows in the span to identify the batch
            return None, empty
        layer2 = span2 is not None
        if free.shape[1] and layer2 and len(cand.raw_rows):  # rows share categorical patterns: layer 2 solves them
            w1 = layers.first.weight.detach().double().cpu().numpy()
            b1 = layers.first.bias.detach().double().cpu().numpy() if layers.first.bias is not None else np.zeros(h)
            lo, hi = (v.double().numpy()[ci] for v in schema.bounds())
            y0 = cand.raw_rows
            found, n_hit = two_pass_roots((y0[i:i + 2000] for i in range(0, len(y0), 2000)), free, w1, b1,
                                          span2.basis, lo, hi, ci, starts=cfg.pass1_starts, more_starts=cfg.starts,
                                          tol=tol2, deadline=deadline)
            rows = unique_rows(schema, project(schema, found))
            stats["layer2_patterns"] = float(n_hit)
        else:
            rows = unique_rows(schema, cand.rows)
        strict = np.ones(len(rows), dtype=bool)
        if len(rows) and layer2:
            res2 = layer2_residual(second_inputs(model, layers.second, rows), span2.basis)
            rows, strict = rows[res2 <= tol2], res2[res2 <= tol2] <= strict2
        stats["layer2_candidates"] = float(len(rows))
        stats["layer2_used"] = float(layer2)
        sound = (span.cont_identified or layer2) and not cand.truncated
        # rows passing both span checks are certified one by one only without noise and when they
        # are not more than B (under declared noise only the whole-gradient certificate counts)
        # (and within the unscaled second-layer tolerance)
        partial = rows[strict] if (sound and layer2 and not sigma and len(rows) <= b) else empty
        if not sound or len(rows) == 0 or len(rows) > cfg.max_fit:
            return None, partial
        params = trainable_params(model)
        names = [k for k in tensors if k in params]
        reduction = obs.protocol.loss_reduction if obs.protocol else "mean"
        n_cls = len(schema.classes)
        fit = fit_counts(model, prior.loss_fn, names, dict(tensors), rows, n_cls, batch_size=b,
                         scale=float(b) if reduction == "mean" else 1.0, integer_tol=cfg.integer_tol)
        n_params = sum(int(tensors[k].numel()) for k in names)
        obs_norm = float(torch.sqrt(sum((tensors[k].double() ** 2).sum() for k in names))) * (b if reduction == "mean" else 1)
        tol_fit = cfg.fit_tol + (cfg.noise_factor * sigma * math.sqrt(n_params) * (b if reduction == "mean" else 1)
                                 / max(obs_norm, 1e-30) if sigma else 0)
        stats.update(fit_residual=fit.rel_residual, fit_integral=float(fit.integral), fit_full_rank=float(fit.full_rank))
        ok = _certifies(fit, b, None if obs.labels is None else [int(v) for v in obs.labels.tolist()], tol_fit)
        return (fit if ok else None), partial

    def _peeled(self, obs: Observation, model: nn.Module, prior: TabularPrior, b: int, stats: dict,
                deadline: Deadline = NEVER) -> tuple:
        """Past the first layer's rank (``peel.py``): rows of categories seen once are peeled off the
        gradient, the patterns left are solved on the second layer, and the whole-gradient fit over
        peeled rows and pattern roots certifies the batch. Without declared noise only."""
        cfg = self.config
        schema = prior.schema
        empty = np.zeros((0, schema.dim))
        layers = find_layers(model, schema.dim)
        t = obs.tensors
        need = (layers.first_weight, layers.first_bias, layers.second_weight)
        if (_gaussian_sigma(obs) or layers.second is None or b > layers.second.out_features
                or any(k is None or k not in t for k in need)):
            return None, empty
        params = trainable_params(model)
        names = [k for k in t if k in params]
        reduction = obs.protocol.loss_reduction if obs.protocol else "mean"
        scale = float(b) if reduction == "mean" else 1.0
        target = {k: t[k].detach().double().cpu().numpy() * scale for k in names}
        n_cls = len(schema.classes)
        labels = None if obs.labels is None else [int(v) for v in obs.labels.tolist()]
        p = peel(model, layers, prior.loss_fn, names, target, schema, b, n_cls, labels=labels, rank_tol=cfg.rank_tol,
                 present_tol=cfg.present_tol, act_tol=cfg.act_tol, tol=cfg.peel_tol, layer2_tol=cfg.peel_tol,
                 g_tol=cfg.g_tol, max_half=cfg.max_half, stop_at=0, deadline=deadline)
        stats.update(peeled_rows=float(len(p.rows)), peel_rounds=float(p.rounds))
        try:
            return self._after_peel(obs, model, prior, b, stats, p, names, scale, labels, deadline), p.rows
        except OutOfTime:
            stats["exact_timeout"] = 1.0
            return None, p.rows

    def _after_peel(self, obs: Observation, model: nn.Module, prior: TabularPrior, b: int, stats: dict, p: Peeled,
                    names: list[str], scale: float, labels: list[int] | None, deadline: Deadline):
        """The patterns left after peeling, solved on the second layer; the whole-gradient fit (or None)."""
        cfg, schema, t = self.config, prior.schema, obs.tensors
        layers = find_layers(model, schema.dim)
        n_cls = len(schema.classes)
        left, cand = b - len(p.rows), np.zeros((0, schema.dim))
        if left > 0:
            cur = p.target
            raw = cur[layers.first_weight] * np.asarray(schema.scale) + np.outer(cur[layers.first_bias], schema.mean)
            norms = np.linalg.norm(raw, axis=0)
            norms[schema.continuous_index] = 0.0
            present = norms > cfg.present_tol * norms.max()
            span2 = row_span(cur[layers.second_weight], max_rank=left, rel_tol=cfg.rank_tol)
            h = layers.first.out_features
            if 0 < span2.rank < h:
                w1 = layers.first.weight.detach().double().cpu().numpy()
                b1 = layers.first.bias.detach().double().cpu().numpy()
                roots = all_pattern_roots(schema, present, w1, b1, span2.basis, starts=cfg.pass1_starts,
                                          more_starts=cfg.starts, tol=cfg.peel_tol, max_patterns=cfg.max_patterns,
                                          deadline=deadline)
                if roots is not None and len(roots):
                    rows = unique_rows(schema, project(schema, roots))
                    res2 = layer2_residual(second_inputs(model, layers.second, rows), span2.basis)
                    cand = merge_near(schema, rows[res2 <= cfg.peel_tol], res2[res2 <= cfg.peel_tol], keep=0)
            stats["peel_candidates"] = float(len(cand))
        if 0 < len(cand) <= cfg.max_fit and left > 0:
            # a root the search missed (a rare shared pattern): the rows the residual fit counts as whole
            # are subtracted and the few rows left go to the span stage as a batch of their own
            left_t = {k: torch.as_tensor(v) for k, v in p.target.items()}
            rfit = fit_counts(model, prior.loss_fn, names, left_t, cand, n_cls, batch_size=left, scale=1.0,
                              integer_tol=cfg.integer_tol)
            if not (rfit.integral and rfit.rel_residual <= cfg.fit_tol):
                extra = [self._rest(obs, model, prior, names, p, rfit, left, rule, stats, deadline)
                         for rule in ("sure", "round")]
                cand = np.concatenate([cand] + extra)
                stats["peel_rest_found"] = float(sum(len(e) for e in extra))
        rows = unique_rows(schema, np.concatenate([p.rows, cand]))
        if len(rows) > 1:  # two roots of one row that round to neighbouring values: keep the better one
            full2 = row_span(t[layers.second_weight].detach().double().cpu().numpy(), max_rank=b, rel_tol=cfg.rank_tol)
            rows = merge_near(schema, rows, layer2_residual(second_inputs(model, layers.second, rows), full2.basis),
                              keep=len(p.rows))
        if not len(rows) or len(rows) > cfg.max_fit:
            return None
        fit = fit_counts(model, prior.loss_fn, names, dict(t), rows, n_cls, batch_size=b, scale=scale,
                         integer_tol=cfg.integer_tol)
        ok = _certifies(fit, b, labels, cfg.fit_tol)
        stats.update(fit_residual=fit.rel_residual, fit_integral=float(fit.integral), fit_full_rank=float(fit.full_rank))
        if not ok and fit.coef is not None and n_cls == 2 and b <= layers.first.out_features:
            # categories and labels found, continuous values off (peeled rows and roots carry the
            # second-layer span's imprecision): re-read them linearly from the first layer
            counts = np.maximum(np.rint(fit.coef), 0).astype(int)
            stats["refine_total"] = float(counts.sum())
            if counts.sum() == b:
                used = np.flatnonzero(counts)
                guess = np.repeat(rows[used // n_cls], counts[used], 0)
                glab = np.repeat(used % n_cls, counts[used])
                w1t, b1t = (t[k].detach().double().cpu().numpy() * scale for k in (layers.first_weight, layers.first_bias))
                for _ in range(2):  # the second read starts from the first one's ReLU patterns
                    guess = refine_continuous(model, layers.first, w1t, b1t, guess, glab, schema,
                                              project=lambda r: project(schema, r))
                rows2 = unique_rows(schema, guess)
                fit2 = fit_counts(model, prior.loss_fn, names, dict(t), rows2, n_cls, batch_size=b, scale=scale,
                                  integer_tol=cfg.integer_tol)
                ok = _certifies(fit2, b, labels, cfg.fit_tol)
                stats.update(refined=float(ok), refined_residual=fit2.rel_residual)
                fit = fit2 if ok else fit
        return fit if ok else None

    def _rest(self, obs: Observation, model: nn.Module, prior: TabularPrior, names: list[str], p, rfit, left: int,
              rule: str, stats: dict, deadline: Deadline) -> np.ndarray:
        """Rows the pattern roots missed: the rows ``peel.rest_counts`` takes as whole are subtracted
        from the gradient left after peeling and the few rows left (at most ``rest_max``) go through
        the span stage as a batch of their own. Returns the rows it found (certified or partial)."""
        cfg, schema = self.config, prior.schema
        n_cls = len(schema.classes)
        counts = rest_counts(rfit.coef, n_cls, integer_tol=cfg.integer_tol, rule=rule)
        rest = left - int(counts.sum())
        stats[f"peel_rest_{rule}"] = float(rest)
        if not 0 < rest <= cfg.rest_max:
            return np.zeros((0, schema.dim))
        sub_obs = rest_batch(obs, names, p, rfit.columns @ counts, counts, n_cls, rest)
        sub_fit, sub_partial = self._exact(sub_obs, model, prior, rest, {}, deadline)
        return sub_fit.rows if sub_fit is not None else sub_partial

    # -- main -----------------------------------------------------------------------------
    def reconstruct(self, obs: Observation, model: nn.Module, prior: TabularPrior, *,
                    generator: torch.Generator) -> Reconstruction[Tensor]:
        """Certified rows where the update determines them; TabLeak (same generator) elsewhere."""
        t0 = time.perf_counter()
        cfg = self.config
        schema = prior.schema
        b = obs.require_num_examples()
        stats: dict[str, float] = {}
        fit, partial = (None, np.zeros((0, schema.dim)))
        deadline = Deadline.after(cfg.time_budget)
        if obs.kind == "gradient":
            try:
                fit, partial = self._exact(obs, model, prior, b, stats, deadline)
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
                names = [k for k in obs.tensors if k in trainable_params(model)]
                red = obs.protocol.loss_reduction if obs.protocol else "mean"
                res = unit_resolution(model, prior.loss_fn, names, dict(obs.tensors), fit.rows, fit.labels,
                                      np.array([st for _, st in ints]), np.array([j for j, _ in ints]),
                                      scale=float(b) if red == "mean" else 1.0)
                stats["unit_resolved"] = float(res.mean())
            labels = torch.as_tensor(fit.labels, dtype=torch.long)  # per row; equal to granted ones as a multiset
            rec = Reconstruction(data=torch.as_tensor(fit.rows, dtype=torch.float32), labels=labels, stats=stats,
                                 confidence=[1.0] * b,
                                 extras={"certified": certified, "status": "certified"})
        else:
            rec = self._fallback(obs, model, prior, generator, partial[:b], stats)
        rec.stats["certified_rows"] = float(np.mean(rec.extras["certified"])) if b else 0.0
        rec.stats["attack_s"] = time.perf_counter() - t0
        return rec

    def _fallback(self, obs, model, prior: TabularPrior, generator, partial: np.ndarray, stats) -> Reconstruction:
        cfg = self.config
        schema = prior.schema
        b = obs.require_num_examples()
        if cfg.fallback == "none":
            data = np.zeros((b, schema.dim))
            data[:len(partial)] = partial
            data[len(partial):] = schema.encode_arrays(*schema.decode_arrays(np.zeros((b - len(partial), schema.dim))))
            cert = [i < len(partial) for i in range(b)]
            return Reconstruction(data=torch.as_tensor(data, dtype=torch.float32), labels=None, stats=stats,
                                  confidence=[float(c) for c in cert], extras={"certified": cert, "status": "partial"})
        tl = TabLeak(TabLeakConfig(iterations=cfg.fallback_iterations, ensemble=cfg.fallback_ensemble))
        rec = tl.reconstruct(obs, model, prior, generator=generator)
        data = rec.data.clone()
        cert = [False] * b
        if len(partial):
            pc, pn = schema.decode_arrays(partial)
            tc, tn = schema.decode_arrays(data)
            cost = schema.feature_errors(tc, tn, pc, pn).mean(-1)  # [B TabLeak rows, n certified]
            for i, j in enumerate(assignment(cost)):  # certified row i replaces TabLeak row j
                data[j] = torch.as_tensor(partial[i], dtype=data.dtype)
                cert[j] = True
        for key in ("entropy_cat", "entropy_cont"):
            if key in rec.extras:
                ent = np.array(rec.extras[key], copy=True)
                ent[np.asarray(cert, dtype=bool)] = 0.0
                rec.extras[key] = ent
        rec.extras.update(certified=cert, status="tableak" if not any(cert) else "partial+tableak")
        conf = list(rec.confidence) if rec.confidence else [0.0] * b
        rec.confidence = [1.0 if c else v for c, v in zip(cert, conf)]
        rec.stats.update({k: v for k, v in stats.items()})
        rec.stats.update(fallback=1.0, tableak_s=rec.stats.get("attack_s", 0.0))
        rec.data = data
        return rec


def certified_fraction(rec: Reconstruction) -> float:
    """The ``certified_rows`` metric: share of rows the attack certified exact (``extras["certified"]``)."""
    cert = (rec.extras or {}).get("certified", [])
    return float(np.mean(cert)) if len(cert) else 0.0
