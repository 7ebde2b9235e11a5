"""Benchmark: TAG / LAMP cost per sentence, and the vectorised parts vs their one-at-a-time baselines.

    python bench/textleak_lamp.py [--case text/minilm-bert/fedsgd-short] [--steps 80] [--candidates 16]

All in one process, on the same client batch, one torch thread by default:

1. Continuous step (forward + double backward, the bulk of every attack): the fused gradient
   distance (``GradMatcher.distance``: one autograd node with a hand-written backward) vs autograd
   through the plain formula (``GradMatcher.reference_distance``); both losses (cos, tag) and the
   same embeddings, so the values must agree.
2. Initialisation (``--init`` random candidate batches) and one LAMP discrete step (``--candidates``
   sequence transformations per sentence): vectorised per-sentence gradients (``batched=True``,
   ``torch.func.vmap`` over candidates) vs a Python loop over candidates (``batched=False``);
   prints the speed-up and checks both pick the same candidate.
3. Seconds per sentence of each preset (tag, lamp-cos, lamp-l1l2) at the settings of
   ``eval/suites/textleak_lamp.toml`` (``--steps``; LAMP 8+8 init, ``--candidates`` swap
   candidates every 20 steps, LM on the 8 best), SmolLM2 load excluded (loaded before timing).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from eval.pipeline import score, simulate  # noqa: E402
from common.seed import make_generator  # noqa: E402


def timed(fn, repeat: int = 1):
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return (time.perf_counter() - t) / repeat, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="text/minilm-bert/fedsgd-short")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--init", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5, help="continuous steps timed per variant")
    ap.add_argument("--repeat-discrete", type=int, default=3, help="timed repeats of init scoring / discrete step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from eval.catalog import catalog
    from textleak.attacks.lamp import LAMP_DEFAULTS
    from textleak.cases import CASES
    from textleak.components.search import TextSearch
    from textleak.kit import TextKit

    kit = TextKit()
    case = CASES[args.case].with_batch_size(args.batch_size)
    model = kit.load_model(case, device=torch.device("cpu"), generator=make_generator(0))
    pool = kit.load_pool(case, data_path=None)
    t = simulate(case, kit, model=model, pool=pool, prior_kind="text", device=torch.device("cpu"), keep_batch=True,
                 data_generator=make_generator(1), client_generator=make_generator(2))
    obs, prior, truth, batch = t.attacker.observation, t.attacker.prior, t.truth, t.batch
    print(f"case {args.case}, B={args.batch_size}, seq_lens={obs.seq_lens}, torch threads {args.threads}")
    ids = batch.inputs["input_ids"]
    x = prior.embedding[ids] + 0.05 * torch.randn(ids.shape + (prior.embedding.shape[1],), generator=make_generator(5))

    # -- 1. continuous step: fused vs plain distance ----------------------------------------------
    for loss in ("cos", "tag"):
        s = TextSearch(replace(LAMP_DEFAULTS, loss=loss, coeff_perplexity=0.0, init_candidates=1,
                               init_permutations=0), obs, model, prior, make_generator(7))
        res = {}
        for fused in (True, False):
            def step():
                xv = x.clone().requires_grad_(True)
                g = s.matcher._batch_grads(xv, s.mask, s.labels, None, True)
                d = s.matcher.distance(g) if fused else s.matcher.reference_distance(g)
                return float(d), torch.autograd.grad(d, xv)[0]
            res[fused] = timed(step, args.repeat)
        (tf, (vf, gf)), (tp, (vp, gp)) = res[True], res[False]
        # float32 sums over ~11 M entries in a different order: agree to ~1e-5 relative, not bit for bit
        rel_v = abs(vf - vp) / max(abs(vp), 1e-12)
        rel_g = float((gf - gp).abs().max()) / max(float(gp.abs().max()), 1e-12)
        print(f"continuous step ({loss}): fused distance {tf * 1e3:.0f} ms, plain autograd {tp * 1e3:.0f} ms, "
              f"speed-up x{tp / tf:.2f}; value rel. diff {rel_v:.1e}, gradient max diff / max {rel_g:.1e}")

    # -- 2. vectorised vs loop: init candidates and one discrete step ------------------------------
    # interleaved repeats, minimum time of each (the machine is shared; single timings are noisy)
    base = replace(LAMP_DEFAULTS, coeff_perplexity=0.0, swap_candidates=args.candidates, init_candidates=1,
                   init_permutations=0)
    xs = torch.randn((args.init,) + tuple(x.shape), generator=make_generator(6))
    searches = {b: TextSearch(replace(base, batched=b), obs, model, prior, make_generator(7)) for b in (True, False)}
    xs_p = torch.where(searches[True].body.unsqueeze(-1), xs, searches[True].pinned.unsqueeze(0))
    times: dict = {True: [], False: []}
    out: dict = {}
    for _ in range(args.repeat_discrete + 1):  # first round is a warm-up
        for b in (True, False):
            t = time.perf_counter()
            out[b] = searches[b].score_batches(xs_p)
            times[b].append(time.perf_counter() - t)
    tb, tl = min(times[True][1:]), min(times[False][1:])
    same = int(out[True].argmin()) == int(out[False].argmin())
    print(f"init scoring, {args.init} candidate batches of B={args.batch_size}: batched {tb:.2f} s, "
          f"loop {tl:.2f} s, speed-up x{tl / tb:.2f}, same choice: {same} (min of {args.repeat_discrete})")
    times = {True: [], False: []}
    for _ in range(args.repeat_discrete + 1):
        for b in (True, False):
            s = TextSearch(replace(base, batched=b), obs, model, prior, make_generator(7))
            t = time.perf_counter()
            out[b], _ = s.discrete_step(x)
            times[b].append(time.perf_counter() - t)
    tb, tl = min(times[True][1:]), min(times[False][1:])
    same = torch.allclose(out[True], out[False])
    print(f"discrete step, {args.candidates} candidates x B={args.batch_size}: batched {tb:.2f} s, "
          f"loop {tl:.2f} s, speed-up x{tl / tb:.2f}, same choice: {same} (min of {args.repeat_discrete})")

    # -- 3. seconds per sentence per preset ---------------------------------------------------------
    prior.lm()  # load SmolLM2 once, outside the timings
    cat = catalog()
    for preset in ("tag", "lamp-cos", "lamp-l1l2"):
        _, cls, over = cat.resolve(preset)
        cfg = replace(replace(cls.default_config(), **over), n_steps=args.steps)
        if cfg.use_swaps:
            cfg = replace(cfg, init_candidates=8, init_permutations=8, swap_candidates=args.candidates,
                          swap_every=20, lm_topk=8)
        t = time.perf_counter()
        rec = TextSearch(cfg, obs, model, prior, make_generator(3)).run()
        dt = time.perf_counter() - t
        m, _ = score(kit, rec, truth, case=case)
        print(f"{preset:10s} {args.steps} steps: {dt / args.batch_size:7.2f} s/sentence "
              f"({dt / args.steps:.3f} s/step incl. init+swaps), ROUGE-1 {m['rouge1']:.2f} ROUGE-2 {m['rouge2']:.2f}")


if __name__ == "__main__":
    main()
