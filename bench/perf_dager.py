"""DAGER per batch: the original code path vs the optimised one, in the same process, on the same
batches (issue 18).

    python bench/perf_dager.py [--quick] [--device cpu]

``measure`` is also loaded by file path from ``bench/perf.py``. For each setting (case, batch size)
one FedSGD observation is built (seed 0) and attacked twice: ``DAGER(fast=False)`` (the code paths
of commit 56f2af4: full-vocabulary layer-1 scan through the model at every position, one backward
per last-token candidate, one span-distance call per decoder path) and ``DAGER()`` (the exact
speed-ups: ``scan.AffineScan``, the batched last-token backward, batched span checks). Both get the
same ``time_budget_s`` (``BUDGET_S``); a row whose run timed out says so in ``notes``, and then its
reconstruction depends on the speed. ``notes`` also says whether the two runs returned the same
token ids. ``peak_rss_mb`` is the process's peak resident memory so far (``ru_maxrss``), so it is
cumulative over the rows of one call.

``PERF_DAGER_BASE=<commit>`` replaces the original path by ``DAGER()`` as of that commit (loaded next to
the working tree's by ``bench/dager_base.py``): the before/after of a change on the same batches, in
one process. ``PERF_DAGER_SEED`` sets the batch seed (development seeds < 1000; default 0). Rows carry
``cpu_s`` / ``ratio_cpu`` (process CPU seconds: on a shared machine far steadier than the wall clock).
With ``PERF_DAGER_L2=1`` (the default) a third row runs ``DAGER(exact_scores=False)`` (the incremental
layer-2 test of ``l2_block.py``: same token ids, scores at float32 round-off); ``PERF_DAGER_L2=0`` drops it.
"""
from __future__ import annotations

import os
import resource
import sys
import time
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BUDGET_S = float(os.environ.get("PERF_DAGER_BUDGET", 600.0))
QUICK = [("text/gpt2/dager", 4)]
FULL = [("text/gpt2/dager", 8), ("text/gpt2/dager", 16), ("text/smollm2/dager", 8), ("text/smollm2/dager", 16),
        ("text/minilm-bert/dager", 4), ("text/minilm-bert/dager", 8)]
METRIC = "rouge1"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _setup(case_name: str, b: int, device: str, seed: int = 0, trial: int | None = None) -> tuple[Any, ...]:
    """Kit, case, model, prior, observation and ground truth of one FedSGD batch: this suite's own (model, data
    and client seeds ``seed``, ``seed + 1``, ``seed + 2``), or with ``trial`` the one the evaluation pipeline
    draws for that trial of ``seed`` (CPU; :func:`pipeline_batches`)."""
    import torch

    from common.fl import client_update
    from common.observe import observe
    from common.seed import make_generator
    from textleak.cases_dager import CASES
    from textleak.kit import TextKit

    if trial is not None:
        return next(pipeline_batches(case_name, b, [seed], [trial]))[2:]
    dev = torch.device(device)
    kit = TextKit()
    case = CASES[case_name].with_batch_size(b)
    model = kit.load_model(case, device=dev, generator=make_generator(seed))
    pool = kit.load_pool(case, data_path=None)
    prior = kit.make_prior(case, model, "text", device=device)
    batch, truth = kit.sample(pool, case, model=model, device=dev, generator=make_generator(seed + 1))
    obs = observe(client_update(model, batch, kit.loss_fn, case.protocol, generator=make_generator(seed + 2)),
                  case.threat)
    return kit, case, model, prior, obs, truth


def pipeline_batches(case_name: str, b: int, seeds: list[int], trials: list[int]):
    """Yield ``(seed, trial, kit, case, model, prior, obs, truth)`` for every development batch, drawn as the
    evaluation pipeline draws them (``eval/pipeline.py``; the model loaded once per seed). Seeds < 1000 only."""
    import torch

    from common.fl import client_update
    from common.observe import observe
    from common.seed import derive_seed, make_generator
    from textleak.cases_dager import CASES
    from textleak.kit import TextKit

    if any(s >= 1000 for s in seeds):
        raise SystemExit("development seeds (< 1000) only")
    cpu = torch.device("cpu")
    kit = TextKit()
    case = CASES[case_name].with_batch_size(b)
    pool = kit.load_pool(case, data_path=None)
    for seed in seeds:
        model = kit.load_model(case, device=cpu, generator=make_generator(derive_seed(seed, "model")))
        prior = kit.make_prior(case, model, "text", device="cpu")
        for trial in trials:
            batch, truth = kit.sample(pool, case, model=model, device=cpu,
                                      generator=make_generator(derive_seed(seed, trial, "data")))
            obs = observe(client_update(model, batch, kit.loss_fn, case.protocol,
                                        generator=make_generator(derive_seed(seed, trial, "client"))), case.threat)
            yield seed, trial, kit, case, model, prior, obs, truth


def _attack(fast: bool, kit, case, model, prior, obs, truth, *, base: str = "", exact_scores: bool = True) -> dict[str, Any]:
    from common.seed import make_generator
    from textleak.attacks.dager import DAGER, DagerConfig

    if base:
        from bench.dager_base import load_base

        pkg = load_base(base)
        atk = pkg.DAGER(pkg.DagerConfig(time_budget_s=BUDGET_S))
    else:
        atk = DAGER(DagerConfig(time_budget_s=BUDGET_S), fast=fast, exact_scores=exact_scores)
    t, c = time.perf_counter(), time.process_time()
    rec = atk.reconstruct(obs, model, prior, generator=make_generator(7))
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    metrics, _ = kit.score(rec, truth, case=case)
    return {"wall_s": wall, "cpu_s": cpu, "metric": float(metrics[METRIC]), "ids": rec.extras.get("token_ids"),
            "timed_out": bool(rec.stats.get("timed_out", 0.0)), "stats": rec.stats}


def _settings(quick: bool) -> list[tuple[str, int]]:
    """``PERF_DAGER_SETTINGS="text/gpt2/dager:16,..."`` overrides the list (a device run's short list)."""
    env = os.environ.get("PERF_DAGER_SETTINGS")
    if env:
        return [(c, int(b)) for c, b in (item.rsplit(":", 1) for item in env.split(",") if item)]
    return QUICK if quick else FULL


def _ids(ids) -> list | None:
    """Token ids as plain sorted lists (tensors on either device, sentences in any order), for the cpu/device check."""
    if ids is None:
        return None
    rows = ids.tolist() if hasattr(ids, "tolist") else [r.tolist() if hasattr(r, "tolist") else list(r) for r in ids]
    return sorted(rows)


def _device_rows(case_name: str, b: int, device: str, new: dict, setup) -> list[dict]:
    """On an accelerator: the optimised path again on the CPU (same batch, same process), and the ratio."""
    import torch

    cpu_setup = _setup(case_name, b, "cpu")
    cpu = _attack(True, *cpu_setup)
    same = _ids(cpu["ids"]) == _ids(new["ids"])
    threads = torch.get_num_threads()
    out = []
    for variant, r, dev, base, ratio in (
            (f"optimised (DAGER()) on cpu, {threads} threads", cpu, "cpu", "-", None),
            (f"optimised (DAGER()) on {device}", new, device, "optimised on cpu, same batch",
             cpu["wall_s"] / max(new["wall_s"], 1e-9))):
        out.append({"attack": "dager", "setting": f"{case_name} B={b}", "variant": variant, "baseline": base,
                    "wall_s": round(r["wall_s"], 2), "ratio": None if ratio is None else round(ratio, 2),
                    "peak_rss_mb": round(_peak_rss_mb(), 1), "metric_name": METRIC, "metric": round(r["metric"], 4),
                    "device": dev, "notes": ("timed out" if r["timed_out"] else "finished")
                    + f"; same token ids on cpu and {device}: {same}"})
    return out


def measure(*, quick: bool, device: str) -> list[dict]:
    """Seconds per batch of the original and the optimised DAGER paths (same process, same batches);
    on an accelerator (``device`` not cpu) the optimised path on the device and on the CPU instead
    (``PERF_DAGER_OLD=1`` adds the original path on the device)."""
    import torch

    rows: list[dict] = []
    base = os.environ.get("PERF_DAGER_BASE", "")
    seed = int(os.environ.get("PERF_DAGER_SEED", "0"))
    if seed >= 1000:
        raise SystemExit("PERF_DAGER_SEED: development seeds (< 1000) only")
    for case_name, b in _settings(quick):
        setup = _setup(case_name, b, device, seed)
        if device != "cpu":
            _attack(True, *_setup(case_name, 1, device))  # warm-up (kernel loading, cuBLAS): not timed
            new = _attack(True, *setup)
            try:
                rows += _device_rows(case_name, b, device, new, setup)
            except KeyboardInterrupt:  # a time limit during the CPU run: keep the device's row
                rows.append({"attack": "dager", "setting": f"{case_name} B={b}", "variant": f"optimised (DAGER()) on {device}",
                             "baseline": "-", "wall_s": round(new["wall_s"], 2), "ratio": None,
                             "peak_rss_mb": round(_peak_rss_mb(), 1), "metric_name": METRIC,
                             "metric": round(new["metric"], 4), "device": device,
                             "notes": "the CPU run was interrupted (time limit)"})
                return rows
            if os.environ.get("PERF_DAGER_OLD") != "1":
                continue
        old = _attack(False, *setup, base=base)
        rss_old = _peak_rss_mb()
        new = _attack(True, *setup)
        rss_new = _peak_rss_mb()
        variants = [(label := (f"DAGER() at {base}" if base else "original (DAGER(fast=False))"), old, rss_old),
                    ("optimised (DAGER())", new, rss_new)]
        if os.environ.get("PERF_DAGER_L2", "1") == "1":  # the incremental layer-2 test (round-off scores)
            variants.append(("optimised, DAGER(exact_scores=False)", _attack(True, *setup, exact_scores=False),
                             _peak_rss_mb()))
        setting = f"{case_name} B={b} seed {seed} ({device}, {torch.get_num_threads()} threads)"
        for variant, r, rss in variants:
            notes = [f"timed out at {BUDGET_S:.0f} s" if r["timed_out"] else "finished"]
            if r is not old:
                same = old["ids"] == r["ids"]
                notes.append(f"same token ids as {label}" if same else f"token ids DIFFER from {label}")
                notes.append(f"fast_scan={int(r['stats'].get('fast_scan', 0))}")
            rows.append({"attack": "dager", "setting": setting, "variant": variant,
                         "baseline": f"{label}, same process and batch",
                         "wall_s": round(r["wall_s"], 2), "ratio": round(old["wall_s"] / max(r["wall_s"], 1e-9), 2),
                         "cpu_s": round(r["cpu_s"], 2), "ratio_cpu": round(old["cpu_s"] / max(r["cpu_s"], 1e-9), 2),
                         "peak_rss_mb": round(rss, 1), "metric_name": METRIC, "metric": round(r["metric"], 4),
                         "device": device, "notes": "; ".join(notes)})
    return rows


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    keys = ["setting", "variant", "wall_s", "ratio", "cpu_s", "ratio_cpu", "peak_rss_mb", "metric_name", "metric", "notes"]
    print(" | ".join(keys))
    for row in measure(quick=args.quick, device=args.device):
        print(" | ".join(str(row.get(k)) for k in keys))


if __name__ == "__main__":
    main()
