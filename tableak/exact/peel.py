"""Past the first layer's rank: peel rows off one at a time through categories seen once.

At B ~ 64 on Adult the batch uses ~50 of 99 categories, so the rows are linearly dependent and the
first-layer span no longer identifies them. Two handles remain (issue 19):

* the raw categorical column ``j`` of the first-layer gradient is ``sum_{i in category j} g_i``
  (``g_i = dL/dz1`` of row ``i``); a category seen once yields one row's ``g_i`` exactly, and with
  its zero pattern the row's first-layer ReLU pattern ``S`` (SPEAR's ReLU sparsity, Dimitrov et
  al. 2024, used per row instead of by sampling);
* the row's second-layer input ``D_S (W1 x + b1)`` lies in the row space of the second weight
  gradient (rank < width). With ``S`` fixed this is *linear* in ``x``: the continuous values are
  eliminated by least squares and the categorical choice is a subset-sum solved by meet in the
  middle, as in ``span.py``.

Every hit is checked nonlinearly: its own first-layer gradient ``g(x, y)`` must reproduce the
observed column and its true second-layer input must pass the span check. Accepted rows are
subtracted from the whole gradient (their per-example gradients in float64), which turns further
categories into singletons; when no singleton yields a row the residual batch (B' rows) goes to the
ordinary first/second-layer stage. Rows are never certified here: the whole-gradient fit over all
rows (``verify.fit_counts``) is the certificate, and rows peeled without it only count as
partially certified (same rule as the span stage).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import nn

from ..schema import TabularSchema
from .budget import NEVER, Deadline
from .layer2 import two_pass_roots
from .span import _balanced_halves, _combos, project, row_span
from .verify import Layers, _per_example, layer2_residual, second_inputs, sum_scale


@dataclass
class Peeled:
    rows: np.ndarray  # [n, d] standardised, projected
    labels: np.ndarray  # [n]
    target: dict[str, np.ndarray]  # the summed gradient left for the remaining rows
    rounds: int


def _flat(target: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    return np.concatenate([target[n].reshape(-1) for n in names])


def _unflat(vec: np.ndarray, like: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    out, o = {}, 0
    for n in names:
        k = like[n].size
        out[n] = vec[o:o + k].reshape(like[n].shape)
        o += k
    return out


def _mitm(vecs: list[np.ndarray], blocks: list[np.ndarray], const: np.ndarray, tol: float,
          max_half: int) -> np.ndarray | None:
    """Choices (one column per block) with ``||const + sum vecs|| <= tol``: [n, n_blocks] or None if too many."""
    sizes = [len(c) for c in blocks]
    ha, hb = _balanced_halves(sizes)
    if max(int(np.prod([sizes[i] for i in ha])), int(np.prod([sizes[i] for i in hb]))) > max_half:
        return None
    m = const.shape[0]
    ia, sa = _combos([blocks[i] for i in ha], [vecs[i] for i in ha], m)
    ib, sb = _combos([blocks[i] for i in hb], [vecs[i] for i in hb], m)
    sa = sa + const
    k = min(m, 16)
    tree = cKDTree(sa[:, :k])
    hits = tree.query_ball_point(-sb[:, :k], r=tol)
    pj = np.repeat(np.arange(len(sb)), [len(x) for x in hits])
    pi = np.fromiter((i for lst in hits for i in lst), dtype=np.int64, count=len(pj))
    keep = np.linalg.norm(sa[pi] + sb[pj], axis=1) <= tol
    cols = np.zeros((int(keep.sum()), len(blocks)), dtype=np.int64)
    cols[:, ha] = ia[pi[keep]]
    cols[:, hb] = ib[pj[keep]]
    return cols


def _singleton_rows(schema: TabularSchema, col: np.ndarray, j: int, present: np.ndarray, w1: np.ndarray,
                    b1: np.ndarray, comp2: np.ndarray, *, act_tol: float, tol: float, max_half: int) -> np.ndarray:
    """Valid rows with category ``j`` whose second-layer input under the ReLU pattern read off ``col``
    lies in the second-layer span (least-squares continuous values): standardised, unprojected [n, d]."""
    d = schema.dim
    mean, scale = np.asarray(schema.mean, float), np.asarray(schema.scale, float)
    ci = schema.continuous_index
    on = np.abs(col) > act_tol * np.abs(col).max()
    f = comp2 @ (on[:, None] * w1)  # [k, d]
    f0 = comp2 @ (on * b1)
    cat = np.setdiff1d(np.arange(d), ci)
    f0 = f0 + f[:, cat] @ (-mean[cat] / scale[cat])
    fc = f[:, ci]
    u, s, _ = np.linalg.svd(fc, full_matrices=True)
    rank_c = int((s > 1e-9 * max(s.max(), 1e-30)).sum())
    q = u[:, rank_c:].T  # [m, k] orthonormal complement of the continuous columns' range
    if q.shape[0] == 0:  # (B >= ~100: the second layer's span leaves no room): no categorical information
        return np.zeros((0, d))
    blocks, vecs = [], []
    for _, sl in schema.categorical:
        cols = np.arange(sl.start, sl.stop)
        cols = np.array([j]) if sl.start <= j < sl.stop else cols[present[sl]]
        if len(cols) == 0:
            return np.zeros((0, d))
        blocks.append(cols)
        vecs.append((q @ (f[:, cols] / scale[cols])).T)
    # the relative residual is measured against ||D_S (W1 x + b1)||, of the order of the active pre-activations
    ref = float(np.linalg.norm(on * b1) + np.linalg.norm(on[:, None] * w1, axis=1).mean() * np.sqrt(on.sum()))
    choice = _mitm(vecs, blocks, q @ f0, tol * ref, max_half)
    if choice is None or len(choice) == 0:
        return np.zeros((0, d))
    raw = np.zeros((len(choice), d))
    np.put_along_axis(raw, choice, 1.0, axis=1)
    y = (raw - mean) / scale
    y[:, ci] = 0.0
    e = y @ f.T + comp2 @ (on * b1)  # residual with zero continuous values
    y[:, ci] = -np.linalg.lstsq(fc, e.T, rcond=None)[0].T
    return y


def peel(model: nn.Module, layers: Layers, loss_fn, names: list[str], target: dict[str, np.ndarray],
         schema: TabularSchema, batch_size: int, n_classes: int, *, labels: list[int] | None, rank_tol: float,
         present_tol: float, act_tol: float, tol: float, layer2_tol: float, g_tol: float, max_half: int,
         stop_at: int, max_rounds: int = 8, deadline: Deadline = NEVER) -> Peeled:
    """Peel rows of categories seen once until ``stop_at`` rows are left, a round finds nothing or the
    ``deadline`` passes (the rows peeled so far are returned; each passed its own checks).

    ``target``: the summed (not averaged) gradient by parameter name, float64; ``labels``: the
    granted labels (a multiset), or None (every class is tried)."""
    m64 = copy.deepcopy(model).cpu().double().eval()
    mean, scale = np.asarray(schema.mean, float), np.asarray(schema.scale, float)
    ci = schema.continuous_index
    w1 = layers.first.weight.detach().double().cpu().numpy()
    b1 = layers.first.bias.detach().double().cpu().numpy()
    bias_off = {}
    o = 0
    for n in names:
        bias_off[n] = o
        o += target[n].size
    rows_out: list[np.ndarray] = []
    labels_out: list[int] = []
    left_labels = None if labels is None else list(labels)
    b_left, rounds = batch_size, 0
    flat = _flat(target, names)
    while b_left > stop_at and rounds < max_rounds and not deadline.expired:
        rounds += 1
        cur = _unflat(flat, target, names)
        dw, db = cur[layers.first_weight], cur[layers.first_bias]
        raw = dw * scale + np.outer(db, mean)
        norms = np.linalg.norm(raw, axis=0)
        norms[ci] = 0.0
        present = norms > present_tol * norms.max()
        span2 = row_span(cur[layers.second_weight], max_rank=b_left, rel_tol=rank_tol)
        h = w1.shape[0]
        if not 0 < span2.rank < h:
            break
        uq, sq, _ = np.linalg.svd(np.eye(h) - span2.basis.T @ span2.basis)
        comp2 = uq[:, sq > 0.5].T
        found: list[tuple[np.ndarray, int]] = []
        for j in np.flatnonzero(present):
            if deadline.expired:
                break
            ys = _singleton_rows(schema, raw[:, j], int(j), present, w1, b1, comp2, act_tol=act_tol, tol=tol,
                                 max_half=max_half)
            if not len(ys):
                continue
            ys = project(schema, ys)
            res2 = layer2_residual(second_inputs(model, layers.second, ys), span2.basis)
            ys = ys[res2 <= layer2_tol]
            if not len(ys) or len(ys) > 8:  # no row, or the column does not single one out
                continue
            classes = sorted(set(left_labels)) if left_labels is not None else list(range(n_classes))
            if not classes:
                break
            xx = torch.as_tensor(np.repeat(ys, len(classes), 0))
            yy = torch.as_tensor(classes * len(ys), dtype=torch.long)
            gam = _per_example(m64, loss_fn, names, xx, yy)  # [P, n * c]
            g1 = gam[bias_off[layers.first_bias]:bias_off[layers.first_bias] + h]  # [h, n * c]
            err = np.linalg.norm(g1 - raw[:, j:j + 1], axis=0) / max(np.linalg.norm(raw[:, j]), 1e-30)
            k = int(np.argmin(err))
            if err[k] > g_tol or (err <= g_tol).sum() > 1:
                continue
            row, lab = ys[k // len(classes)], classes[k % len(classes)]
            if any(np.array_equal(row, r) for r, _ in found):
                continue
            found.append((row, lab))
            if left_labels is not None:
                left_labels.remove(lab)
            flat = flat - gam[:, k]
        if not found:
            break
        for row, lab in found:
            rows_out.append(row)
            labels_out.append(lab)
        b_left -= len(found)
    return Peeled(np.array(rows_out).reshape(-1, schema.dim), np.array(labels_out, dtype=int),
                  _unflat(flat, target, names), rounds)


def all_pattern_roots(schema: TabularSchema, present: np.ndarray, w1: np.ndarray, b1: np.ndarray,
                      basis2: np.ndarray, *, starts: int, more_starts: int, tol: float, max_patterns: int,
                      chunk: int = 4096, deadline: Deadline = NEVER) -> np.ndarray | None:
    """Every categorical pattern of the present categories, continuous values solved on the second
    layer (``layer2.two_pass_roots`` with every continuous column free, ``starts`` starts per
    pattern, then ``more_starts`` for the patterns with a root: a pattern shared by k rows has k
    roots): the rows whose second-layer input lies in its gradient's row space, unprojected [n, d];
    None past ``max_patterns``."""
    d = schema.dim
    mean, scale = np.asarray(schema.mean, float), np.asarray(schema.scale, float)
    ci = schema.continuous_index
    blocks = [np.arange(sl.start, sl.stop)[present[sl]] for _, sl in schema.categorical]
    n = int(np.prod([len(c) for c in blocks]))
    if n == 0 or n > max_patterns:
        return None
    idx, _ = _combos(blocks, [np.zeros((len(c), 1)) for c in blocks], 1)
    u = np.zeros((d, len(ci)))
    u[ci, np.arange(len(ci))] = 1.0
    lo, hi = (v.double().numpy()[ci] for v in schema.bounds())

    def patterns():
        for c0 in range(0, len(idx), chunk):
            raw = np.zeros((len(idx[c0:c0 + chunk]), d))
            np.put_along_axis(raw, idx[c0:c0 + chunk], 1.0, axis=1)
            y0 = (raw - mean) / scale
            y0[:, ci] = 0.0
            yield y0

    rows, _ = two_pass_roots(patterns(), u, w1, b1, basis2, lo, hi, ci, starts=starts, more_starts=more_starts,
                             tol=tol, deadline=deadline, chunk=chunk)
    return rows


def rest_counts(coef: np.ndarray, n_classes: int, *, integer_tol: float, rule: str) -> np.ndarray:
    """Counts of the candidate rows (candidate-major, then label) taken as whole when the residual fit
    over the root candidates is not a certificate (some rows were missed); the rows not counted are
    left to the span stage as a small batch of their own.

    ``"sure"``: counts within ``integer_tol`` of an integer (the others are left). ``"round"``: every
    count rounded (a missed row tilts all counts of a 64-row fit by up to ~0.4), and a row counted
    twice or more gives one copy back: a pattern shared by two rows whose second root the search
    missed looks like its first root counted twice (the two rows then go to the span stage together)."""
    counts = np.rint(coef)
    if rule == "sure":
        return np.where((np.abs(coef - counts) <= integer_tol) & (counts >= 1), counts, 0.0)
    counts = np.maximum(counts, 0.0)
    return np.where(counts >= 2, counts - 1, counts)


def rest_batch(obs, names: list[str], p: Peeled, whole: np.ndarray, counts: np.ndarray, n_classes: int, rest: int):
    """The observation of the ``rest`` rows left when the peeled rows and the candidate rows counted
    whole (``counts``, their summed per-example gradients ``whole`` [P]) are subtracted from the
    update: averaged over ``rest`` under mean reduction, with the granted labels less theirs."""
    t = obs.tensors
    vec = np.concatenate([p.target[k].reshape(-1) for k in names]) - whole
    div = sum_scale(obs, rest)
    sub, o = {}, 0
    for k in names:
        sub[k] = torch.as_tensor(vec[o:o + t[k].numel()].reshape(t[k].shape) / div)
        o += t[k].numel()
    used = np.flatnonzero(counts > 0)
    taken = np.concatenate([p.labels, np.repeat(used % n_classes, counts[used].astype(int))]).astype(int).tolist()
    granted = None if obs.labels is None else [int(v) for v in obs.labels.tolist()]
    sub_labels = residual_labels(granted, taken, rest)
    return dataclasses.replace(obs, tensors=sub, num_examples=rest,
                               labels=None if sub_labels is None else torch.as_tensor(sub_labels))


def residual_labels(labels: list[int] | None, taken: list[int], rest: int) -> list[int] | None:
    """The granted label multiset less the labels of rows already taken, when it has ``rest`` entries."""
    if labels is None:
        return None
    left = list(labels)
    for lab in taken:
        if lab in left:
            left.remove(lab)
    return left if len(left) == rest else None
