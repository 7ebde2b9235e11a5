"""Benchmark: batched restarts (torch.func.vmap) vs a sequential loop of the same restarts.

Inverting Gradients on TabLeak's FC [100,100,2] with UCI Adult rows; both variants run the
same restarts from the same initialisation in the same process, and the script prints the
speed-up ratio and checks that both reach the same result.

    .venv/bin/python bench/common_restarts.py [--restarts 8] [--iterations 200] [--batch-size 4] [--device cpu]
"""
from __future__ import annotations

import argparse
import time

import torch

from common.baselines import GradientMatchingConfig, InvertingGradients
from common.seed import make_generator
from eval.catalog import catalog
from eval.pipeline import simulate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--restarts", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    dev = torch.device(args.device)
    case = catalog().cases.get("tabular/adult-fc/fedsgd-labels").with_batch_size(args.batch_size)
    kit = catalog().kits.get("tabular")()
    model = kit.load_model(case, device=dev, generator=make_generator(0))
    pool = kit.load_pool(case, data_path=None)
    t = simulate(case, kit, model=model, pool=pool, prior_kind="continuous", device=dev,
                 data_generator=make_generator(1), client_generator=make_generator(2))
    obs, prior = t.attacker.observation, t.attacker.prior
    times = {}
    outs = {}
    for batched in (True, False):
        cfg = GradientMatchingConfig(distance="cosine", optimizer="adam", lr=0.1, iterations=args.iterations,
                                     restarts=args.restarts, signed_grad=True, labels="observed", batched=batched)
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            outs[batched] = InvertingGradients(cfg).reconstruct(obs, model, prior, generator=make_generator(3))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        times[batched] = best
    same = torch.allclose(outs[True].data, outs[False].data, atol=1e-4)
    print(f"IG, B={args.batch_size}, {args.restarts} restarts x {args.iterations} iterations on {args.device}")
    print(f"sequential loop: {times[False]:.2f} s   batched (vmap): {times[True]:.2f} s   "
          f"speed-up: {times[False] / times[True]:.2f}x   same result: {same}")


if __name__ == "__main__":
    main()
