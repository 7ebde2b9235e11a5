"""Memory of many LAMP/TAG trials in one process (issue 18): RSS after each trial of a driver run.

Runs ``eval.driver.run_many`` over one spec per seed (as ``eval/suites/textleak_lamp_paper.toml`` does: each
``[[run]]`` is one seed, so each trial has its own attacked model) with a reduced LAMP configuration, and prints
after each trial the process's current RSS (/proc/self/statm), ``ru_maxrss``, the models the driver's
``Resources`` holds and the live tensors' bytes (gc).  Development seeds only (< 1000).

    OMP_NUM_THREADS=1 python bench/lamp_memory.py --seeds 0-7 --set n_steps=40
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.getcwd())


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def hwm_mb(reset: bool = False) -> float:
    """The peak RSS since the last reset (VmHWM); ``reset`` starts a new window (/proc/self/clear_refs 5)."""
    with open("/proc/self/status") as f:
        v = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    return v


def tensor_mb() -> float:
    import torch

    seen = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor):
            try:
                st = o.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
            except Exception:  # noqa: BLE001 - meta / sparse tensors
                pass
    return sum(seen.values()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--attack", default="lamp-cos")
    ap.add_argument("--case", default="text/minilm-bert/fedsgd-short")
    ap.add_argument("--seeds", default="0-5", help="a-b: one spec per seed (the suite's layout)")
    ap.add_argument("--trials", type=int, default=1, help="trials per seed")
    ap.add_argument("--trim", action="store_true", help="malloc_trim(0) after each trial (glibc)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    a, b = (int(x) for x in args.seeds.split("-"))
    assert b < 1000, "development seeds only"
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from eval import executors
    from eval.catalog import catalog
    from eval.runner import TrialSpec, run_many

    overrides = dict(kv.split("=", 1) for kv in args.set)
    case = catalog().cases.get(args.case)
    from dataclasses import replace

    case = replace(case, protocol=replace(case.protocol, batch_size=1))
    specs = [TrialSpec(case=case, attack=args.attack, seed=s, trial=t, overrides=overrides)
             for s in range(a, b + 1) for t in range(args.trials)]
    inner = executors.local_executor
    t0 = time.process_time()
    print(f"start rss {rss_mb():.0f} MB", flush=True)

    def logged(todo, **kw):
        print(f"after preload: rss {rss_mb():.0f} MB, peak {peak_mb():.0f} MB, models held "
              f"{len(kw['resources'].models)}", flush=True)
        hwm_mb(reset=True)
        for i, (p, rec) in enumerate(inner(todo, **kw)):
            trial_peak = hwm_mb(reset=True)
            gc.collect()
            if args.trim:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            print(f"trial {i} seed {p.spec.seed}.{p.spec.trial} {rec['status']} rouge1 "
                  f"{rec['metrics'].get('rouge1', float('nan')):.3f} {rec.get('error') or ''}: rss {rss_mb():.0f} MB, "
                  f"trial peak {trial_peak:.0f} MB, "
                  f"models held {len(kw['resources'].models)}, live tensors {tensor_mb():.0f} MB, "
                  f"cpu {time.process_time() - t0:.0f} s", flush=True)
            yield p, rec

    executors.EXECUTORS["local"] = logged
    with tempfile.TemporaryDirectory() as d:
        run_many(specs, out_dir=d, progress=False)


if __name__ == "__main__":
    main()
