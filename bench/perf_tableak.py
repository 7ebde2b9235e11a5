"""TabLeak section of the performance suite (``bench/perf.py``): Adult B=32, the paper's settings
(FC [100,100,2] untrained, known labels, cosine, 30 members × 1500 Adam steps), one thread.

Variants, each in a fresh subprocess (its own peak RSS = ``ru_maxrss``), same batch and seeds:

* ``fast``: the closed-form engine (``TabLeakConfig(engine="fast")``, ``tableak/fast.py``);
* ``vmap``: all members as one ``torch.func.vmap`` program (``engine="vmap"``), the baseline;
* ``loop``: the sequential loop over members (``batched=False``; ``PERF_TABLEAK_VARIANTS=fast,vmap``
  leaves it out: at 1500 steps it takes several times the vmap engine's time);
* ``reference``: the original eth-sri/tableak code (``time_one_attack.py`` of the reference
  harness, experiment 46), when ``TABLEAK_REF`` (patched work tree) and ``TABLEAK_REF_PYTHON``
  (its venv's python) are set; it runs CONCURRENTLY with our variants (the harness's side-by-side
  protocol: one core each, ``taskset`` when two cores exist), on its own sample of Adult.

Ratios are ``wall_s(baseline) / wall_s(variant)`` (attack seconds, ``reconstruct`` only); on a
shared machine the wall clock mostly measures the other jobs, so every row also has ``cpu_s`` (the
process CPU time of the attack; for the reference, of its whole process, set-up included, which
understates our ratio) and ``ratio_cpu``. Variants run one after another, the reference beside them.
``PERF_TABLEAK_ITERATIONS`` overrides the step count (smoke runs). Run one variant by hand: ``python bench/perf_tableak.py --variant fast --iterations 1500``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARNESS = Path(os.environ.get("TABLEAK_REF_HARNESS", ROOT.parent.parent / "shared/reference/tableak/time_one_attack.py"))
CASE = "tabular/adult-fc/fedsgd-labels"


def _worker(variant: str, *, iterations: int, ensemble: int, batch: int, seed: int, device: str) -> dict:
    """One attack in this process; returns seconds, accuracy and this process's peak RSS."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from dataclasses import replace

    from common.seed import make_generator
    from common.threat import HONEST_WITH_LABELS
    from eval.catalog import catalog
    from eval.pipeline import score, simulate
    from tableak.attack import TabLeak, TabLeakConfig
    from tableak.kit import TabularKit

    dev = torch.device(device)
    case = catalog().cases.get(CASE).with_batch_size(batch)
    kit = TabularKit()
    g = make_generator(seed)
    model = kit.load_model(case, device=dev, generator=g)
    pool = kit.load_pool(case, data_path=None)
    t = simulate(case, kit, model=model, pool=pool, prior_kind="tabular", device=dev,
                 data_generator=g, client_generator=g, threat=HONEST_WITH_LABELS)
    cfg = TabLeakConfig(iterations=iterations, ensemble=ensemble)
    cfg = {"fast": replace(cfg, engine="fast"), "vmap": replace(cfg, engine="vmap"),
           "loop": replace(cfg, engine="vmap", batched=False)}[variant]
    atk = TabLeak(cfg)
    import torch._dynamo  # noqa: F401 - torch.func's first call imports it (seconds): a per-process cost, not timed
    if dev.type == "cuda":  # CUDA context, cuBLAS handles and kernel loading: once per process, not timed
        TabLeak(replace(cfg, iterations=5)).reconstruct(t.attacker.observation, model, t.attacker.prior,
                                                        generator=make_generator(seed + 1))
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    rec = atk.reconstruct(t.attacker.observation, model, t.attacker.prior, generator=make_generator(seed + 1))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    m = score(kit, rec, t.truth, case=case)[0]
    return {"wall_s": secs, "cpu_s": cpu, "accuracy": m["accuracy"], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "fast_engine": rec.stats.get("fast_engine"),
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None}


def _cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return []


def _pin(core: int | None) -> list[str]:
    return ["taskset", "-c", str(core)] if core is not None and shutil.which("taskset") else []


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)  # keep carried packages
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": path}


def _run_ours(variant: str, core: int | None, **kw) -> dict:
    args = [sys.executable, str(Path(__file__).resolve()), "--variant", variant] + \
        [f"--{k}={v}" for k, v in kw.items()]
    out = subprocess.run(_pin(core) + args, capture_output=True, text=True, env=_env(), cwd=ROOT, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"perf_tableak worker {variant} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _start_reference(iterations: int, batch: int, core: int | None) -> tuple[subprocess.Popen | None, str]:
    ref, py = os.environ.get("TABLEAK_REF"), os.environ.get("TABLEAK_REF_PYTHON")
    if not ref or not py:
        return None, "reference skipped: set TABLEAK_REF (patched eth-sri/tableak tree) and TABLEAK_REF_PYTHON"
    if not HARNESS.exists():
        return None, f"reference skipped: harness {HARNESS} not found (TABLEAK_REF_HARNESS)"
    # a thin wrapper reports the reference process's peak RSS (its only child's ru_maxrss) on stderr
    wrap = ("import json, resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
            "print(json.dumps({'peak_rss_mb': u.ru_maxrss / 1024, 'process_cpu_s': u.ru_utime + u.ru_stime}), "
            "file=sys.stderr); sys.exit(r.returncode)")
    cmd = _pin(core) + [sys.executable, "-c", wrap, py, str(HARNESS), "--repo", ref, "--batch_size", str(batch),
                        "--threads", "1", "--max_iterations", str(iterations)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env), ""


def measure(*, quick: bool, device: str) -> list[dict]:
    iterations = int(os.environ.get("PERF_TABLEAK_ITERATIONS", 150 if quick else 1500))
    kw = {"iterations": iterations, "ensemble": 30, "batch": 32, "seed": 42, "device": device}
    cores = _cores()
    ours_core = cores[-1] if len(cores) >= 2 else None
    ref_core = cores[0] if len(cores) >= 2 else None
    setting = f"Adult B=32, FC[100,100,2], 30 members x {iterations} it, 1 thread, {device}"
    proc, ref_note = (None, "reference is CPU-only") if device != "cpu" else _start_reference(iterations, 32, ref_core)
    default = "fast,vmap" if device != "cpu" else "fast,vmap,loop"  # the loop is minutes of kernel launches on a GPU
    variants = [v for v in os.environ.get("PERF_TABLEAK_VARIANTS", default).split(",") if v]
    if "fast" not in variants or (device == "cpu" and "vmap" not in variants):
        raise ValueError("PERF_TABLEAK_VARIANTS must include fast and (on the CPU) vmap; loop is optional")
    res: dict = {}
    cpu_fast = None
    interrupted = ""
    try:
        res["fast"] = _run_ours("fast", ours_core, **kw)
        # on an accelerator, the same fast engine on the CPU (1 thread) in the same run: the device's speed-up
        cpu_fast = _run_ours("fast", ours_core, **(kw | {"device": "cpu"})) if device != "cpu" else None
        for v in variants[1:] if variants[0] == "fast" else [v for v in variants if v != "fast"]:
            res[v] = _run_ours(v, ours_core, **kw)
    except KeyboardInterrupt:  # a time limit (bench/gpu.sh): the rows measured so far
        if device == "cpu":
            raise
        interrupted = f"; interrupted (time limit) after {', '.join(res)}"
    variants = [v for v in variants if v in res]
    ref = None
    if proc is not None:
        out, err = proc.communicate()
        if proc.returncode == 0:
            ref = json.loads(out.strip().splitlines()[-1])
            ref.update(json.loads(err.strip().splitlines()[-1]))
        else:
            ref_note = f"reference failed (rc {proc.returncode}): {err.strip().splitlines()[-1] if err.strip() else ''}"
    concurrent = "reference ran concurrently on another core" if ref is not None else "no concurrent reference"
    rows = []

    def row(variant, baseline, wall, cpu, rss, acc, notes):
        return {"attack": "tableak", "setting": setting, "variant": variant, "baseline": baseline, "wall_s": wall,
                "cpu_s": cpu, "ratio": None, "ratio_cpu": None, "peak_rss_mb": rss, "metric_name": "accuracy", "metric": acc, "notes": notes}

    notes = {"fast": "closed-form engine (tableak/fast.py)", "vmap": "torch.func.vmap engine (previous default)",
             "loop": "sequential loop over members (batched=False)"}
    for v in variants:
        note = notes[v]
        r = row(v, "vmap" if "vmap" in res else "-", res[v]["wall_s"], res[v]["cpu_s"], res[v]["peak_rss_mb"],
                res[v]["accuracy"], f"{note}; seed 42; {concurrent}{interrupted}")
        if "vmap" in res:
            r["ratio"] = res["vmap"]["wall_s"] / res[v]["wall_s"]
            r["ratio_cpu"] = res["vmap"]["cpu_s"] / res[v]["cpu_s"]
        r["device"] = device
        if res[v].get("cuda_peak_mb") is not None:
            r["notes"] += f"; CUDA peak {res[v]['cuda_peak_mb']:.0f} MB"
        rows.append(r)
    if cpu_fast is not None:
        rows.append(row("fast (cpu, 1 thread)", "-", cpu_fast["wall_s"], cpu_fast["cpu_s"],
                        cpu_fast["peak_rss_mb"], cpu_fast["accuracy"],
                        "the same closed-form engine on the CPU in the same run, seed 42") | {"device": "cpu"})
        rows.append(row(f"fast ({device})", "fast (cpu, 1 thread)", res["fast"]["wall_s"], res["fast"]["cpu_s"],
                        res["fast"]["peak_rss_mb"], res["fast"]["accuracy"], f"speed-up of {device} over one CPU thread")
                    | {"ratio": cpu_fast["wall_s"] / res["fast"]["wall_s"], "device": device})
    if ref is not None:
        rr = row("reference", "reference", ref["attack_seconds"], ref.get("process_cpu_s"), ref.get("peak_rss_mb"),
                 ref["accuracy"] / 100,
                 f"eth-sri/tableak experiment 46 via time_one_attack.py, its own sample of Adult "
                 f"(cat {ref.get('cat_accuracy'):.1f} %, cont {ref.get('cont_accuracy'):.1f} %); concurrent with ours; "
                 f"cpu_s is the whole process (imports and data loading included)")
        rr["ratio"] = rr["ratio_cpu"] = 1.0
        rows.append(rr)
        for i, v in enumerate(variants):
            rows.append({**rows[i], "baseline": "reference", "ratio": ref["attack_seconds"] / res[v]["wall_s"],
                         "ratio_cpu": ref["process_cpu_s"] / res[v]["cpu_s"]})
    else:
        rows.append({"attack": "tableak", "setting": setting, "variant": "reference", "baseline": "reference",
                     "wall_s": None, "ratio": None, "peak_rss_mb": None, "metric_name": "accuracy", "metric": None,
                     "notes": ref_note})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=["fast", "vmap", "loop"], required=True)
    ap.add_argument("--iterations", type=int, default=1500)
    ap.add_argument("--ensemble", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    print(json.dumps(_worker(a.variant, iterations=a.iterations, ensemble=a.ensemble, batch=a.batch, seed=a.seed,
                             device=a.device)))


if __name__ == "__main__":
    main()
