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

from common.functional import trainable_params
from common.types import Batch, Observation


def observed_names(obs: Observation, model: nn.Module) -> list[str]:
    """The observed tensors that are trainable parameters of ``model``, in the observation's order."""
    params = trainable_params(model)
    return [k for k in obs.tensors if k in params]


def sum_scale(obs: Observation, b: int) -> float:
    """The factor that turns the observed gradient into the sum of the ``b`` per-example gradients
    (``b`` under mean reduction, 1 under sum)."""
    return float(b) if (obs.protocol.loss_reduction if obs.protocol else "mean") == "mean" else 1.0


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
               n_classes: int, *, batch_size: int, scale: float, integer_tol: float, total: bool = False) -> Fit:
    """Non-negative least squares of the observed gradient on per-example candidate gradients.
    ``total``: the counts are also asked to sum to ``batch_size`` (one more equation, weighted like
    the gradient; under declared noise a row whose gradient is below the noise gets its count from
    it instead of soaking up noise). The reported residual is the gradient's alone."""
    m64 = copy.deepcopy(model).cpu().double().eval()
    k = len(cands)
    x = torch.as_tensor(np.repeat(cands, n_classes, 0), dtype=torch.float64)
    y = torch.arange(n_classes).repeat(k)
    gam = _per_example(m64, loss_fn, names, x, y)  # [P, 2K]
    obs = torch.cat([target[n].double().reshape(-1) for n in names]).cpu().numpy() * scale
    norms = np.linalg.norm(gam, axis=0)
    norms[norms == 0] = 1.0
    mat, rhs = gam / norms, obs
    if total:
        lam = np.linalg.norm(obs) / batch_size
        mat, rhs = np.vstack([mat, lam / norms[None]]), np.append(obs, lam * batch_size)
    coef, _ = nnls(mat, rhs, maxiter=50 * gam.shape[1])
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
    obs = torch.cat([target[n].double().reshape(-1) for n in names]).cpu().numpy() * scale
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



def _unit_directions(model: nn.Module, first: nn.Linear, x: np.ndarray) -> np.ndarray:
    """``u_i = d(logit_1 - logit_0)/dz1`` per row [B, h] (float64): for two classes and cross-entropy a
    row's first-layer gradient is ``g_i = (p_1(x_i) - y_i) u_i``, and ``u_i`` depends on ``x_i`` only
    through its ReLU patterns."""
    m64 = copy.deepcopy(model).cpu().double().eval()
    key = next(k for k, v in model.named_modules() if v is first)
    box: list[torch.Tensor] = []

    def hook(mod, inp, out):
        out.retain_grad()
        box.append(out)

    h = dict(m64.named_modules())[key].register_forward_hook(hook)
    try:
        out = m64(torch.as_tensor(x, dtype=torch.float64))
    finally:
        h.remove()
    (out[:, 1] - out[:, 0]).sum().backward()
    return box[0].grad.detach().numpy()



def _solve_g(u: np.ndarray, c: np.ndarray, schema, raw: np.ndarray, target_b1: np.ndarray,
             free: np.ndarray) -> tuple[np.ndarray, float]:
    """First-layer gradients G [B, h] from the raw categorical columns and the bias gradient: ``g_i =
    s_i u_i`` (one unknown ``s_i``) for rows not in ``free``, a whole unknown vector for rows in
    ``free`` (their ReLU pattern may be wrong). Returns (G, relative residual)."""
    n, h = u.shape
    fixed = np.setdiff1d(np.arange(n), free)
    members = [np.ones(n, dtype=bool)]
    rhs = [target_b1]
    for bi, (_, sl) in enumerate(schema.categorical):
        for j in np.unique(c[:, bi]):
            members.append(c[:, bi] == j)
            rhs.append(raw[:, sl.start + int(j)])
    mem = np.stack(members).astype(float)  # [m, B]
    m = len(mem)
    a_s = (mem[:, None, fixed] * u.T[None, :, fixed]).reshape(m * h, len(fixed))  # [m h, |fixed|]
    a_g = np.kron(mem[:, free], np.eye(h))  # [m h, |free| h]
    a = np.concatenate([a_s, a_g], 1)
    y = np.concatenate(rhs)
    sol = np.linalg.lstsq(a, y, rcond=None)[0]
    g = np.zeros((n, h))
    g[fixed] = sol[:len(fixed), None] * u[fixed]
    g[free] = sol[len(fixed):].reshape(len(free), h)
    return g, float(np.linalg.norm(a @ sol - y) / max(np.linalg.norm(y), 1e-300))


def refine_continuous(model: nn.Module, first: nn.Linear, target_w1: np.ndarray, target_b1: np.ndarray,
                      rows: np.ndarray, labels: np.ndarray, schema, *, project,
                      max_free: int = 8) -> np.ndarray:
    """Continuous values of a whole-batch guess (B rows with labels, categories right, continuous values
    close) re-read linearly from the first layer, two classes only.

    With ``g_i = s_i u_i`` (``_unit_directions``; ``s_i = p_1 - y_i`` one scalar per row) every raw
    categorical column ``sum_{i in category j} g_i`` and the bias gradient ``sum_i g_i`` are linear in
    ``s`` (h x (present categories + 1) equations, B unknowns), and then each continuous column
    ``dW1[:, c] = sum_i g_i y_ic`` is linear in the standardised values (h equations, B unknowns,
    B <= h): both are least squares at the gradient's precision, where the second-layer roots leave
    fnlwgt tens of units off at B = 64. A row whose guessed values are far off can carry a wrong ReLU
    pattern (wrong ``u_i``): the rows whose ``s_i`` disagrees with their own ``p_1 - y_i`` by more than
    1e-3 and 10x the median (at most ``max_free``) get a whole unknown ``g_i`` instead (not identifiable
    when the row shares its whole categorical pattern with another row). Nothing is certified here: the whole-gradient
    fit decides. ``target_w1`` [h, d] and ``target_b1`` [h]: summed gradients."""
    mean, scale = np.asarray(schema.mean, float), np.asarray(schema.scale, float)
    ci = np.asarray(schema.continuous_index)
    raw = target_w1 * scale + np.outer(target_b1, mean)
    c, _ = schema.decode_arrays(rows)
    u = _unit_directions(model, first, rows)
    with torch.no_grad():
        m64 = copy.deepcopy(model).cpu().double().eval()
        p1 = torch.softmax(m64(torch.as_tensor(rows, dtype=torch.float64)), -1)[:, 1].numpy()
    none = np.zeros(0, dtype=int)
    g, _ = _solve_g(u, c, schema, raw, target_b1, none)
    s_hat = np.einsum("bh,bh->b", g, u) / np.maximum(np.einsum("bh,bh->b", u, u), 1e-300)
    dev = np.abs(s_hat - (p1 - labels))
    bad = np.argsort(-dev)[:max_free]
    bad = np.sort(bad[dev[bad] > max(10 * float(np.median(dev)), 1e-3)])
    if len(bad):
        g, _ = _solve_g(u, c, schema, raw, target_b1, bad)
    out = rows.copy()
    out[:, ci] = np.linalg.lstsq(g.T, target_w1[:, ci], rcond=None)[0]
    return project(out)
