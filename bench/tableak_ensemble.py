"""Seconds per TabLeak attack at B = 32 on Adult: the ensemble as one vmapped tensor versus a
sequential Python loop over the same members (same inits, same optimiser), in one run.

    OMP_NUM_THREADS=1 python bench/tableak_ensemble.py [--iterations 1500] [--ensemble 30] [--batch 32]

Both variants compute the same losses and gradients (tests/tableak/test_attack.py checks the
equality); only the wall time differs. Prints the seconds of each and their ratio.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from common.seed import make_generator
from common.threat import HONEST_WITH_LABELS
from eval.pipeline import score, simulate
from tableak.attack import TabLeak, TabLeakConfig
from tableak.kit import TabularKit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=1500)
    ap.add_argument("--ensemble", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from eval.catalog import catalog

    case = catalog().cases.get("tabular/adult-fc/fedsgd-labels").with_batch_size(args.batch)
    kit = TabularKit()
    g = make_generator(0)
    model = kit.load_model(case, device=torch.device("cpu"), generator=g)
    pool = kit.load_pool(case, data_path=None)
    t = simulate(case, kit, model=model, pool=pool, prior_kind="tabular", device=torch.device("cpu"),
                 data_generator=g, client_generator=g, threat=HONEST_WITH_LABELS)
    obs, prior, truth = t.attacker.observation, t.attacker.prior, t.truth
    cfg = TabLeakConfig(iterations=args.iterations, ensemble=args.ensemble)
    out = {}
    for name, c in [("batched (vmap)", cfg), ("sequential loop", replace(cfg, batched=False))]:
        t0 = time.perf_counter()
        rec = TabLeak(c).reconstruct(obs, model, prior, generator=make_generator(1))
        out[name] = time.perf_counter() - t0
        acc = score(kit, rec, truth, case=case)[0]["accuracy"]
        print(f"{name:16s} {out[name]:8.2f} s/attack   accuracy {acc:.3f}", flush=True)
    print(f"B={args.batch} ensemble={args.ensemble} iterations={args.iterations} threads={args.threads}: "
          f"sequential / batched = {out['sequential loop'] / out['batched (vmap)']:.2f}x")


if __name__ == "__main__":
    main()
