"""Benchmark: TAG / LAMP cost per sentence, and batched vs one-at-a-time candidate scoring.

    python bench/textleak_lamp.py [--case text/minilm-bert/fedsgd-short] [--steps 20] [--candidates 32]

1. Seconds per sentence of each preset (tag, lamp-cos, lamp-l1l2) at a reduced number of steps
   (all other settings as the preset, except the init/swap candidate counts given on the command line),
   plus seconds per continuous step.
2. One LAMP discrete step (``--candidates`` sequence transformations of one sentence) scored with
   the vectorised per-sentence gradients (``batched=True``) vs a Python loop over candidates
   (``batched=False``), in the same process; prints the speed-up ratio and checks both pick the same
   candidate.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="text/minilm-bert/fedsgd-short")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--candidates", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from eval.catalog import catalog
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

    # -- 2. batched vs loop candidate scoring (same candidates, same process) -------------------
    from textleak.attacks.lamp import LAMP_DEFAULTS

    base = replace(LAMP_DEFAULTS, coeff_perplexity=0.0, swap_candidates=args.candidates, init_candidates=1,
                   init_permutations=0)
    x = prior.embedding[batch.inputs["input_ids"]] + 0.05 * torch.randn(
        batch.inputs["input_ids"].shape + (prior.embedding.shape[1],), generator=make_generator(5))
    res = {}
    for batched in (True, False):
        s = TextSearch(replace(base, batched=batched), obs, model, prior, make_generator(7))
        s.discrete_step(x)  # warm-up (also re-seeds nothing: candidates depend on the generator below)
        s = TextSearch(replace(base, batched=batched), obs, model, prior, make_generator(7))
        t = time.perf_counter()
        new_x, changed = s.discrete_step(x)
        res[batched] = (time.perf_counter() - t, new_x)
    same = torch.allclose(res[True][1], res[False][1])
    print(f"discrete step, {args.candidates} candidates x B={args.batch_size}: batched {res[True][0]:.2f} s, "
          f"loop {res[False][0]:.2f} s, speed-up x{res[False][0] / res[True][0]:.2f}, same choice: {same}")

    # -- 1. seconds per sentence per preset ---------------------------------------------------
    cat = catalog()
    for preset in ("tag", "lamp-cos", "lamp-l1l2"):
        _, cls, over = cat.resolve(preset)
        cfg = replace(cls.default_config(), **over)
        cfg = replace(cfg, n_steps=args.steps)
        if cfg.use_swaps:
            cfg = replace(cfg, init_candidates=8, init_permutations=8, swap_candidates=args.candidates,
                          swap_every=max(2, args.steps // 3), lm_topk=8)
        t = time.perf_counter()
        rec = TextSearch(cfg, obs, model, prior, make_generator(3)).run()
        dt = time.perf_counter() - t
        m, _ = kit.score(rec, truth, case=case)
        print(f"{preset:10s} {args.steps} steps: {dt / args.batch_size:7.2f} s/sentence "
              f"({dt / args.steps:.3f} s/step incl. init+swaps), ROUGE-1 {m['rouge1']:.2f}")


if __name__ == "__main__":
    main()
