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
   ``eval/suites/textleak_lamp_table.toml`` (``--steps``; LAMP 8+8 init, ``--candidates`` swap
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

from common.fl import client_update  # noqa: E402
from common.observe import observe  # noqa: E402
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
    batch, truth = kit.sample(pool, case, model=model, device=torch.device("cpu"), generator=make_generator(1))
    obs = observe(client_update(model, batch, kit.loss_fn, case.protocol, generator=make_generator(2)), case.threat)
    prior = kit.make_prior(case, model, "text", device="cpu")
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
        same = abs(vf - vp) <= 1e-5 * max(abs(vp), 1e-12) and torch.allclose(gf, gp, rtol=1e-4,
                                                                            atol=1e-8 * float(gp.abs().max()))
        print(f"continuous step ({loss}): fused distance {tf * 1e3:.0f} ms, plain autograd {tp * 1e3:.0f} ms, "
              f"speed-up x{tp / tf:.2f}, same value and gradient: {same}")

    # -- 2. vectorised vs loop: init candidates and one discrete step ------------------------------
    base = replace(LAMP_DEFAULTS, coeff_perplexity=0.0, swap_candidates=args.candidates, init_candidates=1,
                   init_permutations=0)
    xs = torch.randn((args.init,) + tuple(x.shape), generator=make_generator(6))
    res = {}
    for batched in (True, False):
        s = TextSearch(replace(base, batched=batched), obs, model, prior, make_generator(7))
        xs_p = torch.where(s.body.unsqueeze(-1), xs, s.pinned.unsqueeze(0))
        res[batched] = timed(lambda: s.score_batches(xs_p))
    same = int(res[True][1].argmin()) == int(res[False][1].argmin())
    print(f"init scoring, {args.init} candidate batches of B={args.batch_size}: batched {res[True][0]:.2f} s, "
          f"loop {res[False][0]:.2f} s, speed-up x{res[False][0] / res[True][0]:.2f}, same choice: {same}")
    res = {}
    for batched in (True, False):
        s = TextSearch(replace(base, batched=batched), obs, model, prior, make_generator(7))
        s.discrete_step(x)  # warm-up
        s = TextSearch(replace(base, batched=batched), obs, model, prior, make_generator(7))
        t = time.perf_counter()
        new_x, changed = s.discrete_step(x)
        res[batched] = (time.perf_counter() - t, new_x)
    same = torch.allclose(res[True][1], res[False][1])
    print(f"discrete step, {args.candidates} candidates x B={args.batch_size}: batched {res[True][0]:.2f} s, "
          f"loop {res[False][0]:.2f} s, speed-up x{res[False][0] / res[True][0]:.2f}, same choice: {same}")

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
        m, _ = kit.score(rec, truth, case=case)
        print(f"{preset:10s} {args.steps} steps: {dt / args.batch_size:7.2f} s/sentence "
              f"({dt / args.steps:.3f} s/step incl. init+swaps), ROUGE-1 {m['rouge1']:.2f} ROUGE-2 {m['rouge2']:.2f}")


if __name__ == "__main__":
    main()
