"""Development probe (issue 19, B = 128): coordinate descent of whole rows on the whole gradient.

Seeds < 1000 only. Builds the tests' German/Adult FedSGD batches (FC [100, 100, 2], untrained, mean
reduction), checks that ``Net.unit`` reproduces the observed gradient from the true rows, then
runs ``whole_descent`` from (a) the truth with k rows replaced by random valid rows, (b) random
valid rows, (c) TabLeak's rows (``--tableak``), and prints exact rows / cell accuracy / residual / seconds.

    OMP_NUM_THREADS=1 .venv/bin/python bench/tabular_exact_whole.py --data german --b 128 --seeds 0 1

The method:

At B = 128 on an FC [100, 100, 2] network the first weight gradient (100 x d) and the second
(100 x 100) are both rank-saturated, so neither span tells rows apart; the update as a whole still has
100 d + 100 * 100 + 302 numbers against B discrete rows. With a 2-class head and softmax
cross-entropy a row's gradient is ``s J(x)`` with ``s = p_1(x) - y`` and

    J(x) = [a1 x^T, a1, a2 h1^T, a2, (-h2; h2), (-1, 1)],   a2 = v * m2,   a1 = m1 * (W2^T a2),

(``v = W3[1] - W3[0]``, ``m1, m2`` the row's ReLU masks), cheap to form for many candidate rows at
once. The search keeps B valid rows and their labels, the residual ``R = G - sum_i s_i J(x_i)``, and
moves one row at a time: every single-cell change of its categories (and, without granted labels,
its label), the continuous values of each re-solved by Gauss-Newton on ``||R_i - s J(x)||`` (masks
fixed per step, ``ds/dx`` included), projected onto the schema (integers rounded); the best candidate
replaces the row when it lowers the residual. Nothing here is certified: the whole-gradient fit
(``verify.fit_counts``) is the certificate, as in the other stages.

Development result (session 14, German B = 128, dev seeds 0 and 1, loaded shared 2-core machine, one
thread; commit 85e90e4 + this script): it does NOT beat TabLeak, so it is not in the library.
* Truth with 8 of 128 rows replaced by random valid rows (seed 0, labels granted): with the continuous
  re-solve (3 Gauss-Newton steps) exact_row 0.938 -> 0.477, accuracy 0.961 -> 0.893 (4 sweeps, 375 s);
  categories and labels only (``--gn 0``) 0.938 -> 0.828, 0.961 -> 0.953 (3 sweeps, 9 s). Correct rows
  absorb part of the wrong rows' error: lowering the whole-gradient residual by one-row moves breaks them.
  Seed 1, ``--gn 0``: one random row (k = 1) is not found either (exact_row 0.992 -> 0.984, accuracy
  0.995 -> 0.996: a random row differs in every cell, one-cell moves do not reach the true row, and a
  correct row moves); k = 4: 0.969 -> 0.891 (accuracy 0.977 -> 0.974); all 128 rows random: accuracy
  0.464 -> 0.488 (exact_row 0; relative residual 0.917 -> 0.337).
* From TabLeak's rows (paper settings; seed 0 labels granted: accuracy 0.712, exact_row 0.008, 227 s;
  seed 1 labels not granted: 0.722, 0.000, 202 s), ``--gn 0``, 4 sweeps: the relative residual falls
  0.350 -> 0.127 and 0.313 -> 0.165, but accuracy falls too, 0.712 -> 0.699 and 0.722 -> 0.705, exact_row
  0.008 -> 0.000 and 0.000 -> 0.000 (23 s and 53 s).
At B = 128 there is no exact zero test per row (both spans are full), so a lower residual does not mean
nearer rows; the batch stays with TabLeak's rows (the exact stage gives up in 0.1 s: first-layer rank 48
= 53 present categories - 13 blocks + 1 + 7 continuous, every valid row lies in the span).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.seed import make_generator  # noqa: E402
from common.threat import HONEST, HONEST_WITH_LABELS  # noqa: E402
from tableak.exact.budget import NEVER, Deadline  # noqa: E402
from tableak.schema import TabularSchema  # noqa: E402
from tableak.kit import _scores  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "tableak"))
from test_exact import _case  # noqa: E402


# -- the method under test (not in the library: it did not beat TabLeak at B = 128) -------------------
@dataclass
class Net:
    """An FC network Linear-ReLU-Linear-ReLU-Linear(2) in float64 (the layers of ``find_layers`` plus the head)."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    w3: np.ndarray
    b3: np.ndarray

    @property
    def v(self) -> np.ndarray:
        return self.w3[1] - self.w3[0]

    def forward(self, x: np.ndarray) -> tuple:
        """(h1, m1, h2, m2, p1) for rows x [N, d]."""
        z1 = x @ self.w1.T + self.b1
        m1 = z1 > 0
        h1 = np.where(m1, z1, 0.0)
        z2 = h1 @ self.w2.T + self.b2
        m2 = z2 > 0
        h2 = np.where(m2, z2, 0.0)
        z3 = h2 @ self.w3.T + self.b3
        p1 = 1.0 / (1.0 + np.exp(-(z3[:, 1] - z3[:, 0])))
        return h1, m1, h2, m2, p1

    def unit(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(J [N, P] flattened as (W1, b1, W2, b2, W3, b3), p1 [N]): the gradient of a row is (p1 - y) J."""
        h1, m1, h2, m2, p1 = self.forward(x)
        a2 = self.v * m2
        a1 = m1 * (a2 @ self.w2)
        n = len(x)
        parts = [(a1[:, :, None] * x[:, None, :]).reshape(n, -1), a1, (a2[:, :, None] * h1[:, None, :]).reshape(n, -1),
                 a2, -h2, h2, -np.ones((n, 1)), np.ones((n, 1))]
        return np.concatenate(parts, 1), p1

    def cont_jacobian(self, x: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(J [N, P], p1 [N], d(p1 J)/dx_c [N, f, P] over columns ``cols`` with the masks fixed, dp1/dx_c [N, f])."""
        h1, m1, h2, m2, p1 = self.forward(x)
        a2 = self.v * m2
        a1 = m1 * (a2 @ self.w2)
        n, d = x.shape
        f = len(cols)
        j, _ = self.unit(x)
        u = m1[:, None, :] * self.w1[:, cols].T[None]  # dh1/dx_c [N, f, h]
        w = m2[:, None, :] * (u @ self.w2.T)  # dh2/dx_c [N, f, h2]
        dp = p1 * (1 - p1)
        dpc = dp[:, None] * (w @ self.v)  # [N, f]
        h = self.w1.shape[0]
        dj = np.zeros((n, f, j.shape[1]))
        for k, c in enumerate(cols):
            blk = np.zeros((n, h, d))
            blk[:, :, c] = a1
            dj[:, k, :h * d] = blk.reshape(n, -1)
        o = h * d + h
        h2n = self.w2.shape[0]
        dj[:, :, o:o + h2n * h] = (a2[:, None, :, None] * u[:, :, None, :]).reshape(n, f, -1)
        o += h2n * h + h2n
        dj[:, :, o:o + h2n] = -w
        dj[:, :, o + h2n:o + 2 * h2n] = w
        return j, p1, dj, dpc


@dataclass
class Whole:
    rows: np.ndarray  # [B, d] standardised, projected
    labels: np.ndarray  # [B]
    rel_residual: float
    sweeps: int
    moves: int


def _project(schema: TabularSchema, x: np.ndarray) -> np.ndarray:
    return schema.encode_arrays(*schema.decode_arrays(x))


def _gn(net: Net, x: np.ndarray, y: np.ndarray, r: np.ndarray, ci: np.ndarray, lo: np.ndarray, hi: np.ndarray,
        steps: int) -> np.ndarray:
    """Continuous values of candidates x [N, d] (labels y [N]) moved by Gauss-Newton on ``||r - (p1 - y) J(x)||``."""
    x = x.copy()
    for _ in range(steps):
        j, p1, dj, dpc = net.cont_jacobian(x, ci)
        s = p1 - y
        res = r[None] - s[:, None] * j  # [N, P]
        jac = s[:, None, None] * dj + dpc[:, :, None] * j[:, None, :]  # d(sJ)/dt [N, f, P]
        a = np.einsum("nfp,ngp->nfg", jac, jac) + 1e-9 * np.eye(len(ci))[None]
        g = np.einsum("nfp,np->nf", jac, res)
        x[:, ci] = np.clip(x[:, ci] + np.linalg.solve(a, g[..., None])[..., 0], lo, hi)
    return x


def whole_descent(schema: TabularSchema, net: Net, target: np.ndarray, rows: np.ndarray, labels: np.ndarray, *,
                  free_labels: bool, sweeps: int = 8, gn_steps: int = 3, seed: int = 0,
                  deadline: Deadline = NEVER) -> Whole:
    """Coordinate descent of whole rows on ``||target - sum_i (p1(x_i) - y_i) J(x_i)||`` from ``rows, labels``
    (``target``: the summed gradient flattened as ``Net.unit``). ``free_labels``: every move may flip the
    row's label (labels not granted); otherwise labels stay with their rows."""
    rng = np.random.default_rng(seed)
    ci = np.asarray(schema.continuous_index)
    lo, hi = (t.double().numpy()[ci] for t in schema.bounds())
    sizes = [sl.stop - sl.start for _, sl in schema.categorical]
    x = _project(schema, rows)
    y = np.asarray(labels, float).copy()
    j, p1 = net.unit(x)
    s = p1 - y
    r = target - s @ j
    nrm = np.linalg.norm(target)
    moves, sw = 0, 0
    for sw in range(1, sweeps + 1):
        moved = 0
        for i in rng.permutation(len(x)):
            if deadline.expired:
                break
            ri = r + s[i] * j[i]
            cur = np.linalg.norm(ri - s[i] * j[i])
            cat, cont = schema.decode_arrays(x[i:i + 1])
            cc = [cat[0]]
            for k, size in enumerate(sizes):
                for c in range(size):
                    if c != cat[0, k]:
                        z = cat[0].copy()
                        z[k] = c
                        cc.append(z)
            cx = schema.encode_arrays(np.array(cc), np.repeat(cont, len(cc), 0))
            cy = np.full(len(cx), y[i])
            if free_labels:
                cx, cy = np.concatenate([cx, cx]), np.concatenate([cy, 1 - cy])
            cx = _project(schema, _gn(net, cx, cy, ri, ci, lo, hi, gn_steps))
            cj, cp = net.unit(cx)
            cs = cp - cy
            err = np.linalg.norm(ri[None] - cs[:, None] * cj, axis=1)
            k = int(np.argmin(err))
            if err[k] < cur * (1 - 1e-12) and not np.array_equal(cx[k], x[i]) or (err[k] < cur * (1 - 1e-12)
                                                                                 and cy[k] != y[i]):
                x[i], y[i], j[i], s[i] = cx[k], cy[k], cj[k], cs[k]
                r = ri - s[i] * j[i]
                moved += 1
        moves += moved
        if not moved or deadline.expired:
            break
    return Whole(x, y.astype(int), float(np.linalg.norm(r) / max(nrm, 1e-30)), sw, moves)


# -- the probe -------------------------------------------------------------------------------------------
def net_of(model) -> Net:
    lin = [m for m in model.net if isinstance(m, torch.nn.Linear)]
    return Net(*(t.detach().double().numpy() for m in lin for t in (m.weight, m.bias)))


def target_of(obs, model, b) -> np.ndarray:
    names = [n for n, _ in model.named_parameters()]
    return np.concatenate([obs.tensors[n].double().numpy().ravel() for n in names]) * b


def score(schema, x, rows):
    pc, pn = schema.decode_arrays(x)
    tc, tn = schema.frame_to_arrays(rows)
    return _scores(pc, pn, tc, tn, schema)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="german")
    ap.add_argument("--b", type=int, default=128)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--start", default="perturb", choices=["perturb", "random", "tableak"])
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--sweeps", type=int, default=8)
    ap.add_argument("--free", action="store_true", help="labels not granted")
    ap.add_argument("--gn", type=int, nargs="+", default=[3])
    ap.add_argument("--tl-iters", type=int, default=1500)
    ap.add_argument("--tl-ens", type=int, default=30)
    args = ap.parse_args()
    from tableak.data import adult, german

    data = german() if args.data == "german" else adult()
    _, schema = data
    for seed in args.seeds:
        model, rows, batch, obs, prior = _case(data, args.b, seed=seed, threat=HONEST if args.free else HONEST_WITH_LABELS)
        net = net_of(model)
        tgt = target_of(obs, model, args.b)
        xt = batch.inputs["x"].double().numpy()
        yt = batch.labels.numpy()
        j, p1 = net.unit(xt)
        chk = np.linalg.norm(tgt - (p1 - yt) @ j) / np.linalg.norm(tgt)
        rng = np.random.default_rng(100 + seed)
        g = make_generator(1000 + seed)
        t0 = time.perf_counter()
        if args.start == "tableak":
            from tableak.attack import TabLeak, TabLeakConfig

            rec = TabLeak(TabLeakConfig(iterations=args.tl_iters, ensemble=args.tl_ens)).reconstruct(
                obs, model, prior, generator=g)
            x0, y0 = rec.data.double().numpy(), rec.labels.numpy()
            print(f"seed {seed} tableak {time.perf_counter() - t0:.1f}s {score(schema, x0, rows)}", flush=True)
            t0 = time.perf_counter()
        else:
            x0, y0 = xt.copy(), yt.copy()
            pick = rng.choice(args.b, args.k if args.start == "perturb" else args.b, replace=False)
            rand = np.stack([rng.integers(0, sl.stop - sl.start, len(pick)) for _, sl in schema.categorical], 1)
            cont = np.stack([np.round(f.lower + rng.random(len(pick)) * (f.upper - f.lower)) for f, _ in schema.continuous], 1)
            x0[pick] = schema.encode_arrays(rand, cont)
            if args.free:
                y0[pick] = rng.integers(0, 2, len(pick))
        s0 = score(schema, x0, rows)
        for gn in args.gn:
            t0 = time.perf_counter()
            w = whole_descent(schema, net, tgt, x0, y0, free_labels=args.free, sweeps=args.sweeps, gn_steps=gn)
            s1 = score(schema, w.rows, rows)
            j0, p0 = net.unit(x0)
            r0 = np.linalg.norm(tgt - (p0 - y0) @ j0) / np.linalg.norm(tgt)
            print(f"seed {seed} gn {gn} check {chk:.1e} start exact {s0['exact_row']:.3f} acc {s0['accuracy']:.3f} "
                  f"res {r0:.2e} -> exact {s1['exact_row']:.3f} acc {s1['accuracy']:.3f} res {w.rel_residual:.2e} "
                  f"sweeps {w.sweeps} moves {w.moves} {time.perf_counter() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
