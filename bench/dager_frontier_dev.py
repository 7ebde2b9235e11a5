"""Development harness for DAGER past the rank limit (issue 20): build the pipeline's trial for
(case, B, seed, trial) exactly as ``python -m eval run`` does, then attack it and print ROUGE-1, the
per-sentence outcome and the seconds. Development seeds (< 1000) only.

    python bench/dager_frontier_dev.py --case text/gpt2/dager --batch-size 32 --seed 0 --trial 0 \
        [--set time_budget_s=300] [--profile out.prof] [--ffn-span [--known-lag 3]]

``--ffn-span`` turns on the feed-forward activation span of ``ffn_span.py`` (``frontier.FRONTIER_FFN_SPAN``,
off by default) for the token-set search, ``--known-lag`` sets ``frontier.KNOWN_LAG``.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def trial(case_name: str, b: int, seed: int, trial_i: int, overrides: dict):
    """The runner's prepared trial (same model, batch and client seeds as ``eval run``)."""
    import torch

    from eval.pipeline import Resources, TrialSpec, make_kit, prepare, prepare_trial
    from textleak.cases_dager import CASES

    case = CASES[case_name].with_batch_size(b)
    p = prepare(TrialSpec(case=case, attack="dager", seed=seed, trial=trial_i, overrides=overrides))
    kit = make_kit(p.case.modality)
    t = prepare_trial(p, kit, Resources(), device=torch.device("cpu"))
    return p, kit, t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="text/gpt2/dager")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trial", type=int, default=0)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--profile", default="")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--ffn-span", action="store_true")
    ap.add_argument("--known-lag", type=int, default=0)
    a = ap.parse_args()
    if a.seed >= 1000:
        raise SystemExit("development harness: seeds < 1000 only")
    import torch

    import textleak.attacks.dager.frontier as frontier
    from common.seed import derive_seed, make_generator
    if a.ffn_span:
        frontier.FRONTIER_FFN_SPAN = True
    if a.known_lag:
        frontier.KNOWN_LAG = a.known_lag
    overrides = {}
    for kv in a.set:
        k, v = kv.split("=", 1)
        overrides[k] = float(v) if v.replace(".", "", 1).replace("e-", "", 1).isdigit() else v
    p, kit, t = trial(a.case, a.batch_size, a.seed, a.trial, overrides)
    view = t.attacker
    t0, c0 = time.perf_counter(), time.process_time()
    prof = cProfile.Profile() if a.profile else None
    if prof:
        prof.enable()
    rec = p.attack.reconstruct(view.observation, view.model, view.prior,
                               generator=make_generator(derive_seed(a.seed, a.trial, "attack")))
    if prof:
        prof.disable()
        prof.dump_stats(a.profile)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    metrics, _ = kit.score(rec, t.truth, case=p.case)
    st = {k: round(v, 4) for k, v in rec.stats.items()}
    print(f"case={a.case} B={a.batch_size} seed={a.seed} trial={a.trial} attack_s={secs:.1f} cpu_s={cpu:.1f} "
          f"torch_threads={torch.get_num_threads()} load={os.getloadavg()[0]:.2f}")
    print("metrics", {k: round(float(v), 4) for k, v in metrics.items()})
    print("stats", st)
    if not a.quiet:
        from rouge_score import rouge_scorer  # noqa: F401 (the kit's scorer dependency)
        truth = t.truth["sentences"] if isinstance(t.truth, dict) else t.truth
        got = set(rec.data)
        for s in truth:
            mark = "OK " if s in got else "-- "
            print(mark, s[:110])
        print("returned but not exact:")
        for s in rec.data:
            if s not in set(truth):
                print("   ", s[:110])


if __name__ == "__main__":
    main()
