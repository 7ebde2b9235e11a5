"""Second-layer filter and the whole-gradient least-squares certificate.

* ``Layers``: the model's first ``nn.Linear`` (the one reading the encoded row, found by identity
  among the modules, its parameter names from ``named_parameters``) and, where present, the next
  ``nn.Linear`` reading the first one's width; its input on a candidate row is captured with a
  forward hook, so any activation in between works.
* ``layer2_residual``: a true row's second-layer input lies in the row space of the second
  weight gradient (rank <= B < width); affine recombinations of rows do not survive the ReLU.
* ``fit_counts``: the observed gradient (times B under mean reduction) must equal
  ``sum_u k_u grad l(x_u, y)`` over candidate rows and both labels with non-negative integer
  counts ``k``. A fit with residual ~0, near-integer counts summing to B and full column rank is
  the certificate: it fixes every row, its multiplicity (duplicates) and its label.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import nnls
from torch import nn

from common.types import Batch


@dataclass
class Layers:
    first: nn.Linear
    first_weight: str
    first_bias: str | None
    second: nn.Linear | None
    second_weight: str | None


def find_layers(model: nn.Module, dim: int) -> Layers:
    """The first Linear reading ``dim`` features and the next Linear reading its output (or None)."""
    names = {id(p): n for n, p in model.named_parameters()}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    first = next((m for m in linears if m.in_features == dim), None)
    if first is None:
        raise ValueError(f"tabular-exact needs a model whose first layer is nn.Linear({dim}, ...); none found")
    rest = linears[linears.index(first) + 1:]
    second = next((m for m in rest if m.in_features == first.out_features), None)
    return Layers(first, names[id(first.weight)], names[id(first.bias)] if first.bias is not None else None,
                  second, names[id(second.weight)] if second is not None else None)


def second_inputs(model: nn.Module, layer: nn.Linear, x: np.ndarray) -> np.ndarray:
    """The input of ``layer`` when ``model`` runs on rows ``x`` (float64 copy; forward hook)."""
    m64 = copy.deepcopy(model).cpu().double().eval()
    target = dict(model.named_modules())
    key = next(k for k, v in target.items() if v is layer)
    box: list[torch.Tensor] = []
    h = dict(m64.named_modules())[key].register_forward_hook(lambda mod, inp, out: box.append(inp[0].detach()))
    try:
        with torch.no_grad():
            m64(torch.as_tensor(x, dtype=torch.float64))
    finally:
        h.remove()
    return box[0].numpy()


def layer2_residual(a: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Relative distance of each row of ``a`` to the row space ``basis`` (orthonormal rows)."""
    res = a - (a @ basis.T) @ basis
    return np.linalg.norm(res, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-12)


def _per_example(model: nn.Module, loss_fn, names: list[str], x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per-example gradients as columns [P, n], one small backward pass each (cheaper than a
    ``torch.func.vmap`` program for the few hundred rows a fit needs)."""
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    cols = []
    for i in range(len(x)):
        loss = loss_fn(model, Batch({"x": x[i:i + 1]}, y[i:i + 1])).sum()
        cols.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(cols, 1).detach().numpy()


@dataclass
class Fit:
    rows: np.ndarray  # [n, d] one entry per example (duplicates repeated)
    labels: np.ndarray  # [n]
    rel_residual: float
    integral: bool  # every count within the integer tolerance
    full_rank: bool  # the candidate gradients are linearly independent (unique decomposition)
    total: int  # sum of rounded counts
    coef: np.ndarray | None = None  # [K * n_classes] raw non-negative counts (candidate-major, then label)
    columns: np.ndarray | None = None  # [P, K * n_classes] the per-example gradients the counts weigh


def fit_counts(model: nn.Module, loss_fn, names: list[str], target: dict[str, torch.Tensor], cands: np.ndarray,
               n_classes: int, *, batch_size: int, scale: float, integer_tol: float) -> Fit:
    """Non-negative least squares of the observed gradient on per-example candidate gradients."""
    m64 = copy.deepcopy(model).cpu().double().eval()
    k = len(cands)
    x = torch.as_tensor(np.repeat(cands, n_classes, 0), dtype=torch.float64)
    y = torch.arange(n_classes).repeat(k)
    gam = _per_example(m64, loss_fn, names, x, y)  # [P, 2K]
    obs = torch.cat([target[n].double().reshape(-1) for n in names]).numpy() * scale
    norms = np.linalg.norm(gam, axis=0)
    norms[norms == 0] = 1.0
    coef, _ = nnls(gam / norms, obs, maxiter=50 * gam.shape[1])
    coef = coef / norms
    resid = float(np.linalg.norm(gam @ coef - obs) / max(np.linalg.norm(obs), 1e-30))
    counts = np.rint(coef).astype(int)
    integral = bool(np.all(np.abs(coef - counts) <= integer_tol))
    used = np.flatnonzero(counts > 0)
    # cross-entropy: the n_classes label columns of one row span n_classes - 1 directions (softmax
    # minus one-hot sums to 0), so uniqueness is checked on labels 0..n-2 of every candidate
    gn = (gam / norms).reshape(gam.shape[0], k, n_classes)[:, :, :max(n_classes - 1, 1)].reshape(gam.shape[0], -1)
    full_rank = bool(np.linalg.eigvalsh(gn.T @ gn).min() > 1e-10)
    if counts.sum() != batch_size:  # not a decomposition into B rows (e.g. a huge count on a tiny gradient)
        return Fit(np.zeros((0, cands.shape[1])), np.zeros(0, dtype=int), resid, False, full_rank, int(counts.sum()),
                   coef, gam)
    rows = np.repeat(cands[used // n_classes], counts[used], 0) if len(used) else np.zeros((0, cands.shape[1]))
    labels = np.repeat(used % n_classes, counts[used]) if len(used) else np.zeros(0, dtype=int)
    return Fit(rows, labels, resid, integral, full_rank, int(counts.sum()), coef, gam)


def unit_resolution(model: nn.Module, loss_fn, names: list[str], target: dict[str, torch.Tensor], rows: np.ndarray,
                    labels: np.ndarray, steps: np.ndarray, columns: np.ndarray, *, scale: float,
                    margin: float = 3.0) -> np.ndarray:
    """Per row and continuous column: does the gradient tell the value from its neighbour one unit
    away? The certified decomposition leaves the residual ``r = obs - sum_i grad(x_i, y_i)``; swapping
    row ``i`` for its neighbour (``x_i`` moved by ``steps[c]`` along column ``columns[c]``,
    standardised) leaves ``r - (grad(x_i') - grad(x_i))``. The value is resolved when that residual
    is more than ``margin`` times ``||r||`` (both decompositions have integer counts, so this is the
    closest single-row alternative); for Adult's fnlwgt one unit is about 1e-5 standard deviations and
    sits at float32 resolution. Returns bool [n, len(columns)] (both neighbours, +1 and -1)."""
    m64 = copy.deepcopy(model).cpu().double().eval()
    obs = torch.cat([target[n].double().reshape(-1) for n in names]).numpy() * scale
    x = torch.as_tensor(rows, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    base = _per_example(m64, loss_fn, names, x, y)  # [P, n]
    r = obs - base.sum(1)
    floor = margin * max(float(np.linalg.norm(r)), 1e-300)
    out = np.ones((len(rows), len(columns)), dtype=bool)
    for k, (c, st) in enumerate(zip(columns, steps)):
        for sign in (1.0, -1.0):
            xs = x.clone()
            xs[:, c] += sign * st
            d = _per_example(m64, loss_fn, names, xs, y) - base
            out[:, k] &= np.linalg.norm(r[:, None] - d, axis=0) > floor
    return out
