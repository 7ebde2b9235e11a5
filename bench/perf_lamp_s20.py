"""LAMP (``lamp-cos``) with and without ``lm_screen`` against its floor, in one process, by CPU time (issue 18).

    python bench/perf_lamp_s20.py --worker project [--quick]   # the 2,000-step projection, old vs new
    python bench/perf_lamp_s20.py --worker full                # the paper's 2,000 steps, old then new (or PERF_LAMP_ORDER)
    python bench/perf_lamp_s20.py --worker margin              # bf16 vs float32 NLLs of four swap rounds' texts

"old" is the preset with ``lm_screen=None`` (the float32 LM on every new text of a swap round), "new" the preset
with ``lm_screen=PERF_LAMP_SCREEN`` (default 0.25 nats, the default since session 20). Case ``text/minilm-bert/fedsgd-short`` (MiniLM pretrained, B = 1,
labels and length granted; development sentence of data seed ``PERF_LAMP_DATA_SEED``, default 1, client seed + 1,
attack seed 3). The floor is ``bench/perf_lamp_workers._floor_fn`` (forward + double backward, ``(g*T).sum()``).

* ``project``: the floor, the continuous step, the init scoring per candidate and one swap round of 200 proposals
  with the LM prior for old and new (NLL caches cleared every round, so every round pays its LM in full: an upper
  bound on the attack), interleaved; CPU seconds (``time.process_time``), medians; the 2,000-step attack projected
  as 2000 steps + 1,000 init candidates + 24 rounds (+ the one-time SVDs of the target).
* ``full``: the whole attack, old and new one after the other in the same process, the floor timed 10 times before
  each, at each of its 24 rounds and 10 times after; an attack's CPU seconds exclude the floor samples; per round
  the accepted proposal's index; peak RSS per attack (``VmHWM``, reset between them through ``clear_refs``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _clock(fn):
    c = time.process_time()
    r = fn()
    return time.process_time() - c, r


def _hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_hwm() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def worker(name: str, quick: bool) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from perf_lamp_workers import _floor_fn, _start, _step_fn

    from common.seed import make_generator
    from textleak.components.search import TextSearch

    kit, case, model, t, preset, obs, prior, truth, ids, x0 = _start("cpu")
    margin = float(os.environ.get("PERF_LAMP_SCREEN", "0.25"))
    cfgs = {"old": replace(preset("lamp-cos"), lm_screen=None), "new": replace(preset("lamp-cos"), lm_screen=margin)}
    out: dict = {"seq_len": int(obs.seq_lens[0]), "threads": torch.get_num_threads(), "lm_screen": margin,
                 "data_seed": int(os.environ.get("PERF_LAMP_DATA_SEED", "1")), "load_start": os.getloadavg()}
    assert out["data_seed"] < 1000, "development seeds only"
    prior.lm()
    if name == "project":
        ss = {k: TextSearch(c, obs, model, prior, make_generator(3)) for k, c in cfgs.items()}
        ss["new"].matcher = ss["old"].matcher  # same target (and its SVDs)
        out["factor_cpu_s"] = _clock(lambda: ss["old"].matcher.ghost_target())[0]
        fns = {"floor": _floor_fn(ss["old"], model, x0, "cpu"), "step": _step_fn(ss["old"], x0, "cpu")}
        for fn in fns.values():
            fn()
        xs = torch.randn((64,) + tuple(x0.shape), generator=make_generator(6))
        xs = torch.where(ss["old"].body.unsqueeze(-1), xs, ss["old"].pinned.unsqueeze(0))
        cpu: dict = {}
        same = []
        for r in range(3 if quick else 5):
            res = {}
            for which in (("old", "new") if r % 2 == 0 else ("new", "old")):
                s = ss[which]
                s.rng = np.random.default_rng(11 + r)  # the same 200 proposals for both
                s._nll_cache.clear()
                s._rough_cache.clear()
                c, res[which] = _clock(lambda: s.discrete_step(x0)[0])
                cpu.setdefault("round_" + which, []).append(c)
            same.append(bool(torch.equal(res["old"], res["new"])))
            cpu.setdefault("init", []).append(_clock(lambda: ss["old"].score_batches(xs))[0] / 64)
            for _ in range(5):
                for k, fn in fns.items():
                    cpu.setdefault(k, []).append(_clock(fn)[0])
        m = {k: statistics.median(v) for k, v in cpu.items()}
        out.update(same_round=same, cpu=m, samples=cpu)
        for which in ("old", "new"):
            total = 2000 * m["step"] + 1000 * m["init"] + 24 * m["round_" + which] + out["factor_cpu_s"]
            out[f"projected_cpu_{which}"] = total
            out[f"ratio_cpu_{which}"] = total / (2000 * m["floor"])
    elif name == "full":
        from eval.pipeline import score
        order = os.environ.get("PERF_LAMP_ORDER", "old,new").split(",")
        for which in order:
            s = TextSearch(cfgs[which], obs, model, prior, make_generator(3))
            floor = _floor_fn(s, model, x0, "cpu")
            samples: dict = {"before": [], "during": [], "after": []}
            for _ in range(12):
                samples["before"].append(_clock(floor)[0])
            samples["before"] = samples["before"][2:]
            inner = s.discrete_step
            chosen = []

            def discrete_step(x, inner=inner, samples=samples, chosen=chosen, floor=floor):
                samples["during"].append(_clock(floor)[0])
                nx, ch = inner(x)
                chosen.append(ch)
                return nx, ch
            s.discrete_step = discrete_step
            _reset_hwm()
            c, rec = _clock(s.run)
            peak = _hwm_mb()
            for _ in range(10):
                samples["after"].append(_clock(floor)[0])
            fc = sum(samples["during"])
            allf = [v for k in samples for v in samples[k]]
            m, _ = score(kit, rec, truth, case=case)
            row = {"attack_cpu_s": c - fc, "floor_cpu_s": statistics.median(allf),
                   "floor_medians": {k: statistics.median(v) for k, v in samples.items()},
                   "text": rec.data[0], "best_loss": float(rec.stats["best_loss"]), "rouge1": float(m["rouge1"]),
                   "rouge2": float(m["rouge2"]), "swaps": float(rec.stats["swaps_accepted"]), "changed": chosen,
                   "token_ids": rec.extras["token_ids"], "peak_rss_mb": peak, "exact_texts": len(s._nll_cache),
                   "rough_texts": len(s._rough_cache), "load": os.getloadavg()}
            row["ratio_cpu"] = row["attack_cpu_s"] / (2000 * row["floor_cpu_s"])
            out[which] = row
            print(json.dumps({which: row}), file=sys.stderr, flush=True)
        if "old" in out and "new" in out:
            out["same_text"] = out["old"]["text"] == out["new"]["text"]
            out["same_best_loss"] = out["old"]["best_loss"] == out["new"]["best_loss"]
            out["same_token_ids"] = out["old"]["token_ids"] == out["new"]["token_ids"]
        out["truth"] = truth["sentences"][0]
    elif name == "margin":  # the bf16 LM's error on swap rounds' texts, against lm_screen's margin
        s = TextSearch(cfgs["old"], obs, model, prior, make_generator(3))
        lm = prior.lm()
        rounds = []
        for noise, seed in ((0.05, 5), (0.05, 7), (0.4, 5), (0.4, 7)):
            x = prior.embedding[ids] + noise * torch.randn(ids.shape + (prior.embedding.shape[1],),
                                                          generator=make_generator(seed))
            seen: list = []
            s.nll = lambda texts, seen=seen: (seen.append(list(texts)), torch.zeros(len(texts)))[1]
            s.rng = np.random.default_rng(seed + 20)
            s.discrete_step(x)
            texts = sorted(set(seen[0]))
            f = lm.nll(texts)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                b = lm.nll(texts)
            err = (f - b).abs()
            rounds.append({"noise": noise, "seed": seed, "texts": len(texts), "max_err": float(err.max()),
                           "mean_err": float(err.mean()), "nll_min": float(f.min()), "nll_median": float(f.median())})
        out["rounds"] = rounds
    else:
        raise ValueError(f"unknown worker {name!r}")
    import resource
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["load_end"] = os.getloadavg()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", required=True, choices=("project", "full", "margin"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch
    torch.set_num_threads(args.threads)
    print(json.dumps(worker(args.worker, args.quick)))


if __name__ == "__main__":
    main()
