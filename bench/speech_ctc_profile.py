"""Per-step cost of the CTC gradient-matching objective (issue 21, item 1).

One objective evaluation = forward, parameter gradient with create_graph, L2 distance to a
target gradient, backward to the 80 x 501 mel input (4 s at hop 128) of the default
``CTCRecognizer`` (dim 96). Compared in the same process, best of ``--reps``:
``bare`` (the same model and double backward with a linear stand-in loss: the floor),
``autograd`` (``speechleak.ctc.ctc_nll``: Python loop over frames) and ``native``
(``ctc_nll_fast``: ATen CTC + finite-difference Hessian-vector product).

    OMP_NUM_THREADS=1 python bench/speech_ctc_profile.py --reps 5
"""
from __future__ import annotations

import argparse
import time

import torch

from common.functional import functional_gradient, trainable_params
from common.types import Batch
from speechleak.ctc import ctc_nll, ctc_nll_fast
from speechleak.kit import pad_targets
from speechleak.models import CTCRecognizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--frames", type=int, default=501)
    args = ap.parse_args()
    tg, tl = pad_targets(["the movie is a charming and often funny comedy of manners"])
    results = {}
    for dt in (torch.float32, torch.float64):
        g = torch.Generator().manual_seed(0)
        model = CTCRecognizer(80, dim=96, generator=g)
        params = {k: v.detach().to(dt) for k, v in trainable_params(model).items()}
        x_true = torch.randn(1, 80, args.frames, generator=g, dtype=dt)

        def loss_with(fn):
            def loss(m, b):
                lp = m(b.inputs["feats"])
                if fn is None:
                    return (lp * 0.01).sum((1, 2))
                return fn(lp, b.labels, torch.full((lp.shape[0],), lp.shape[1]), b.inputs["target_lengths"])
            return loss

        for name, fn in (("bare", None), ("autograd", ctc_nll), ("native", ctc_nll_fast)):
            lf = loss_with(fn)
            grad = lambda x: functional_gradient(model, lf, params, Batch({"feats": x, "target_lengths": tl}, tg))
            target = {k: v.detach() for k, v in grad(x_true).items()}
            x = torch.zeros_like(x_true, requires_grad=True)
            best = float("inf")
            for _ in range(args.reps):
                t0 = time.perf_counter()
                d = sum((v - target[k]).pow(2).sum() for k, v in grad(x).items())
                torch.autograd.grad(d, x)
                best = min(best, time.perf_counter() - t0)
            results[(str(dt).split(".")[-1], name)] = best
    print("| dtype | bare model (s) | autograd CTC (s) | native CTC (s) | autograd / bare | native / bare | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for dt in ("float32", "float64"):
        b, a, n = (results[(dt, k)] for k in ("bare", "autograd", "native"))
        print(f"| {dt} | {b:.3f} | {a:.3f} | {n:.3f} | {a / b:.1f} | {n / b:.2f} | {a / n:.1f}x |")


if __name__ == "__main__":
    main()
