"""Development harness for DAGER's encoder path (issue 20, MiniLM under a declared Gaussian defense and past
the rank limit): build the runner's trial for (case, B, sigma, seed, trial) as ``python -m eval bench`` does,
attack it, print ROUGE-1, CPU seconds, the stats and the per-sentence outcome. Development seeds (< 1000) only.

    python bench/dager_enc_dev.py --batch-size 4 --sigma 1e-5 --seed 0 --trials 0,1 [--set time_budget_s=120]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="text/minilm-bert/dager")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--sigma", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trials", default="0")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--width", type=int, default=110, help="characters of each sentence printed")
    a = ap.parse_args()
    if a.seed >= 1000:
        raise SystemExit("development harness: seeds < 1000 only")
    import torch

    from common.seed import derive_seed, make_generator
    from eval.pipeline import Resources, TrialSpec, make_kit, prepare, prepare_trial
    from textleak.cases_dager import CASES

    overrides = {}
    for kv in a.set:
        k, v = kv.split("=", 1)
        try:
            overrides[k] = float(v)
        except ValueError:
            overrides[k] = v
    case = CASES[a.case].with_batch_size(a.batch_size)
    if a.sigma > 0:
        case = replace(case, defenses=({"name": "gaussian", "sigma": a.sigma},))
    res = Resources()
    r1 = []
    for ti in [int(x) for x in a.trials.split(",")]:
        p = prepare(TrialSpec(case=case, attack="dager", seed=a.seed, trial=ti, overrides=overrides))
        kit = make_kit(p.case.modality)
        t = prepare_trial(p, kit, res, device=torch.device("cpu"))
        view = t.attacker
        c0 = time.process_time()
        rec = p.attack.reconstruct(view.observation, view.model, view.prior,
                                   generator=make_generator(derive_seed(a.seed, ti, "attack")))
        cpu = time.process_time() - c0
        metrics, _ = kit.score(rec, t.truth, case=p.case)
        r1.append(float(metrics["rouge1"]))
        st = {k: round(v, 4) for k, v in rec.stats.items()}
        print(f"B={a.batch_size} sigma={a.sigma:g} seed={a.seed} trial={ti} rouge1={metrics['rouge1']:.3f} "
              f"cpu_s={cpu:.1f} load={os.getloadavg()[0]:.2f}", flush=True)
        if not a.quiet:
            print("stats", st)
            truth = t.truth["sentences"] if isinstance(t.truth, dict) else t.truth
            n = lambda s: len(view.prior.tokenizer(s)["input_ids"])  # noqa: E731  (tokens with [CLS]/[SEP])
            for s in truth:
                print("OK " if s in set(rec.data) else "-- ", f"[{n(s)}]", s[:a.width])
            for s in rec.data:
                if s not in set(truth):
                    print("  got:", f"[{n(s)}]", s[:a.width])
    print(f"mean rouge1 {sum(r1) / len(r1):.3f} over {len(r1)}")


if __name__ == "__main__":
    main()
