"""The fallback of ``TabularExact``: TabLeak seeded with the certified rows, or a best-effort decomposition.

* Rows certified one by one (``partial``) overwrite the TabLeak rows they match (Hungarian on the
  feature error); with no certified row the output is TabLeak's (same generator).
* ``best``: under declared noise, a whole-gradient fit with integral counts summing to B whose
  residual is above the noise tolerance (the roots' continuous values a little off) is not a
  certificate, but it is usually far closer to the batch than TabLeak's rows. It replaces TabLeak's
  output only when its relative gradient residual (non-negative counts summing to B, ``verify.fit_counts``)
  is below that of TabLeak's own rows under the same fit, i.e. only when it explains the observed
  update better; its rows are never marked certified (status ``best-effort``).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common.matching import assignment
from common.types import Observation, Reconstruction

from ..attack import TabLeak, TabLeakConfig
from ..prior import TabularPrior
from .span import unique_rows
from .verify import Fit, fit_counts, observed_names, sum_scale


def _residual(obs: Observation, model: nn.Module, prior: TabularPrior, rows: np.ndarray, b: int) -> float:
    fit = fit_counts(model, prior.loss_fn, observed_names(obs, model), dict(obs.tensors), unique_rows(prior.schema, rows),
                     len(prior.schema.classes), batch_size=b, scale=sum_scale(obs, b), integer_tol=0.5, total=True)
    return fit.rel_residual


def fallback(cfg, obs: Observation, model: nn.Module, prior: TabularPrior, generator: torch.Generator,
             partial: np.ndarray, stats: dict, *, best: Fit | None = None) -> Reconstruction:
    """TabLeak (``cfg.fallback_iterations``, ``cfg.fallback_ensemble``) with the certified rows
    ``partial`` [n, d] in place of the TabLeak rows they match, or the ``best`` decomposition when it
    explains the update better than TabLeak's rows (``cfg.fallback == "none"``: ``best`` or the
    certified rows and the decoded zero row)."""
    schema = prior.schema
    b = obs.require_num_examples()
    best = best if (best is not None and len(best.rows) == b and not len(partial)) else None
    if cfg.fallback == "none":
        if best is not None:
            return _best_effort(best, stats)
        data = np.zeros((b, schema.dim))
        data[:len(partial)] = partial
        data[len(partial):] = schema.encode_arrays(*schema.decode_arrays(np.zeros((b - len(partial), schema.dim))))
        cert = [i < len(partial) for i in range(b)]
        return Reconstruction(data=torch.as_tensor(data, dtype=torch.float32), labels=None, stats=stats,
                              confidence=[float(c) for c in cert], extras={"certified": cert, "status": "partial"})
    tl = TabLeak(TabLeakConfig(iterations=cfg.fallback_iterations, ensemble=cfg.fallback_ensemble))
    rec = tl.reconstruct(obs, model, prior, generator=generator)
    if best is not None:
        theirs = _residual(obs, model, prior, rec.data.double().numpy(), b)
        stats.update(best_residual=best.rel_residual, tableak_residual=theirs)
        if best.rel_residual < theirs:
            stats.update(fallback=1.0, tableak_s=rec.stats.get("attack_s", 0.0))
            return _best_effort(best, stats)
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


def _best_effort(best: Fit, stats: dict) -> Reconstruction:
    b = len(best.rows)
    stats["best_effort"] = 1.0
    return Reconstruction(data=torch.as_tensor(best.rows, dtype=torch.float32),
                          labels=torch.as_tensor(best.labels, dtype=torch.long), stats=stats, confidence=[0.0] * b,
                          extras={"certified": [False] * b, "status": "best-effort"})
