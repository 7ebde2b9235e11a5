"""CPU seconds of DAGER's decoder steps on one pipeline batch (issue 18): ``python bench/dager_steps.py CASE B
[--seed 0] [--trial T] [--save FILE]``.

Wraps the search, its layer-2 forwards, the feed-forward-input prefilter, the completion and its parts with
``time.process_time()`` counters (calls, CPU s) and prints them with the run's stats. ``--save FILE`` keeps the
completion's inputs (the update, the model's state, the sentences) for ``bench/dager_last.py``. Development seeds
(< 1000) only."""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections import defaultdict

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TIMES: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])


def wrap(mod, name: str, label: str, depth: list[int] | None = None) -> None:
    fn = getattr(mod, name)

    @functools.wraps(fn)
    def inner(*a, **k):
        c = time.process_time()
        try:
            return fn(*a, **k)
        finally:
            TIMES[label][0] += 1
            TIMES[label][1] += time.process_time() - c

    setattr(mod, name, inner)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case")
    ap.add_argument("b", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trial", type=int, default=0)
    ap.add_argument("--save", default="")
    args = ap.parse_args()
    if args.seed >= 1000:
        raise SystemExit("development seeds (< 1000) only")
    import torch

    from bench.perf_dager import pipeline_batches
    from common.seed import make_generator
    from textleak.attacks.dager import DAGER, DagerConfig, attack, decoder, last_exit, last_fit, last_head, last_token

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    saved = {}
    orig_complete = last_token.complete_last

    def complete(obs, model, sents, **k):
        if args.save:
            saved.update(sents=[list(s) for s in sents], state={n: p.detach().clone() for n, p in model.state_dict().items()})
        return orig_complete(obs, model, sents, **k)

    last_token.complete_last = complete
    wrap(decoder, "search", "search")
    wrap(decoder, "decoder_last_inputs", "search: layer-2 forwards")
    from textleak.attacks.dager import dec_block
    wrap(dec_block.PreLNDecoderBlock, "ffn_distances", "search: ffn prefilter")
    wrap(last_token, "complete_last", "completion")
    wrap(last_head, "packed_residual", "completion: residual")
    wrap(last_token, "certified_choice", "completion: certified_choice")
    wrap(last_exit, "_jvp", "completion: jvp")
    wrap(last_exit, "_split_terms", "completion: split_terms")
    wrap(last_token, "_packed_terms", "completion: packed_terms")
    wrap(last_exit, "_sub_graph", "completion: sub_graph")
    wrap(last_fit, "lazy_fit", "completion: lazy_fit")
    wrap(attack, "_scan_l1", "scan")
    for seed, trial, kit, case, model, prior, obs, truth in pipeline_batches(args.case, args.b, [args.seed], [args.trial]):
        atk = DAGER(DagerConfig(time_budget_s=600.0))
        c = time.process_time()
        rec = atk.reconstruct(obs, model, prior, generator=make_generator(7))
        cpu = time.process_time() - c
        r1 = kit.score(rec, truth, case=case)[0]["rouge1"]
        print(f"{args.case} B={args.b} seed {seed} trial {trial}: {cpu:.2f} CPU s, rouge1 {r1:.4f}, "
              f"{torch.get_num_threads()} thread(s)")
        for k, (n, s) in TIMES.items():
            print(f"  {k:40s} {n:5d} calls {s:8.2f} CPU s")
        print({k: v for k, v in rec.stats.items() if "prefilter" in k or "cert" in k or "l2" in k})
        print("token ids:", rec.extras["token_ids"])
        if args.save:
            torch.save({"obs": obs, "case": args.case, "seed": seed, "trial": trial, **saved}, args.save)


if __name__ == "__main__":
    main()
