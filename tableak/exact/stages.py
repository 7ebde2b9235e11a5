"""The stages of ``TabularExact`` past the first layer's rank (peeling, pattern roots or, past
``max_patterns``, the pursuit of ``pursuit.py``, the rows the roots missed) and the first-layer re-read of continuous values, with the certificate helpers shared by all
stages (``attack.py`` holds the span stage and the orchestration)."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from common.types import Observation

from ..prior import TabularPrior
from .budget import NEVER, Deadline, OutOfTime
from .peel import Peeled, all_pattern_roots, peel, rest_batch, rest_counts
from .pursuit import pursue, two_class_head
from .span import merge_near, project, row_span, unique_rows
from .verify import (find_layers, fit_counts, layer2_residual, observed_names, refine_continuous, second_inputs,
                     sum_scale)


def certifies(fit, b: int, labels: list[int] | None, tol: float) -> bool:
    """The whole-gradient certificate: integral counts summing to B, independent candidate gradients,
    residual within ``tol``, and the granted label multiset (when granted)."""
    ok = fit.integral and fit.full_rank and fit.total == b and fit.rel_residual <= tol
    return bool(ok and labels_match(fit, labels))


def labels_match(fit, labels: list[int] | None) -> bool:
    """The fit's labels equal the granted ones as a multiset (always, when labels are not granted)."""
    return labels is None or sorted(fit.labels.tolist()) == sorted(labels)


def noise_model(span, sigma: float, m: int, k: float) -> tuple[np.ndarray, float] | None:
    """``(S^-1 V^T, k sigma sqrt(m - r))`` of a span under declared noise, for ``layer2.noise_slack``."""
    if not sigma or span.rank == 0:
        return None
    return span.basis / span.singular[:span.rank, None], k * sigma * math.sqrt(max(m - span.rank, 1))


def gaussian_sigma(obs: Observation) -> float:
    return float(sum(float(d.get("sigma", 0.0)) for d in obs.defenses if d.get("name") == "gaussian"))


class PeelStages:
    """Mixin of ``TabularExact``: needs ``self.config`` and ``self._exact`` (the span stage)."""

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
        if (gaussian_sigma(obs) or layers.second is None or b > layers.second.out_features
                or any(k is None or k not in t for k in need)):
            return None, empty
        names, scale = observed_names(obs, model), sum_scale(obs, b)
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
        """The patterns left after peeling, solved on the second layer (every pattern's roots, or the
        pursuit past ``max_patterns``); the whole-gradient fit (or None). When the pattern roots do not
        certify the batch, the pursuit gets one try (a rare pattern whose roots were missed)."""
        cfg, schema = self.config, prior.schema
        layers = find_layers(model, schema.dim)
        left, cand, pursued = b - len(p.rows), np.zeros((0, schema.dim)), False
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
                if roots is None:  # too many patterns (German B = 64): greedy descent with deflation
                    roots, pursued = self._pursuit(model, layers, schema, cur, present, left, stats, deadline), True
                if roots is not None and len(roots):
                    rows = unique_rows(schema, project(schema, roots))
                    res2 = layer2_residual(second_inputs(model, layers.second, rows), span2.basis)
                    cand = merge_near(schema, rows[res2 <= cfg.peel_tol], res2[res2 <= cfg.peel_tol], keep=0)
                fit = self._fit_left(obs, model, prior, b, stats, p, names, scale, labels, deadline, cand, left)
                if fit is None and not pursued and not deadline.expired:
                    more = self._pursuit(model, layers, schema, cur, present, left, stats, deadline)
                    if more is not None and len(more):
                        rows = unique_rows(schema, project(schema, more))
                        res2 = layer2_residual(second_inputs(model, layers.second, rows), span2.basis)
                        more = merge_near(schema, rows[res2 <= cfg.peel_tol], res2[res2 <= cfg.peel_tol], keep=0)
                        both = unique_rows(schema, np.concatenate([cand, more]))  # roots of both searches
                        stats["pursuit_rescue"] = 1.0
                        fit = self._fit_left(obs, model, prior, b, stats, p, names, scale, labels, deadline, both, left)
                return fit
        return self._fit_left(obs, model, prior, b, stats, p, names, scale, labels, deadline, cand, left)

    def _fit_left(self, obs: Observation, model: nn.Module, prior: TabularPrior, b: int, stats: dict, p: Peeled,
                  names: list[str], scale: float, labels: list[int] | None, deadline: Deadline, cand: np.ndarray,
                  left: int):
        """Peeled rows and candidates ``cand`` for the ``left`` rows after peeling: the residual fit, the
        rows it misses through the span stage, and the whole-gradient fit (certified or None)."""
        cfg, schema, t = self.config, prior.schema, obs.tensors
        layers = find_layers(model, schema.dim)
        n_cls = len(schema.classes)
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
        ok = certifies(fit, b, labels, cfg.fit_tol)
        stats.update(fit_residual=fit.rel_residual, fit_integral=float(fit.integral), fit_full_rank=float(fit.full_rank))
        if not ok:  # peeled rows and roots carry the second-layer span's imprecision
            fit = self._refine(obs, model, prior, names, fit, rows, b, labels, cfg.fit_tol, stats)
            ok = fit is not None
        return fit if ok else None

    def _pursuit(self, model: nn.Module, layers, schema, cur: dict, present: np.ndarray, left: int, stats: dict,
                 deadline: Deadline) -> np.ndarray | None:
        """Rows found by ``pursuit.pursue`` on the second-layer gradient left after peeling (two-class
        ReLU networks with a hidden second layer only), or None."""
        cfg = self.config
        v = two_class_head(model, layers.second)
        if not cfg.pursuit or v is None:
            return None
        lin = [layers.first, layers.second]
        w1, b1, w2, b2 = (t.detach().double().cpu().numpy() for m in lin for t in (m.weight, m.bias))
        present = present.copy()
        present[schema.continuous_index] = True
        pu = pursue(schema, w1, b1, w2, b2, v, cur[layers.second_weight], present, left, rank_tol=cfg.rank_tol,
                    tol=cfg.peel_tol, starts=cfg.pursuit_starts, rounds=cfg.pursuit_rounds, seed=cfg.pursuit_seed,
                    deadline=deadline)
        stats.update(pursuit_rows=float(len(pu.rows)), pursuit_starts=float(pu.starts), pursuit_rounds=float(pu.rounds),
                     pursuit_rank_left=float(pu.rank_left))
        deadline.check()
        return pu.rows

    def _refine(self, obs: Observation, model: nn.Module, prior: TabularPrior, names: list[str], fit, rows: np.ndarray,
                b: int, labels: list[int] | None, tol: float, stats: dict, *, total: bool = False):
        """Categories and labels found (the fit's rounded counts sum to B), continuous values off: re-read
        them linearly from the first layer (``verify.refine_continuous``, two classes, B <= its width) and
        fit again. Returns the certified fit or None."""
        schema, t, n_cls = prior.schema, obs.tensors, len(prior.schema.classes)
        layers = find_layers(model, schema.dim)
        if fit.coef is None or n_cls != 2 or b > layers.first.out_features or layers.first_bias not in t:
            return None
        counts = np.maximum(np.rint(fit.coef), 0).astype(int)
        stats["refine_total"] = float(counts.sum())
        if counts.sum() != b:
            return None
        scale = sum_scale(obs, b)
        used = np.flatnonzero(counts)
        guess = np.repeat(rows[used // n_cls], counts[used], 0)
        glab = np.repeat(used % n_cls, counts[used])
        w1t, b1t = (t[k].detach().double().cpu().numpy() * scale for k in (layers.first_weight, layers.first_bias))
        for _ in range(2):  # the second read starts from the first one's ReLU patterns
            guess = refine_continuous(model, layers.first, w1t, b1t, guess, glab, schema,
                                      project=lambda r: project(schema, r))
        fit2 = fit_counts(model, prior.loss_fn, names, dict(t), unique_rows(schema, guess), n_cls, batch_size=b,
                          scale=scale, integer_tol=self.config.integer_tol, total=total)
        ok = certifies(fit2, b, labels, tol)
        stats.update(refined=float(ok), refined_residual=fit2.rel_residual)
        return fit2 if ok else None

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
        sub_fit, sub_partial, _ = self._exact(sub_obs, model, prior, rest, {}, deadline)
        return sub_fit.rows if sub_fit is not None else sub_partial
