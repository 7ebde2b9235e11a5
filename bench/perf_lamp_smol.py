"""LAMP / TAG on the decoder SmolLM2-135M (``text/smollm2/fedsgd``, B = 1) against the floor, by CPU time (issues 18, 20).

    python bench/perf_lamp_smol.py project [--reps N]   # per continuous step, per candidate and per swap round
    python bench/perf_lamp_smol.py attack [--steps N]   # a short lamp-cos run, ghost paths vs the vmap / autograd ones
    python bench/perf_lamp_smol.py diverge [--steps N]  # where those two runs part (init, step, round, N plain steps)

Sentence: data seed ``PERF_SMOL_SEED`` (default 7, development seeds < 1000), client seed + 1, attack seed 3.
"new" is the preset (ghost candidate scoring + ghost continuous step, which cover Llama since session 22), "old"
the same preset with ``ghost=False, ghost_step=False`` (``vmap(grad)`` per-candidate gradients, chunk capped by
``gradmatch.vmap_chunk``; autograd through the dummy gradient). The floor: a bare forward of the same model and
batch (``prior.loss_fn``, the attack's loss), the matched parameters' gradient with ``create_graph=True``,
``Σ <g, T>`` differentiated to the input embeddings. CPU seconds by ``time.process_time``, medians; peak RSS
per phase from ``VmHWM`` (reset through ``/proc/self/clear_refs``: the process's, so it includes what earlier phases
left allocated; a path's own peak is the ``attack`` mode's or a separate ``eval run``'s). Run with one thread, ``nice``.
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
CASE = "text/smollm2/fedsgd"

from perf_lamp_s20 import _hwm_mb, _reset_hwm  # noqa: E402 (the sibling bench: peak RSS since the last reset)


def _cpu(fn):
    c = time.process_time()
    r = fn()
    return time.process_time() - c, r


def _setup():
    import torch

    from common.seed import make_generator
    from eval.catalog import catalog
    from eval.pipeline import simulate
    from textleak.cases import CASES
    from textleak.kit import TextKit

    kit = TextKit()
    case = CASES[CASE].with_batch_size(1)
    cpu = torch.device("cpu")
    model = kit.load_model(case, device=cpu, generator=make_generator(0))
    pool = kit.load_pool(case, data_path=None)
    seed = int(os.environ.get("PERF_SMOL_SEED", "7"))
    assert seed < 1000, "development seeds only"
    t = simulate(case, kit, model=model, pool=pool, prior_kind="text", device=cpu, keep_batch=True,
                 data_generator=make_generator(seed), client_generator=make_generator(seed + 1))
    cat = catalog()

    def preset(name: str):
        _, cls, over = cat.resolve(name)
        return replace(cls.default_config(), **over)

    return kit, model, t, preset


def _floor_fn(s, model, x0):
    import torch

    params = dict(model.named_parameters())
    names, target = s.matcher.names, s.matcher.target
    tg = s.targets_of(s.ids_of(s.pin(x0)))

    def floor():
        x = x0.clone().requires_grad_(True)
        loss = s.prior.loss_fn(model, s.prior.build_batch(s.pin(x), s.mask, None, tg)).sum() * s.matcher.scale
        gs = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
        d = sum((g * target[n]).sum() for g, n in zip(gs, names))
        d.backward(inputs=[x])
    return floor


def _step_fn(s, x0):
    cfg = s.cfg

    def step():
        x = x0.clone().requires_grad_(True)
        xe = s.pin(x)
        loss = s.step_distance(xe, s.targets_of(s.ids_of(xe.detach())))
        if cfg.coeff_reg > 0:
            loss = loss + cfg.coeff_reg * (xe.norm(dim=-1)[s.body].mean() - s.init_size) ** 2
        loss.backward(inputs=[x])
        return float(loss.detach())
    return step


def project(reps: int) -> dict:
    import torch

    from common.seed import make_generator
    from textleak.components.search import TextSearch

    torch.set_num_threads(1)
    kit, model, t, preset = _setup()
    obs, prior, truth = t.attacker.observation, t.attacker.prior, t.truth
    ids = t.batch.inputs["input_ids"]
    x0 = prior.embedding[ids] + 0.05 * torch.randn(ids.shape + (prior.embedding.shape[1],), generator=make_generator(5))
    out: dict = {"case": CASE, "seed": int(os.environ.get("PERF_SMOL_SEED", "7")), "tokens": int(ids.shape[1]),
                 "threads": torch.get_num_threads(), "load_start": os.getloadavg()}
    lamp, tag = preset("lamp-cos"), preset("tag")
    S = {"new": TextSearch(lamp, obs, model, prior, make_generator(3)),
         "old": TextSearch(replace(lamp, ghost=False, ghost_step=False), obs, model, prior, make_generator(3)),
         "tag": TextSearch(tag, obs, model, prior, make_generator(3))}
    assert S["new"].ghost_ok() and not S["old"].ghost_ok() and not S["tag"].ghost_ok()
    out["matched_params"] = sum(S["new"].matcher.target[n].numel() for n in S["new"].matcher.names)
    out["vmap_chunk"] = S["old"].matcher.chunk
    out["svd_cpu_s"] = _cpu(S["new"].matcher.ghost_target)[0]  # the low-rank targets, once per attack
    fns = {"floor": _floor_fn(S["new"], model, x0), "step_new": _step_fn(S["new"], x0),
           "step_old": _step_fn(S["old"], x0), "step_tag": _step_fn(S["tag"], x0)}
    vals = {k: f() for k, f in fns.items() if k != "floor"}  # warm-up; the ghost and autograd steps agree
    out["step_values"] = vals
    samples: dict[str, list[float]] = {k: [] for k in fns}
    rss: dict[str, float] = {}
    for _ in range(reps):  # interleaved
        for k, f in fns.items():
            _reset_hwm()
            samples[k].append(_cpu(f)[0])
            rss[k] = max(rss.get(k, 0.0), _hwm_mb())
    med = {k: statistics.median(v) for k, v in samples.items()}
    out["cpu_s"], out["samples"], out["peak_rss_mb"] = med, samples, rss
    # candidate scoring of one sentence, per candidate: ghost vs vmap (8 proposals of a swap round, no LM)
    x = S["new"].pin(x0).detach()
    full = torch.from_numpy(S["new"].propose(S["new"].lens[0] - S["new"].pre - S["new"].suf, 8)) + S["new"].pre
    n = S["new"].lens[0]
    perm = torch.arange(n).expand(8, n).clone()
    perm[:, S["new"].pre:n - S["new"].suf] = full
    xc, idc = x[0, :n][perm], S["new"].ids_of(x)[0, :n][perm]
    cand = {}
    for k in ("new", "old"):
        _reset_hwm()
        c, d = _cpu(lambda: S[k].candidate_distances(0, xc, idc, None))
        cand[k] = {"cpu_s_per_candidate": c / 8, "peak_rss_mb": _hwm_mb(), "values": d.tolist()}
    out["candidates"] = cand
    # one swap round of 200 proposals with the LM prior (NLL caches cleared: the round pays its LM in full)
    rounds = []
    s = S["new"]
    parts = {"scoring": 0.0, "lm": 0.0}

    def timed(fn, part):
        def f(*a, **k):
            c, r = _cpu(lambda: fn(*a, **k))
            parts[part] += c
            return r
        return f

    s.candidate_distances = timed(s.candidate_distances, "scoring")
    s.nll, s.rough_nll = timed(s.nll, "lm"), timed(s.rough_nll, "lm")
    for i in range(max(2, reps // 2)):
        s._nll_cache.clear()
        s._rough_cache.clear()
        parts.update(scoring=0.0, lm=0.0)
        _reset_hwm()
        c, (xn, ch) = _cpu(lambda: s.discrete_step(S["new"].pin(x0 + 0.01 * i).detach()))
        rounds.append({"cpu_s": c, "changed": ch, "peak_rss_mb": _hwm_mb(), **{f"{k}_cpu_s": v for k, v in parts.items()}})
    out["round_new"] = rounds
    r = statistics.median(v["cpu_s"] for v in rounds)
    f = med["floor"]
    out["ratios"] = {"step_new": med["step_new"] / f, "step_old": med["step_old"] / f, "step_tag": med["step_tag"] / f,
                     "round_new": r / f, "cand_new": cand["new"]["cpu_s_per_candidate"] / f,
                     "cand_old": cand["old"]["cpu_s_per_candidate"] / f}
    # paper protocol per sentence: lamp-cos 2,000 steps + 1,000 init candidates + 24 rounds; tag 2,500 steps
    n_rounds = sum(1 for it in range(lamp.n_steps)
                   if it >= lamp.swap_burnin * lamp.n_steps and it % lamp.swap_every == 1)  # TextSearch.run's rule
    out["project_cpu_s"] = {
        "lamp_new": lamp.n_steps * med["step_new"] + (lamp.init_candidates + lamp.init_permutations)
        * cand["new"]["cpu_s_per_candidate"] + n_rounds * r,
        "lamp_old": lamp.n_steps * med["step_old"] + (lamp.init_candidates + lamp.init_permutations
                                                      + n_rounds * lamp.swap_candidates) * cand["old"]["cpu_s_per_candidate"],
        "tag": tag.n_steps * med["step_tag"], "rounds": n_rounds}
    out["project_cpu_s"]["lamp_new"] += out["svd_cpu_s"]
    out["project_ratio"] = {k: v / (lamp.n_steps * f) for k, v in out["project_cpu_s"].items() if k.startswith("lamp")}
    out["project_ratio"]["tag"] = out["project_cpu_s"]["tag"] / (tag.n_steps * f)
    out["load_end"] = os.getloadavg()
    return out


def attack(steps: int) -> dict:
    import torch

    from common.seed import make_generator
    from textleak.components.search import TextSearch

    torch.set_num_threads(1)
    kit, model, t, preset = _setup()
    obs, prior, truth = t.attacker.observation, t.attacker.prior, t.truth
    cfg = replace(preset("lamp-cos"), n_steps=steps, swap_every=10, swap_burnin=0.0, init_candidates=8,
                  init_permutations=8, swap_candidates=int(os.environ.get("PERF_SMOL_SWAPS", "40")))
    out = {"steps": steps, "truth": truth["sentences"], "swap_candidates": cfg.swap_candidates}
    for k, c in (("new", cfg), ("old", replace(cfg, ghost=False, ghost_step=False))):
        _reset_hwm()
        s = TextSearch(c, obs, model, prior, make_generator(3))
        cpu, rec = _cpu(s.run)
        out[k] = {"cpu_s": cpu, "peak_rss_mb": _hwm_mb(), "text": rec.data, "token_ids": rec.extras["token_ids"],
                  "best_loss": rec.stats["best_loss"], "swaps_accepted": rec.stats["swaps_accepted"],
                  "ghost": s.ghost_ok()}
    out["same_tokens"] = out["new"]["token_ids"] == out["old"]["token_ids"]
    return out


def diverge(steps: int) -> dict:
    """Where the two paths part on the ``attack`` mode's settings: the init choice, the step's value and embedding
    gradient at the same point, one swap round's choice at the same point, and ``steps`` Adam steps without swaps
    (per-step loss and decoded ids of each path)."""
    import torch

    from common.optim import adam
    from common.seed import make_generator
    from textleak.components.search import TextSearch

    torch.set_num_threads(1)
    kit, model, t, preset = _setup()
    obs, prior = t.attacker.observation, t.attacker.prior
    cfg = replace(preset("lamp-cos"), swap_every=10, swap_burnin=0.0, init_candidates=8, init_permutations=8,
                  swap_candidates=int(os.environ.get("PERF_SMOL_SWAPS", "40")))
    S = {"new": TextSearch(cfg, obs, model, prior, make_generator(3)),
         "old": TextSearch(replace(cfg, ghost=False, ghost_step=False), obs, model, prior, make_generator(3))}
    x0 = {k: s.initialise() for k, s in S.items()}
    out: dict = {"init_same": bool(torch.equal(x0["new"], x0["old"])),
                 "init_loss": {k: s.stats["init_grad_loss"] for k, s in S.items()}}
    x = x0["old"]
    g = {}
    for k, s in S.items():
        xv = x.clone().requires_grad_(True)
        xe = s.pin(xv)
        d = s.step_distance(xe, s.targets_of(s.ids_of(xe.detach())))
        g[k] = (float(d), torch.autograd.grad(d, xv)[0])
    out["step_value"] = {k: v[0] for k, v in g.items()}
    out["step_grad_rel_diff"] = float((g["new"][1] - g["old"][1]).norm() / g["old"][1].norm())
    rounds = {k: s.discrete_step(x) for k, s in S.items()}
    out["round_same"] = bool(torch.equal(rounds["new"][0], rounds["old"][0]))
    traj = {}
    for k, s in S.items():
        xv = x.clone().requires_grad_(True)
        losses, idss = [], []

        def objective(s=s, xv=xv, losses=losses, idss=idss):
            xe = s.pin(xv)
            ids = s.ids_of(xe.detach())
            idss.append(ids[0].tolist())
            loss = s.step_distance(xe, s.targets_of(ids))
            loss = loss + cfg.coeff_reg * (xe.norm(dim=-1)[s.body].mean() - s.init_size) ** 2
            losses.append(float(loss.detach()))
            return loss

        adam([xv], objective, lr=cfg.lr, iterations=steps)
        traj[k] = (losses, idss)
    first = next((i for i, (a, b) in enumerate(zip(traj["new"][1], traj["old"][1])) if a != b), None)
    out["steps"] = steps
    out["first_step_ids_differ"] = first
    out["loss_rel_diff_per_step"] = [abs(a - b) / abs(b) for a, b in zip(traj["new"][0], traj["old"][0])]
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["project", "attack", "diverge"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40)
    a = ap.parse_args()
    res = {"project": lambda: project(a.reps), "attack": lambda: attack(a.steps), "diverge": lambda: diverge(a.steps)}[a.mode]()
    print(json.dumps(res, indent=1, default=str))
