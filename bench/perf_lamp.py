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
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASE = "text/minilm-bert/fedsgd-short"
FIELDS = ("attack", "setting", "variant", "baseline", "wall_s", "ratio", "peak_rss_mb", "metric_name", "metric",
          "notes")


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


def measure_trie(*, quick: bool, device: str, threads: int = 1) -> list[dict]:
    """``PERF_LAMP_SET=trie``: the floor at 1 and 2 threads (the 2-minute target's bound), the continuous
    steps, one process interleaving this session's discrete round (LM trie, ghost chunks of 16, 2M-logit head
    blocks) with the previous one (``OLD_ROUND``) and the 2,000-step projection of both, and the short attack
    with each in its own process (peak RSS, same text)."""
    s13 = os.environ.get("PERF_LAMP_SET") == "s13"  # old = the LM trie of perf_lamp_workers.PREV (session 12)
    w = {n: _run_worker(n, quick=quick, device=device, threads=threads) for n in ("steps", "project", "short-new",
                                                                                 "short-old")}
    st2 = None if s13 else _run_worker("steps", quick=quick, device=device, threads=2)
    st, pj = w["steps"], w["project"]
    dev = f"{device}, {threads} thread(s), L={st['seq_len']} tokens; {_model_note()}"
    rows = [_row("floor", f"{CASE} one step", "forward + double backward", "-", r["floor_s"], 1.0, r["peak_rss_mb"],
                 notes=f"{device}, {t} thread(s); 2000 floor steps = {2000 * r['floor_s']:.0f} s; steps interleaved, medians")
            for r, t in ((st, threads), (st2, 2)) if r is not None]
    for attack in ("lamp-cos", "tag"):
        rows.append(_row(attack, f"{CASE} continuous step", "ghost step", "floor", st[f"{attack}_s"],
                         st[f"{attack}_s"] / st["floor_s"], st["peak_rss_mb"], notes=f"{dev}; same process as the floor"))
    same = all(pj["same_round"])
    for what, key in (("discrete round, 200 candidates + LM prior", "round"), ("its LM prior part", "lm"),
                      ("init scoring, per candidate", "init")):
        for variant, sfx in (("LM trie without leaves, head once per parent" if s13 else "LM trie, ghost chunks of 16", ""),
                             ("old: LM trie of session 12 (commit 86c4b62)" if s13 else
                              "old: padded LM batch, ghost chunks of 32", "_old")):
            rows.append(_row("lamp-cos", f"{CASE} {what}", variant, "old", pj[f"{key}{sfx}_s"],
                             pj[f"{key}{sfx}_s"] / pj[f"{key}_old_s"], pj["peak_rss_mb"], "same round result as old",
                             float(same), f"{dev}; one process, interleaved; medians of {len(pj['samples'][key])}"))
    for variant, sfx in (("new", ""), ("old", "_old")):
        rows.append(_row("lamp-cos", f"{CASE} 2000 steps projected in one process (2000 steps + 1000 init candidates "
                         "+ 24 rounds with the LM prior)", variant, "2000 floor steps", pj["projected_s" + sfx],
                         pj["projected_ratio" + sfx], pj["peak_rss_mb"],
                         notes=f"{dev}; floor {pj['floor_s']:.3f} s, step {pj['step_s']:.3f} s, round "
                               f"{pj['round' + sfx + '_s']:.2f} s (LM {pj['lm' + sfx + '_s']:.2f} s), init "
                               f"{pj['init' + sfx + '_s']:.4f} s per candidate; load {pj['load']}"))
    qn, qo = w["short-new"], w["short-old"]
    for variant, q in (("new", qn), ("old", qo)):
        rows.append(_row("lamp-cos", f"{CASE} short attack ({q['n_steps']} steps, 200 candidates every 20, LM prior)",
                         variant, "-", q["attack_s"], None, q["peak_rss_mb"], "rouge1", q["rouge1"],
                         f"{dev}; rouge2 {q['rouge2']:.3f}; best loss {q['best_loss']:.6f}; swaps accepted "
                         f"{q['swaps']:.0f}; same text as old: {qn['text'] == qo['text']}; text {q['text']!r}"))
    return rows


def measure(*, quick: bool, device: str, threads: int = 1, full: bool = False) -> list[dict]:
    """All rows of this benchmark (see the module docstring); ``threads``: torch threads per worker;
    ``full`` adds the paper's 2,000-step lamp-cos run on the sentence (minutes to tens of minutes).
    On an accelerator, :func:`measure_device` (device next to the CPU)."""
    if device != "cpu":
        return measure_device(quick=quick, device=device, threads=int(os.environ.get("PERF_LAMP_THREADS", threads)))
    if os.environ.get("PERF_LAMP_SET") == "lean":
        return measure_lean(quick=quick, device=device, threads=threads)
    if os.environ.get("PERF_LAMP_SET") == "s15":  # this branch vs the main commit, CPU and wall (bench/perf_lamp_s15.py)
        import importlib.util
        spec = importlib.util.spec_from_file_location("perf_lamp_s15", Path(__file__).with_name("perf_lamp_s15.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.measure(quick=quick, threads=(threads, 2) if threads != 2 else (2,))
    if os.environ.get("PERF_LAMP_SET") in ("trie", "s13"):
        return measure_trie(quick=quick, device=device, threads=threads)
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
        from perf_lamp_workers import worker

        print(json.dumps(worker(args.worker, args.quick, args.device)))
        return
    rows = measure(quick=args.quick, device=args.device, threads=args.threads, full=args.full)
    print(" | ".join(FIELDS))
    for r in rows:
        print(" | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in FIELDS))


if __name__ == "__main__":
    main()
