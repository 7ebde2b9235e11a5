"""DAGER's certified flags (``verify.py``, issue 20) at an earlier commit against the working tree, in one process:
same token ids, certified flags of each, whether each flagged sentence is right, the whole-update residual of the
output and of the true sentences (true labels), CPU seconds of each and of the check.

    python bench/dager_flags.py BASE_COMMIT CASE B [--seeds 0] [--trials 0]

Batches as ``bench/dager_same_ids.py`` draws them. Development seeds (< 1000) only."""
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
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--trials", default="0")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if any(s >= 1000 for s in seeds):
        raise SystemExit("development seeds (< 1000) only")
    import copy

    import torch

    from bench.dager_base import load_base
    from bench.perf_dager import pipeline_batches
    from common.seed import make_generator
    from textleak.attacks.dager import DAGER, DagerConfig, verify
    from textleak.attacks.dager.span import find_tap

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    old_pkg = load_base(args.base)
    print(f"{args.case} B={args.b}, base {args.base} vs working tree, {torch.get_num_threads()} thread(s)\n")
    trials = [int(t) for t in args.trials.split(",")]
    for seed, trial, kit, case, model, prior, obs, truth in pipeline_batches(args.case, args.b, seeds, trials):
        recs, cpu = [], []
        for atk in (old_pkg.DAGER(old_pkg.DagerConfig(time_budget_s=600.0)), DAGER(DagerConfig(time_budget_s=600.0))):
            c = time.process_time()
            recs.append(atk.reconstruct(obs, model, prior, generator=make_generator(7)))
            cpu.append(time.process_time() - c)
        ids = [list(t) for t in truth["token_ids"]]
        right = [list(g) in ids for g in recs[1].extras["token_ids"]]
        probe = torch.tensor([[0, 1, 2]])
        taps = [find_tap(model, i, probe) for i in (0, 1)]
        names = list(dict.fromkeys(n for t in taps for n in t.names if n and n in obs.tensors))
        gm = copy.deepcopy(model).double().eval()
        true_rel = verify.explains(obs, gm, prior, prior.kind, ids, names)
        st = recs[1].stats
        print(f"seed {seed} trial {trial}: same token ids {recs[0].extras['token_ids'] == recs[1].extras['token_ids']}; "
              f"base certified {recs[0].extras['certified']}\n  new certified {recs[1].extras['certified']}\n"
              f"  right {right}\n  output residual {st.get('cert_residual')}, true-sentence residual {true_rel:.3g}\n"
              f"  CPU s: base {cpu[0]:.2f}, new {cpu[1]:.2f}, of which the check {st.get('cert_cpu_seconds', 0.0):.2f} "
              f"({100 * st.get('cert_cpu_seconds', 0.0) / max(cpu[1], 1e-9):.1f} %)", flush=True)


if __name__ == "__main__":
    main()
