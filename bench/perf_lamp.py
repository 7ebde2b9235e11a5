"""Performance of LAMP (``lamp-cos``) and TAG next to their floor: a bare forward + double backward.

    python bench/perf_lamp.py [--quick] [--device cpu] [--threads 1]

``measure(quick=..., device=...)`` returns rows (attack, setting, variant, baseline, wall_s, ratio,
peak_rss_mb, metric_name, metric, notes); ``bench/perf.py`` loads this module by path. Every row
comes from its own subprocess (``--worker NAME``), so ``peak_rss_mb`` is that process's peak
resident set (``ru_maxrss``; importing torch alone is ~0.7 GB in this venv). All on the MiniLM BERT
case ``text/minilm-bert/fedsgd-short`` (B=1, one client sentence), the paper's settings:

* ``floor``: the model's own forward on the dummy embeddings, ``autograd.grad`` w.r.t. every
  matched parameter with ``create_graph``, ``Σ <g, g*>`` and its backward to the embeddings;
* ``lamp-cos`` / ``tag`` continuous step: the attack's objective (distance + regulariser) and its
  backward, as the Adam loop runs it; ratio = step / floor;
* candidate scoring (init: 1,000 candidate batches; swaps: 200 candidates per round): the ghost
  products (``ghost=True``, :mod:`textleak.components.ghost`) vs the previous vmap per-candidate
  gradients (``ghost=False``, the code of commit 56f2af4), ratio = new / old;
* one discrete round with the SmolLM2 LM prior, new vs old;
* the projected 2,000-step attack (2000 continuous steps + 1,000 init candidates + 24 rounds)
  against 2,000 floor steps, from the rows above and (``project``) from one process that
  interleaves floor steps, continuous steps, rounds with the LM prior and init scoring;
* ``--full``: the paper's 2,000-step run itself (``PERF_LAMP_FULL=new,old,bf16`` picks variants),
  the floor timed at every discrete round of the run;
* quality: a short attack (``--quick``: 80 steps) with ``ghost`` on and off on the same seed:
  ROUGE-1 of both and whether the reconstructions are equal.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASE = "text/minilm-bert/fedsgd-short"
FIELDS = ("attack", "setting", "variant", "baseline", "wall_s", "ratio", "peak_rss_mb", "metric_name", "metric",
          "notes")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- workers (run in a subprocess each) ------------------------------------------------------------
def _random_minilm(generator):
    """MiniLM-L6's architecture (6 layers, hidden 384, its WordPiece) with random weights: the same
    per-step cost as the pretrained model where its weights cannot travel (a device machine)."""
    import transformers as tf

    from textleak.models import TextModelInfo, _finish, _fresh_head, _random_init, minilm_dir, minilm_tokenizer

    cfg = tf.BertConfig.from_pretrained(str(minilm_dir()), num_labels=2, attn_implementation="eager")
    model = _random_init(lambda: tf.BertForSequenceClassification(cfg), generator)
    _fresh_head(model, generator)
    return _finish(model, TextModelInfo("minilm-config-random", "encoder", minilm_tokenizer(), 2))


def _setup(device: str):
    """``PERF_LAMP_RANDOM_MINILM=1``: MiniLM's architecture with random weights; ``PERF_LAMP_LM=NAME``:
    the LM prior (case option ``lm_prior``, e.g. ``gpt2``: GPT-2-small's configuration, random);
    ``PERF_LAMP_DATA_SEED=S`` (default 1, development seeds < 1000): the sentence (data seed S, client seed S + 1)."""
    import torch

    from common.seed import make_generator
    from eval.catalog import catalog
    from eval.pipeline import simulate
    from textleak.cases import CASES
    from textleak.kit import TextKit

    kit = TextKit()
    case = CASES[CASE].with_batch_size(1)
    if os.environ.get("PERF_LAMP_LM"):
        case = replace(case, options={**case.options, "lm_prior": os.environ["PERF_LAMP_LM"]})
    dev = torch.device(device)
    if os.environ.get("PERF_LAMP_RANDOM_MINILM") == "1":
        model = _random_minilm(make_generator(0)).to(dev)
    else:
        model = kit.load_model(case, device=dev, generator=make_generator(0))
    pool = kit.load_pool(case, data_path=None)
    t = simulate(case, kit, model=model, pool=pool, prior_kind="text", device=dev, keep_batch=True,
                 data_generator=make_generator(int(os.environ.get("PERF_LAMP_DATA_SEED", "1"))),
                 client_generator=make_generator(int(os.environ.get("PERF_LAMP_DATA_SEED", "1")) + 1))
    cat = catalog()

    def preset(name: str):
        _, cls, over = cat.resolve(name)
        return replace(cls.default_config(), **over)

    return kit, case, model, t, preset


def _timed(fn, reps: int, warm: int = 2) -> float:
    """Median seconds of ``fn`` over ``reps`` runs after ``warm`` warm-ups (a shared machine: medians)."""
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def _sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _step_fn(s, x0, device: str):
    """One continuous step as ``TextSearch.run`` takes it: objective (distance + regulariser) and backward."""
    cfg = s.cfg

    def step():
        x = x0.clone().requires_grad_(True)
        xe = s.pin(x)
        loss = s.step_distance(xe)
        if cfg.coeff_reg > 0:
            loss = loss + cfg.coeff_reg * (xe.norm(dim=-1)[s.body].mean() - s.init_size) ** 2
        loss.backward(inputs=[x])
        _sync(device)
    return step


def _floor_fn(s, model, x0, device: str):
    """The floor of one step: a bare forward + double backward of the same model and batch (the
    gradient's inner product with the target, differentiated to the input embeddings)."""
    import torch

    params = dict(model.named_parameters())
    names, target = s.matcher.names, s.matcher.target

    def floor():
        x = x0.clone().requires_grad_(True)
        logits = model(inputs_embeds=x, attention_mask=s.mask).logits
        loss = torch.nn.functional.cross_entropy(logits, s.labels)
        gs = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
        d = sum((g * target[n]).sum() for g, n in zip(gs, names))
        d.backward(inputs=[x])
        _sync(device)
    return floor


def _eager_lm(prior):
    """The previous LM prior (transformers' float32 load of the GGUF, full logits) installed on ``prior``."""
    from common.seed import make_generator
    from textleak.models import load_text_model, smollm2_tokenizer
    from textleak.prior import LMPrior

    m = load_text_model("smollm2", generator=make_generator(0))
    for p in m.parameters():
        p.requires_grad_(False)
    prior._lm = LMPrior(m, smollm2_tokenizer())
    return prior._lm


def worker(name: str, quick: bool, device: str) -> dict:
    import torch

    from common.seed import make_generator
    from textleak.components.search import TextSearch

    kit, case, model, t, preset = _setup(device)
    obs, prior, truth = t.attacker.observation, t.attacker.prior, t.truth
    ids = t.batch.inputs["input_ids"]
    x0 = prior.embedding[ids].to(ids.device) + 0.05 * torch.randn(
        ids.shape + (prior.embedding.shape[1],), generator=make_generator(5)).to(ids.device)
    reps = 5 if quick else 20
    out: dict = {"seq_len": int(obs.seq_lens[0])}
    if name == "steps":  # floor, lamp-cos and tag continuous steps, interleaved (medians)
        fns = {}
        for attack, over in (("lamp-cos", {}), ("tag", {}), ("lamp-cos-old", {"ghost_step": False})):
            s = TextSearch(replace(preset(attack.removesuffix("-old")), coeff_perplexity=0.0, **over), obs, model, prior,
                           make_generator(3))
            fns[attack] = _step_fn(s, x0, device)
        fns["floor"] = _floor_fn(s, model, x0, device)
        ts: dict = {k: [] for k in fns}
        for i in range(reps + 2):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                if i >= 2:
                    ts[k].append(time.perf_counter() - t0)
        out.update({f"{k}_s": sorted(v)[len(v) // 2] for k, v in ts.items()})
    elif name.startswith("init-") or name.startswith("swap-") or name.startswith("round-"):
        ghost = not name.endswith("-old")
        cfg = replace(preset("lamp-cos"), ghost=ghost, lm_bf16=name.endswith("-bf16"))
        if not name.startswith("round-"):
            cfg = replace(cfg, coeff_perplexity=0.0)
        s = TextSearch(cfg, obs, model, prior, make_generator(3))
        n_cand = 64 if quick else 200
        if name.startswith("init-"):
            xs = torch.randn((n_cand,) + tuple(x0.shape), generator=make_generator(6)).to(x0.device)
            xs = torch.where(s.body.unsqueeze(-1), xs, s.pinned.unsqueeze(0))
            out["per_candidate_s"] = _timed(lambda: s.score_batches(xs), 1 if quick else 3, warm=1) / n_cand
            out["choice"] = int(s.score_batches(xs).argmin())
        else:
            if name.startswith("round-"):
                prior.lm()  # load the LM prior outside the timing
            s.cfg = replace(s.cfg, swap_candidates=200)
            res = []

            def one():
                s.rng = __import__("numpy").random.default_rng(11)  # the same 200 proposals each time
                s._nll_cache.clear()  # score every text each time
                res.append(s.discrete_step(x0)[0])
            out["round_s"] = _timed(one, 1 if quick else 3, warm=1)
            out["choice_sum"] = float(res[-1].sum())
    elif name == "project":  # one process, interleaved: floor, continuous step, one discrete round with the LM
        # prior (the paper's 200 candidates), init scoring; the 2,000-step attack projected from these
        import numpy as np
        bf16 = os.environ.get("PERF_LAMP_LM_BF16") == "1"  # the opt-in bf16 LM prior
        s = TextSearch(replace(preset("lamp-cos"), lm_bf16=bf16), obs, model, prior, make_generator(3))
        out["lm_bf16"] = bf16
        t0 = time.perf_counter()
        prior.lm()
        out["lm_load_s"] = time.perf_counter() - t0
        floor = _floor_fn(s, model, x0, device)
        step = _step_fn(s, x0, device)
        xs = torch.randn((64,) + tuple(x0.shape), generator=make_generator(6)).to(x0.device)
        xs = torch.where(s.body.unsqueeze(-1), xs, s.pinned.unsqueeze(0))
        ts: dict = {"floor": [], "step": [], "round": [], "init": []}
        for r in range(3 if quick else 4):
            s.rng = np.random.default_rng(11 + r)
            s._nll_cache.clear()
            t0 = time.perf_counter()
            s.discrete_step(x0)
            ts["round"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            s.score_batches(xs)
            ts["init"].append((time.perf_counter() - t0) / 64)
            for _ in range(5):
                for k, fn in (("floor", floor), ("step", step)):
                    t0 = time.perf_counter()
                    fn()
                    ts[k].append(time.perf_counter() - t0)
        print(json.dumps(ts), file=sys.stderr, flush=True)
        med = {k: sorted(v)[len(v) // 2] for k, v in ts.items()}
        out.update({f"{k}_s": v for k, v in med.items()}, samples=ts, load=os.getloadavg())
        total = 2000 * med["step"] + 1000 * med["init"] + 24 * med["round"]
        out.update(projected_s=total, projected_ratio=total / (2000 * med["floor"]))
    elif name in ("lm-new", "lm-old"):  # the LM prior alone: load, then the distinct texts of one discrete round
        import numpy as np
        s = TextSearch(preset("lamp-cos"), obs, model, prior, make_generator(3))
        t0 = time.perf_counter()
        lm = _eager_lm(prior) if name == "lm-old" else prior.lm()
        out["load_s"] = time.perf_counter() - t0
        texts: list[str] = []
        inner = s.nll
        s.nll = lambda ts: (texts.extend(ts), inner(ts))[1]
        s.rng = np.random.default_rng(11)
        s.discrete_step(x0)
        todo = sorted(set(texts))
        vals = []
        out["nll_s"] = _timed(lambda: vals.append(lm.nll(todo)), 1 if quick else 3, warm=1)
        out.update(n_texts=len(todo), nll=vals[-1].tolist())
    elif name in ("qlm-new", "qlm-old"):  # a short attack with the LM prior on, packed vs eager LM, same seeds
        from eval.pipeline import score
        if name == "qlm-old":
            _eager_lm(prior)
        else:
            prior.lm()  # loaded outside the timing, as the old one
        cfg = replace(preset("lamp-cos"), n_steps=80, init_candidates=16, init_permutations=16, swap_every=20,
                      swap_candidates=32)
        t0 = time.perf_counter()
        rec = TextSearch(cfg, obs, model, prior, make_generator(3)).run()
        out["attack_s"] = time.perf_counter() - t0
        m, _ = score(kit, rec, truth, case=case)
        out.update(rouge1=float(m["rouge1"]), rouge2=float(m["rouge2"]), text=rec.data[0], n_steps=cfg.n_steps,
                   best_loss=float(rec.stats["best_loss"]))
    elif name.startswith("quality-"):
        from eval.pipeline import score
        cfg = replace(preset("lamp-cos"), ghost=name.endswith("-new"))
        if quick:
            cfg = replace(cfg, n_steps=80, init_candidates=16, init_permutations=16, swap_every=20,
                          swap_candidates=32)
        else:
            cfg = replace(cfg, n_steps=300, init_candidates=100, init_permutations=100, swap_every=25)
        t0 = time.perf_counter()
        rec = TextSearch(cfg, obs, model, prior, make_generator(3)).run()
        out["attack_s"] = time.perf_counter() - t0
        m, _ = score(kit, rec, truth, case=case)
        out.update(rouge1=float(m["rouge1"]), rouge2=float(m["rouge2"]), text=rec.data[0], n_steps=cfg.n_steps)
    elif name.startswith("sentences-"):  # 5 sentences, a mid-size attack without the LM (the part that changed)
        from eval.pipeline import score
        from eval.pipeline import simulate
        cfg = replace(preset("lamp-cos"), ghost=name.endswith("-new"), coeff_perplexity=0.0, n_steps=150,
                      init_candidates=100, init_permutations=100, swap_every=25, swap_candidates=64)
        res = []
        for seed in range(5):
            ts = simulate(case, kit, model=model, pool=kit.load_pool(case, data_path=None), prior_kind="text",
                          device=torch.device(device), keep_batch=True, data_generator=make_generator(100 + seed),
                          client_generator=make_generator(200 + seed))
            t0 = time.perf_counter()
            rec = TextSearch(cfg, ts.attacker.observation, model, ts.attacker.prior, make_generator(3)).run()
            m, _ = score(kit, rec, ts.truth, case=case)
            res.append({"attack_s": time.perf_counter() - t0, "rouge1": float(m["rouge1"]), "rouge2": float(m["rouge2"]),
                        "text": rec.data[0], "truth": ts.truth["sentences"][0]})
        out["sentences"] = res
    elif name.startswith("full"):  # the paper's lamp-cos (2,000 steps) on the sentence; floor steps before,
        # after and at every discrete round (timed apart from the attack: a loaded machine's floor drifts)
        from eval.pipeline import score
        variant = name.removeprefix("full").lstrip("-") or "new"
        over = {"new": {}, "old": {"ghost": False, "ghost_step": False}, "bf16": {"lm_bf16": True}}[variant]
        cfg = replace(preset("lamp-cos"), **over)
        s = TextSearch(cfg, obs, model, prior, make_generator(3))
        floor = _floor_fn(s, model, x0, device)
        t0 = time.perf_counter()
        prior.lm()
        out["lm_load_s"] = time.perf_counter() - t0
        fl = [_timed(floor, 20)]
        inner, during = s.discrete_step, []

        def discrete_step(x):
            t1 = time.perf_counter()
            floor()
            during.append(time.perf_counter() - t1)
            return inner(x)
        s.discrete_step = discrete_step
        t0 = time.perf_counter()
        rec = s.run()
        out["attack_s"] = time.perf_counter() - t0 - sum(during)
        print(json.dumps({"attack_s": out["attack_s"], "text": rec.data[0], "during": during}), file=sys.stderr, flush=True)
        fl.append(_timed(floor, 20))
        out["floor_s"] = fl
        out["floor_during_s"] = sorted(during)[len(during) // 2] if during else None
        out["variant"] = variant
        out["load"] = os.getloadavg()
        m, _ = score(kit, rec, truth, case=case)
        out.update(rouge1=float(m["rouge1"]), rouge2=float(m["rouge2"]), text=rec.data[0], truth=truth["sentences"][0],
                   n_steps=cfg.n_steps, stats={k: float(v) for k, v in rec.stats.items()})
    else:
        raise ValueError(f"unknown worker {name!r}")
    out["peak_rss_mb"] = _rss_mb()
    if device.startswith("cuda"):
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def _run_worker(name: str, *, quick: bool, device: str, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--device", device,
           "--threads", str(threads)] + (["--quick"] if quick else [])
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"worker {name} failed ({p.returncode}): {p.stderr[-2000:]}")
    return json.loads(lines[-1])


def _row(attack, setting, variant, baseline, wall_s, ratio, rss, metric_name="", metric=None, notes="") -> dict:
    return dict(zip(FIELDS, (attack, setting, variant, baseline, wall_s, ratio, rss, metric_name, metric, notes)))


def _model_note() -> str:
    m = "MiniLM architecture, random weights" if os.environ.get("PERF_LAMP_RANDOM_MINILM") == "1" else "MiniLM pretrained"
    return f"{m}; LM prior {os.environ.get('PERF_LAMP_LM') or 'smollm2'}"


def measure_device(*, quick: bool, device: str, threads: int) -> list[dict]:
    """On an accelerator: the continuous step (floor, lamp-cos, tag) and one discrete round with the
    LM prior, each on ``device`` and on the CPU (``threads`` threads) in the same run, and a short attack on the device."""
    w = {(n, d): _run_worker(n, quick=quick, device=d, threads=threads)
         for d in (device, "cpu") for n in ("steps", "round-new")}
    q = _run_worker("quality-new", quick=True, device=device, threads=threads)
    rows = []
    for d in (device, "cpu"):
        st, rd = w[("steps", d)], w[("round-new", d)]
        note = f"{d}, {threads} CPU thread(s), L={st['seq_len']} tokens; {_model_note()}"
        rows.append(_row("floor", f"{CASE} one step", "forward + double backward", "-", st["floor_s"], 1.0,
                         st["peak_rss_mb"], notes=note) | {"device": d})
        for attack in ("lamp-cos", "tag"):
            rows.append(_row(attack, f"{CASE} continuous step", "new", "floor", st[f"{attack}_s"],
                             st[f"{attack}_s"] / st["floor_s"], st["peak_rss_mb"], notes=note) | {"device": d})
        rows.append(_row("lamp-cos", f"{CASE} discrete round, 200 candidates + LM prior", "new (ghost)", "-",
                         rd["round_s"], None, rd["peak_rss_mb"], notes=note) | {"device": d})
    for key, unit, what in (("steps", "lamp-cos_s", "continuous step"), ("steps", "floor_s", "floor step"),
                            ("round-new", "round_s", "discrete round + LM")):
        c, g = w[(key, "cpu")][unit], w[(key, device)][unit]
        rows.append(_row("lamp-cos", f"{CASE} {what}: {device} vs cpu", f"{device}", "cpu, same run", g, c / g, None,
                         notes=f"ratio = cpu seconds / {device} seconds; {_model_note()}") | {"device": device})
    rows.append(_row("lamp-cos", f"{CASE} short attack ({q['n_steps']} steps)", "new", "-", q["attack_s"], None,
                     q["peak_rss_mb"], "rouge1", q["rouge1"], f"{device}; rouge2 {q['rouge2']:.3f}; {_model_note()}")
                | {"device": device})
    return rows


def measure_lean(*, quick: bool, device: str, threads: int = 1) -> list[dict]:
    """``PERF_LAMP_SET=lean``: the rows that need no old vmap path: the continuous steps against the
    floor, the 2,000-step projection from one process (with the packed LM prior; peak RSS of the
    whole process), the LM prior packed vs the previous float32 load (one round's distinct texts:
    time, peak RSS, largest NLL difference) and a short attack with each LM prior on the same seeds."""
    w = {n: _run_worker(n, quick=quick, device=device, threads=threads)
         for n in ("steps", "project", "lm-new", "lm-old", "qlm-new", "qlm-old")}
    st, pj = w["steps"], w["project"]
    dev = f"{device}, {threads} thread(s), L={st['seq_len']} tokens; {_model_note()}"
    fl = st["floor_s"]
    rows = [_row("floor", f"{CASE} one step", "forward + double backward", "-", fl, 1.0, st["peak_rss_mb"],
                 notes=f"{dev}; steps interleaved, medians")]
    for attack in ("lamp-cos", "tag"):
        rows.append(_row(attack, f"{CASE} continuous step", "ghost step", "floor", st[f"{attack}_s"],
                         st[f"{attack}_s"] / fl, st["peak_rss_mb"], notes=f"{dev}; same process as the floor"))
    rows.append(_row("lamp-cos", f"{CASE} 2000 steps (projected in one process, interleaved: step, 200-candidate "
                     "round with the LM prior, init scoring)", "packed LM prior", "2000 floor steps", pj["projected_s"],
                     pj["projected_ratio"], pj["peak_rss_mb"],
                     notes=f"{dev}; floor {pj['floor_s']:.3f} s, step {pj['step_s']:.3f} s, round {pj['round_s']:.1f} s, "
                           f"init {pj['init_s']:.3f} s per candidate (medians); LM load {pj['lm_load_s']:.0f} s "
                           f"(not counted); load {pj['load']}"))
    new, old = w["lm-new"], w["lm-old"]
    diff = max(abs(a - b) for a, b in zip(new["nll"], old["nll"]))
    same = min(range(len(new["nll"])), key=new["nll"].__getitem__) == min(range(len(old["nll"])), key=old["nll"].__getitem__)
    for variant, r in (("packed GGUF blocks, streamed head", new), ("old: float32 load, full logits", old)):
        rows.append(_row("lamp-cos", f"{CASE} LM prior: {r['n_texts']} distinct texts of one round", variant,
                         "old", r["nll_s"], r["nll_s"] / old["nll_s"], r["peak_rss_mb"], "max |NLL new - old| (nats)",
                         diff, f"{dev}; LM load {r['load_s']:.0f} s; same best text: {same}"))
    qn, qo = w["qlm-new"], w["qlm-old"]
    for variant, q in (("packed LM prior", qn), ("old LM prior (float32 load)", qo)):
        rows.append(_row("lamp-cos", f"{CASE} short attack ({q['n_steps']} steps, LM prior on)", variant, "-",
                         q["attack_s"], None, q["peak_rss_mb"], "rouge1", q["rouge1"],
                         f"{dev}; rouge2 {q['rouge2']:.3f}; best loss {q['best_loss']:.5f}; "
                         f"same text as old: {qn['text'] == qo['text']}"))
    return rows


def measure(*, quick: bool, device: str, threads: int = 1, full: bool = False) -> list[dict]:
    """All rows of this benchmark (see the module docstring); ``threads``: torch threads per worker;
    ``full`` adds the paper's 2,000-step lamp-cos run on the sentence (minutes to tens of minutes).
    On an accelerator, :func:`measure_device` (device next to the CPU)."""
    if device != "cpu":
        return measure_device(quick=quick, device=device, threads=int(os.environ.get("PERF_LAMP_THREADS", threads)))
    if os.environ.get("PERF_LAMP_SET") == "lean":
        return measure_lean(quick=quick, device=device, threads=threads)
    w = {n: _run_worker(n, quick=quick, device=device, threads=threads) for n in (
        "steps", "init-new", "init-old", "swap-new", "swap-old", "round-new",
        "round-old", "round-bf16", "project", "quality-new", "quality-old")}
    st = w["steps"]
    dev = f"{device}, {threads} thread(s), L={st['seq_len']} tokens"
    fl = st["floor_s"]
    rows = [_row("floor", f"{CASE} one step", "forward + double backward", "-", fl, 1.0, st["peak_rss_mb"],
                 notes=f"{dev}; steps interleaved with the rows below, medians")]
    for attack, variant in (("lamp-cos", "new (ghost step)"), ("tag", "new"),
                            ("lamp-cos-old", "old (autograd through the dummy gradient, ghost_step=False)")):
        rows.append(_row(attack.removesuffix("-old"), f"{CASE} continuous step", variant, "floor", st[f"{attack}_s"],
                         st[f"{attack}_s"] / fl, st["peak_rss_mb"], notes=f"{dev}; same process as the floor"))
    for what, key, unit in (("init scoring, per candidate", "init", "per_candidate_s"),
                            ("discrete round, 200 candidates, no LM", "swap", "round_s"),
                            ("discrete round, 200 candidates + LM prior", "round", "round_s")):
        new, old = w[f"{key}-new"], w[f"{key}-old"]
        same_key = "choice" if key == "init" else "choice_sum"
        same = new[same_key] == old[same_key]
        for variant, r in (("new (ghost)", new), ("old (vmap, ghost=False)", old)):
            rows.append(_row("lamp-cos", f"{CASE} {what}", variant, "old" if r is new else "-", r[unit],
                             r[unit] / old[unit], r["peak_rss_mb"], "same choice as old", float(same), dev))
    for variant in ("new", "old"):
        r = st["lamp-cos_s" if variant == "new" else "lamp-cos-old_s"]
        sw, rd = w[f"swap-{variant}"]["round_s"], w[f"round-{variant}"]["round_s"]
        total = 2000 * r + 1000 * w[f"init-{variant}"]["per_candidate_s"] + 24 * rd
        rows.append(_row("lamp-cos", f"{CASE} 2000 steps (projected: 2000 steps + 1000 init candidates + 24 rounds)",
                         variant, "2000 floor steps", total, total / (2000 * fl), w[f"round-{variant}"]["peak_rss_mb"],
                         notes=f"{dev}; of which LM prior {24 * (rd - sw):.0f} s"))
    pj = w["project"]
    rows.append(_row("lamp-cos", f"{CASE} 2000 steps (projected in one process, interleaved: step, 200-candidate "
                     "round with the LM prior, init scoring)", "new", "2000 floor steps", pj["projected_s"],
                     pj["projected_ratio"], pj["peak_rss_mb"],
                     notes=f"{dev}; floor {pj['floor_s']:.3f} s, step {pj['step_s']:.3f} s, round {pj['round_s']:.1f} s, "
                           f"init {pj['init_s']:.3f} s per candidate (medians); load {pj['load']}"))
    rd, rb = w["round-new"], w["round-bf16"]
    rows.append(_row("lamp-cos", f"{CASE} discrete round, 200 candidates + LM prior", "new, lm_bf16 (opt-in)",
                     "new (fp32 LM)", rb["round_s"], rb["round_s"] / rd["round_s"], rb["peak_rss_mb"],
                     "same choice as fp32 LM", float(rb["choice_sum"] == rd["choice_sum"]), dev))
    for variant in (os.environ.get("PERF_LAMP_FULL", "new").split(",") if full else ()):
        f = _full_row(_run_worker(f"full-{variant}", quick=quick, device=device, threads=threads), device, threads)
        rows.append(f)
    qn, qo = w["quality-new"], w["quality-old"]
    for variant, q in (("new", qn), ("old", qo)):
        rows.append(_row("lamp-cos", f"{CASE} short attack ({q['n_steps']} steps)", variant, "-", q["attack_s"], None,
                         q["peak_rss_mb"], "rouge1", q["rouge1"],
                         f"{dev}; rouge2 {q['rouge2']:.3f}; same text as old: {qn['text'] == qo['text']}"))
    return rows


def _full_row(f: dict, device: str, threads: int) -> dict:
    """The row of a ``full-*`` worker: attack seconds (floor samples excluded) against as many floor
    steps, the floor timed at every discrete round of the run (the machine's load drifts)."""
    fl = f["floor_during_s"] or sum(f["floor_s"]) / 2
    return _row("lamp-cos", f"{CASE} the paper's {f['n_steps']} steps, one sentence", f["variant"],
                f"{f['n_steps']} floor steps", f["attack_s"], f["attack_s"] / (f["n_steps"] * fl),
                f["peak_rss_mb"], "rouge1", f["rouge1"],
                f"{device}, {threads} thread(s); floor {f['floor_s'][0] * 1e3:.0f}/{fl * 1e3:.0f}/"
                f"{f['floor_s'][1] * 1e3:.0f} ms per step before/during (median of the rounds)/after; "
                f"rouge2 {f['rouge2']:.3f}; LM load {f['lm_load_s']:.1f} s (not timed); load {f['load']}; "
                f"text {f['text']!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--full", action="store_true", help="add the 2,000-step lamp-cos run")
    ap.add_argument("--worker")
    args = ap.parse_args()
    if args.worker:
        sys.path.insert(0, str(ROOT))
        import torch
        torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.worker, args.quick, args.device)))
        return
    rows = measure(quick=args.quick, device=args.device, threads=args.threads, full=args.full)
    print(" | ".join(FIELDS))
    for r in rows:
        print(" | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in FIELDS))


if __name__ == "__main__":
    main()
