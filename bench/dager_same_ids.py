"""DAGER at an earlier commit against the working tree on several development batches, in one process (issue 18):
same token ids, same confidences (bit for bit), CPU seconds of each; where they differ, whether the same sentences
(in any order) came out with the same certified flags, and the largest relative change of a sentence's confidence.

    python bench/dager_same_ids.py BASE_COMMIT CASE B [--seeds 0,1] [--trials 0,1,2] [--approx]

Batches as the evaluation pipeline draws them (``eval/pipeline.py``): the model from ``derive_seed(seed,
"model")``, the batch from ``derive_seed(seed, trial, "data")``, the client update from ``derive_seed(seed,
trial, "client")``. Development seeds (< 1000) only. Base and new alternate (base first) on each batch. Prints
one markdown row per batch and the totals."""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("case")
    ap.add_argument("b", type=int)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--trials", default="0,1,2")
    ap.add_argument("--approx", action="store_true", help="both as DAGER(exact_scores=False)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if any(s >= 1000 for s in seeds):
        raise SystemExit("development seeds (< 1000) only")
    import torch

    from bench.dager_base import load_base
    from bench.perf_dager import pipeline_batches
    from common.seed import make_generator
    from textleak.attacks.dager import DAGER, DagerConfig

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    old_pkg = load_base(args.base)
    tot = [0.0, 0.0]
    print(f"{args.case} B={args.b}, base {args.base} vs working tree, {torch.get_num_threads()} thread(s)"
          f"{', exact_scores=False' if args.approx else ''}\n")
    print("| seed | trial | base CPU s | new CPU s | ratio | same token ids | same confidences | same sentences, any order "
          "| same certified flags | max confidence change | rouge1 new |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    trials = [int(t) for t in args.trials.split(",")]
    for seed, trial, kit, case, model, prior, obs, truth in pipeline_batches(args.case, args.b, seeds, trials):
        recs, cpu = [], []
        for atk in (old_pkg.DAGER(old_pkg.DagerConfig(time_budget_s=600.0), exact_scores=not args.approx),
                    DAGER(DagerConfig(time_budget_s=600.0), exact_scores=not args.approx)):
            c = time.process_time()
            recs.append(atk.reconstruct(obs, model, prior, generator=make_generator(7)))
            cpu.append(time.process_time() - c)
        same_ids = recs[0].extras["token_ids"] == recs[1].extras["token_ids"]
        same_conf = list(recs[0].confidence) == list(recs[1].confidence)
        ids = [r.extras["token_ids"] for r in recs]
        same_set = sorted(map(tuple, ids[0])) == sorted(map(tuple, ids[1]))
        flags = [sorted(zip(map(tuple, r.extras["token_ids"]), r.extras.get("certified", []))) for r in recs]
        conf = [dict(zip(map(tuple, r.extras["token_ids"]), map(float, r.confidence))) for r in recs]
        dconf = max((abs(conf[0][k] - conf[1][k]) / max(abs(conf[0][k]), 1e-300) for k in conf[0] if k in conf[1]),
                    default=0.0)
        r1 = kit.score(recs[1], truth, case=case)[0]["rouge1"]
        tot[0] += cpu[0]
        tot[1] += cpu[1]
        print(f"| {seed} | {trial} | {cpu[0]:.2f} | {cpu[1]:.2f} | {cpu[0] / max(cpu[1], 1e-9):.2f} | {same_ids} "
              f"| {same_conf} | {same_set} | {flags[0] == flags[1]} | {dconf:.1e} | {r1:.4f} |", flush=True)
    print(f"\ntotal CPU s: base {tot[0]:.1f}, new {tot[1]:.1f} ({tot[0] / max(tot[1], 1e-9):.2f}x)")


if __name__ == "__main__":
    main()
