"""Memory of many LAMP/TAG trials in one process (issue 18): RSS after each trial of a driver run.

Runs ``eval.driver.run_many`` over one spec per seed (as ``eval/suites/textleak_lamp_paper.toml`` does: each
``[[run]]`` is one seed, so each trial has its own attacked model) with a reduced LAMP configuration, and prints
after each trial the process's current RSS (/proc/self/statm), the trial's peak RSS (VmHWM, reset before each trial
through /proc/self/clear_refs, which resets ``ru_maxrss`` too), the models the driver's ``Resources`` holds and the live
tensors' bytes (gc). ``--phases``: the largest sampled RSS per attack phase and, at the trial's highest sample, its
anonymous and file-backed parts. Development seeds only (< 1000). Results: ``results/bench/lamp-s18-memory.md``.

    OMP_NUM_THREADS=1 python bench/lamp_memory.py --seeds 0-11 --set n_steps=20 --set init_candidates=8 \
        --set init_permutations=8 --set swap_every=5 --set swap_candidates=16
    OMP_NUM_THREADS=1 python bench/lamp_memory.py --phases --seeds 0-0          # one trial at the preset's 2,000 steps
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


class PhaseSampler:
    """Samples the current RSS every ``period`` s in a thread and keeps the largest value per phase, the phase
    being the innermost of the wrapped ``TextSearch`` / ``LMPrior`` methods running (``--phases``)."""

    def __init__(self, period: float = 0.02) -> None:
        import threading

        self.stack: list[str] = ["outside"]
        self.at_top = (0.0, "", 0.0, 0.0)
        self.peak: dict[str, float] = {}
        self.period = period
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.period):
            key, r = self.stack[-1], rss_mb()
            self.peak[key] = max(self.peak.get(key, 0.0), r)
            if r > self.at_top[0] + 1:  # the composition at the trial's highest sample: anonymous vs file-backed pages
                with open("/proc/self/smaps_rollup") as f:
                    kb = {line.split(":")[0]: int(line.split()[1]) for line in f if line.endswith("kB\n")}
                self.at_top = (r, key, kb["Anonymous"] / 1024, (kb["Rss"] - kb["Anonymous"]) / 1024)

    def wrap(self, owner, name: str, label: str) -> None:
        fn = getattr(owner, name)
        sampler = self

        def wrapped(*a, **k):
            sampler.stack.append(label)
            try:
                return fn(*a, **k)
            finally:
                sampler.stack.pop()
        setattr(owner, name, wrapped)

    def install(self) -> None:
        from textleak import prior
        from textleak.components import search

        self.wrap(search.TextSearch, "run", "run: continuous step backward, Adam, best copy")
        self.wrap(search.TextSearch, "__init__", "setup (matcher, low-rank targets)")
        self.wrap(search.TextSearch, "initialise", "init candidates")
        self.wrap(search.TextSearch, "step_distance", "continuous step (forward)")
        self.wrap(search.TextSearch, "discrete_step", "swap round (ghost scoring)")
        self.wrap(search.TextSearch, "nll", "swap round: LM prior")
        self.wrap(prior.TextPrior, "lm", "LM prior load")
        self.thread.start()

    def report(self) -> None:
        r, key, anon, file = self.at_top
        print(f"  highest sample {r:.0f} MB in {key!r}: anonymous {anon:.0f} MB, file-backed {file:.0f} MB", flush=True)
        for k, v in sorted(self.peak.items(), key=lambda kv: -kv[1]):
            print(f"  phase peak {v:7.0f} MB  {k}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--attack", default="lamp-cos")
    ap.add_argument("--case", default="text/minilm-bert/fedsgd-short")
    ap.add_argument("--seeds", default="0-5", help="a-b: one spec per seed (the suite's layout)")
    ap.add_argument("--trials", type=int, default=1, help="trials per seed")
    ap.add_argument("--trim", action="store_true", help="malloc_trim(0) after each trial (glibc; the executors do it themselves since 371a2d6)")
    ap.add_argument("--out", help="keep the records and artifacts here (default: a temporary folder)")
    ap.add_argument("--phases", action="store_true", help="peak RSS per phase of the attack (sampled)")
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
    sampler = PhaseSampler() if args.phases else None
    if sampler is not None:
        sampler.install()
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
            if sampler is not None:
                sampler.report()
                sampler.peak.clear()
                sampler.at_top = (0.0, "", 0.0, 0.0)
            yield p, rec

    executors.EXECUTORS["local"] = logged
    if args.out:
        run_many(specs, out_dir=args.out, progress=False)
        return
    with tempfile.TemporaryDirectory() as d:
        run_many(specs, out_dir=d, progress=False)


if __name__ == "__main__":
    main()
