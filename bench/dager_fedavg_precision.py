"""DAGER on FedAvg deltas: float32 vs float64 client arithmetic, same batches.

The FedAvg case (GPT-2 configuration, 2 local epochs, lr 1e-4) sends ``theta_before - theta_after``.
In float32 that difference is rounded at the weights' scale (~1e-7 relative), which buries the
weak token directions of the layer-2 update; the same client in float64 keeps them. This script
runs both on the same batches (same seeds as the runner's trials) and prints one row per batch.

    python bench/dager_fedavg_precision.py --batch-size 8 --trials 3
"""
from __future__ import annotations

import argparse

import torch

from common.fl import client_update
from common.observe import observe
from common.seed import derive_seed, make_generator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="text/gpt2/dager-fedavg")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget", type=float, default=150.0)
    args = ap.parse_args()
    from textleak.attacks.dager import DAGER, DagerConfig
    from textleak.cases_dager import CASES
    from textleak.kit import TextKit

    case = CASES[args.case].with_batch_size(args.batch_size)
    kit = TextKit()
    dev = torch.device("cpu")
    pool = kit.load_pool(case, data_path=None)
    print(f"case {args.case}, B={args.batch_size}, seed {args.seed}")
    print("dtype | trial | ROUGE-1 | ROUGE-2 | exact | tau_2 | tau scale L2 | rank L2 | attack s")
    for dtype in ("float32", "float64"):
        for trial in range(args.trials):
            model = kit.load_model(case, device=dev, generator=make_generator(derive_seed(args.seed, "model")))
            if dtype == "float64":
                model = model.double()
            batch, truth = kit.sample(pool, case, model=model, device=dev,
                                      generator=make_generator(derive_seed(args.seed, trial, "data")))
            upd = client_update(model, batch, kit.loss_fn, case.protocol, defenses=[],
                                generator=make_generator(derive_seed(args.seed, trial, "client")))
            obs = observe(upd, case.threat)
            prior = kit.make_prior(case, model, "text", device="cpu")
            rec = DAGER(DagerConfig(time_budget_s=args.time_budget)).reconstruct(
                obs, model, prior, generator=make_generator(derive_seed(args.seed, trial, "attack")))
            m, _ = kit.score(rec, truth, case=case)
            s = rec.stats
            print(f"{dtype} | {trial} | {m['rouge1']:.3f} | {m['rouge2']:.3f} | {m['exact_match']:.3f} | "
                  f"{s.get('tau_l2', float('nan')):.2e} | {s.get('tau_scale_l2', float('nan')):.3g} | "
                  f"{s.get('rank_l2', float('nan')):.0f} | {s.get('seconds', float('nan')):.1f}", flush=True)


if __name__ == "__main__":
    main()
