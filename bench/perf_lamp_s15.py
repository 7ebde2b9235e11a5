"""LAMP (``lamp-cos``) against its floor, this branch's path next to the main commit's, in CPU and wall seconds (issue 18).

    python bench/perf_lamp_s15.py [--threads 1,2] [--quick]         # rows: the one-process projection + short attacks
    python bench/perf_lamp_s15.py --worker full --threads 1          # the paper's 2,000 steps on the sentence
    PERF_LAMP_SET=s15 python bench/perf.py --only lamp --quick       # the same rows through the suite

Every number comes from one subprocess per worker (``peak_rss_mb`` is that process's ``ru_maxrss``); the case is
``text/minilm-bert/fedsgd-short`` (MiniLM pretrained, B = 1, labels and length granted; development sentence of
data seed ``PERF_LAMP_DATA_SEED``, default 1, client seed + 1, attack seed 3). "main" is the library code of commit
``MAIN`` (``textleak/components/ghost.py`` and ``gradmatch.py`` read from git and built into the same process; the
LM prior is the same code in both): the comparison is same process, interleaved.

* ``project``: the floor (the model's own forward on the dummy embeddings, ``autograd.grad`` w.r.t. every matched
  parameter with ``create_graph``, ``Σ <g, T>`` as ``(g * T).sum()`` and its backward to the embeddings; also a
  stronger floor with ``torch.dot``), the continuous step new and main, one discrete round of 200 proposals with
  the LM prior new and main (NLL cache cleared per round, so every round pays the LM in full: an upper bound on the
  attack, whose cache keeps earlier rounds' texts), the init scoring per candidate; CPU seconds
  (``time.process_time``: the machine is shared, its wall clock carries the other jobs' load) and wall seconds,
  medians; the 2,000-step attack projected as 2000 steps + 1,000 init candidates + 24 rounds (+ the new path's
  one-time SVDs of the target), for both paths.
* ``short-new`` / ``short-main``: an 80-step attack (16 + 16 init, 200 proposals every 20 steps, LM prior on):
  text, best loss, swaps accepted.
* ``sentences``: the short attack on development sentences ``PERF_LAMP_SEEDS`` (default 2,3,4), new and main.
* ``full``: the paper's ``lamp-cos`` (2,000 steps, 500 + 500 init, 24 rounds, LM prior) on the sentence, the floor
  timed (CPU and wall) 20 times before, at every discrete round and 20 times after; the attack's CPU and wall
  seconds exclude the floor samples. ``PERF_LAMP_PATH=main`` runs the main commit's path.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAIN = "f3279d8"  # the main commit this branch started from
CASE = "text/minilm-bert/fedsgd-short"


def _git(path: str) -> str:
    return subprocess.run(["git", "show", f"{MAIN}:{path}"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout


def main_matcher(s):
    """A ``GradMatcher`` of commit ``MAIN`` for ``TextSearch`` ``s`` (same model, prior, target and settings)."""
    from common.grads import observed_gradient

    ghost = types.ModuleType("main_ghost")
    exec(compile(_git("textleak/components/ghost.py"), f"{MAIN}:ghost.py", "exec"), ghost.__dict__)
    src = _git("textleak/components/gradmatch.py")
    src = src.replace("from ..prior import TextPrior", "from textleak.prior import TextPrior")
    src = src.replace("from .ghost import GhostScorer, Unsupported", "GhostScorer, Unsupported = _G.GhostScorer, _G.Unsupported")
    gm = types.ModuleType("main_gradmatch")
    gm.__dict__["_G"] = ghost
    exec(compile(src, f"{MAIN}:gradmatch.py", "exec"), gm.__dict__)
    obs, cfg = s.obs, s.cfg
    reduction = obs.protocol.loss_reduction if obs.protocol is not None else "mean"
    return gm.GradMatcher(s.model, s.prior, observed_gradient(obs), loss=cfg.loss, tag_factor=cfg.tag_factor,
                          reduction=reduction, batch_size=s.B, chunk=cfg.chunk)


def _floor_dot(s, model, x0):
    """The floor with ``Σ torch.dot(g, T)`` (no parameter-sized product in the forward): a stronger floor."""
    import torch

    params = dict(model.named_parameters())
    names, target = s.matcher.names, s.matcher.target
    flat = {n: target[n].reshape(-1) for n in names}

    def floor():
        x = x0.clone().requires_grad_(True)
        logits = model(inputs_embeds=x, attention_mask=s.mask).logits
        loss = torch.nn.functional.cross_entropy(logits, s.labels)
        gs = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
        d = sum(torch.dot(g.reshape(-1), flat[n]) for g, n in zip(gs, names))
        d.backward(inputs=[x])
    return floor


def _clock(fn):
    """(CPU s, wall s, result) of ``fn()``."""
    c, w = time.process_time(), time.perf_counter()
    r = fn()
    return time.process_time() - c, time.perf_counter() - w, r


def _med(v: list[float]) -> float:
    return statistics.median(v) if v else float("nan")


def worker(name: str, quick: bool) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from perf_lamp_workers import _floor_fn, _start, _step_fn

    from common.seed import make_generator
    from textleak.components.search import TextSearch

    kit, case, model, t, preset, obs, prior, truth, ids, x0 = _start("cpu")
    out: dict = {"seq_len": int(obs.seq_lens[0]), "threads": torch.get_num_threads(), "main": MAIN}

    def search(cfg, path: str) -> TextSearch:
        s = TextSearch(cfg, obs, model, prior, make_generator(3))
        if path == "main":
            s.matcher = main_matcher(s)
        return s

    if name == "project":
        s, sm = search(preset("lamp-cos"), "new"), search(preset("lamp-cos"), "main")
        st = search(preset("tag"), "new")
        c, w, _ = _clock(prior.lm)
        out["lm_load_s"] = w
        fns = {"floor": _floor_fn(s, model, x0, "cpu"), "floor_dot": _floor_dot(s, model, x0),
               "step": _step_fn(s, x0, "cpu"), "step_main": _step_fn(sm, x0, "cpu"), "tag": _step_fn(st, x0, "cpu")}
        c, w, _ = _clock(lambda: s.matcher.ghost_target())  # the new path's one-time SVDs of the target
        out["factor_cpu_s"], out["factor_s"] = c, w
        for fn in fns.values():  # warm-up
            fn()
        xs = torch.randn((64,) + tuple(x0.shape), generator=make_generator(6))
        xs = torch.where(s.body.unsqueeze(-1), xs, s.pinned.unsqueeze(0))
        cpu: dict = {}
        wall: dict = {}
        same = []
        for r in range(3 if quick else 5):
            res = {}
            for which in (("new", "main") if r % 2 == 0 else ("main", "new")):
                srch, sfx = (s, "") if which == "new" else (sm, "_main")
                srch.rng = np.random.default_rng(11 + r)  # the same 200 proposals for both paths
                srch._nll_cache.clear()  # every text scored each round (the attack keeps earlier rounds' NLLs)
                lm_c, lm_w = [], []
                inner = srch.nll

                def nll(texts, inner=inner, lm_c=lm_c, lm_w=lm_w):
                    c1, w1, v = _clock(lambda: inner(texts))
                    lm_c.append(c1)
                    lm_w.append(w1)
                    return v
                srch.nll = nll
                c1, w1, res[which] = _clock(lambda: srch.discrete_step(x0)[0])
                del srch.nll
                for k, v in (("round" + sfx, (c1, w1)), ("lm" + sfx, (sum(lm_c), sum(lm_w)))):
                    cpu.setdefault(k, []).append(v[0])
                    wall.setdefault(k, []).append(v[1])
                c1, w1, _ = _clock(lambda: srch.score_batches(xs))
                cpu.setdefault("init" + sfx, []).append(c1 / 64)
                wall.setdefault("init" + sfx, []).append(w1 / 64)
            same.append(bool(torch.equal(res["new"], res["main"])))
            for _ in range(5):
                for k, fn in fns.items():
                    c1, w1, _ = _clock(fn)
                    cpu.setdefault(k, []).append(c1)
                    wall.setdefault(k, []).append(w1)
        out["same_round"] = same
        out["cpu"] = {k: _med(v) for k, v in cpu.items()}
        out["wall"] = {k: _med(v) for k, v in wall.items()}
        out["samples"] = {"cpu": cpu, "wall": wall}
        for clock in ("cpu", "wall"):
            m = out[clock]
            for sfx in ("", "_main"):
                total = 2000 * m["step" + sfx] + 1000 * m["init" + sfx] + 24 * m["round" + sfx] + (
                    out["factor_cpu_s" if clock == "cpu" else "factor_s"] if not sfx else 0.0)
                out[f"projected_{clock}{sfx}"] = total
                out[f"ratio_{clock}{sfx}"] = total / (2000 * m["floor"])
                out[f"ratio_dot_{clock}{sfx}"] = total / (2000 * m["floor_dot"])
    elif name in ("short-new", "short-main"):
        from eval.pipeline import score
        prior.lm()
        cfg = replace(preset("lamp-cos"), n_steps=80, init_candidates=16, init_permutations=16, swap_every=20,
                      swap_candidates=200)
        s = search(cfg, name.removeprefix("short-"))
        c, w, rec = _clock(s.run)
        m, _ = score(kit, rec, truth, case=case)
        out.update(attack_cpu_s=c, attack_s=w, rouge1=float(m["rouge1"]), rouge2=float(m["rouge2"]), text=rec.data[0],
                   best_loss=float(rec.stats["best_loss"]), swaps=float(rec.stats["swaps_accepted"]), n_steps=80)
    elif name == "sentences":  # the short attack on more development sentences, new and main in one process
        from eval.pipeline import score, simulate
        prior.lm()
        cfg = replace(preset("lamp-cos"), n_steps=80, init_candidates=16, init_permutations=16, swap_every=20,
                      swap_candidates=200)
        res = []
        for seed in (int(v) for v in os.environ.get("PERF_LAMP_SEEDS", "2,3,4").split(",")):
            assert seed < 1000, "development seeds only"
            ts = simulate(case, kit, model=model, pool=kit.load_pool(case, data_path=None), prior_kind="text",
                          device=torch.device("cpu"), keep_batch=True, data_generator=make_generator(seed),
                          client_generator=make_generator(seed + 1))
            row = {"seed": seed, "truth": ts.truth["sentences"][0]}
            for path in ("new", "main"):
                sr = TextSearch(cfg, ts.attacker.observation, model, ts.attacker.prior, make_generator(3))
                if path == "main":
                    sr.matcher = main_matcher(sr)
                c, w, rec = _clock(sr.run)
                m, _ = score(kit, rec, ts.truth, case=case)
                row[path] = {"cpu_s": c, "wall_s": w, "text": rec.data[0], "best_loss": float(rec.stats["best_loss"]),
                             "rouge1": float(m["rouge1"]), "rouge2": float(m["rouge2"]),
                             "swaps": float(rec.stats["swaps_accepted"])}
            row["same_text"] = row["new"]["text"] == row["main"]["text"]
            res.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        out["sentences"] = res
    elif name == "full":
        from eval.pipeline import score
        path = os.environ.get("PERF_LAMP_PATH", "new")
        s = search(preset("lamp-cos"), path)
        floor = _floor_fn(s, model, x0, "cpu")
        c, w, _ = _clock(prior.lm)
        out["lm_load_s"] = w
        samples: dict = {"before": [], "during": [], "after": []}
        for _ in range(22):
            samples["before"].append(_clock(floor)[:2])
        samples["before"] = samples["before"][2:]
        inner = s.discrete_step

        def discrete_step(x):
            samples["during"].append(_clock(floor)[:2])
            return inner(x)
        s.discrete_step = discrete_step
        c, w, rec = _clock(s.run)
        for _ in range(20):
            samples["after"].append(_clock(floor)[:2])
        fc = sum(v[0] for v in samples["during"])
        fw = sum(v[1] for v in samples["during"])
        out.update(path=path, attack_cpu_s=c - fc, attack_s=w - fw, floor=samples, load=os.getloadavg())
        allf = [v for k in samples for v in samples[k]]
        out["floor_cpu_s"], out["floor_wall_s"] = _med([v[0] for v in allf]), _med([v[1] for v in allf])
        out["ratio_cpu"] = out["attack_cpu_s"] / (2000 * out["floor_cpu_s"])
        out["ratio_wall"] = out["attack_s"] / (2000 * out["floor_wall_s"])
        m, _ = score(kit, rec, truth, case=case)
        out.update(rouge1=float(m["rouge1"]), rouge2=float(m["rouge2"]), text=rec.data[0], truth=truth["sentences"][0],
                   stats={k: float(v) for k, v in rec.stats.items()}, lm_calls=len(s._nll_cache))
    else:
        raise ValueError(f"unknown worker {name!r}")
    import resource
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["load_end"] = os.getloadavg()
    return out


def _run(name: str, *, threads: int, quick: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--threads", str(threads)] + (
        ["--quick"] if quick else [])
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"worker {name} failed ({p.returncode}): {p.stderr[-2000:]}")
    return json.loads(lines[-1])


def _row(attack, setting, variant, baseline, wall_s, ratio, rss, metric_name="", metric=None, notes="", **extra):
    return {"attack": attack, "setting": setting, "variant": variant, "baseline": baseline, "wall_s": wall_s,
            "ratio": ratio, "peak_rss_mb": rss, "metric_name": metric_name, "metric": metric, "notes": notes, **extra}


def measure(*, quick: bool, threads: tuple[int, ...] = (1, 2)) -> list[dict]:
    """Rows for ``bench/perf.py`` (keys ``cpu_s`` / ``ratio_cpu``: process CPU seconds and their ratio)."""
    rows = []
    for th in threads:
        pj = _run("project", threads=th, quick=quick)
        c, w = pj["cpu"], pj["wall"]
        note = (f"cpu, {th} thread(s), L={pj['seq_len']} tokens; MiniLM pretrained; one process, interleaved, medians; "
                f"main = commit {MAIN}'s ghost/gradmatch; load {pj['load_end']}")
        for key, what in (("floor", "floor: forward + double backward, (g*T).sum()"),
                          ("floor_dot", "floor with torch.dot (stronger)"), ("step", "continuous step, new"),
                          ("step_main", "continuous step, main"), ("tag", "TAG continuous step (unchanged code)")):
            rows.append(_row("lamp-cos" if "step" in key else ("tag" if key == "tag" else "floor"), f"{CASE} {what}",
                             key, "floor", w[key], w[key] / w["floor"], pj["peak_rss_mb"], notes=note, cpu_s=c[key],
                             ratio_cpu=c[key] / c["floor"]))
        for key, what in (("round", "discrete round, 200 proposals + LM prior"), ("lm", "its LM prior part"),
                          ("init", "init scoring, per candidate")):
            for sfx in ("", "_main"):
                rows.append(_row("lamp-cos", f"{CASE} {what}", "new" if not sfx else "main", "main",
                                 w[key + sfx], w[key + sfx] / w[key + "_main"], pj["peak_rss_mb"],
                                 "same round result as main", float(all(pj["same_round"])), note,
                                 cpu_s=c[key + sfx], ratio_cpu=c[key + sfx] / c[key + "_main"]))
        for sfx in ("", "_main"):
            rows.append(_row("lamp-cos", f"{CASE} 2000 steps projected (2000 steps + 1000 init + 24 rounds, LM cache "
                             "cleared per round)", "new" if not sfx else "main", "2000 floor steps",
                             pj["projected_wall" + sfx], pj["ratio_wall" + sfx], pj["peak_rss_mb"],
                             notes=note + f"; vs the dot floor: cpu {pj['ratio_dot_cpu' + sfx]:.3f}, wall "
                                    f"{pj['ratio_dot_wall' + sfx]:.3f}",
                             cpu_s=pj["projected_cpu" + sfx], ratio_cpu=pj["ratio_cpu" + sfx]))
    qn, qm = _run("short-new", threads=1, quick=quick), _run("short-main", threads=1, quick=quick)
    for variant, q in (("new", qn), ("main", qm)):
        rows.append(_row("lamp-cos", f"{CASE} short attack (80 steps, 200 proposals every 20, LM prior)", variant, "-",
                         q["attack_s"], None, q["peak_rss_mb"], "rouge1", q["rouge1"],
                         f"cpu, 1 thread; rouge2 {q['rouge2']:.3f}; best loss {q['best_loss']!r}; swaps "
                         f"{q['swaps']:.0f}; same text as main: {qn['text'] == qm['text']}; text {q['text']!r}",
                         cpu_s=q["attack_cpu_s"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--worker")
    args = ap.parse_args()
    if args.worker:
        sys.path.insert(0, str(ROOT))
        import torch
        torch.set_num_threads(int(args.threads))
        print(json.dumps(worker(args.worker, args.quick)))
        return
    for r in measure(quick=args.quick, threads=tuple(int(t) for t in args.threads.split(","))):
        print(json.dumps(r))


if __name__ == "__main__":
    main()
