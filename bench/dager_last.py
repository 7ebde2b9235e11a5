"""The last-token completion alone on the prefixes a DAGER run recovered (issue 18): ``python bench/dager_last.py
SAVED [--base COMMIT] [--reps 2]``.

``SAVED`` comes from ``bench/dager_steps.py --save`` (the batch is drawn again as the pipeline draws it). Runs the
working tree's ``complete_last`` (and ``--base``'s, alternating, in the same process) and prints CPU seconds, the
number of candidate terms computed and whether the tokens agree. Development seeds (< 1000) only."""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("saved")
    ap.add_argument("--base", default="")
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    import torch

    from bench.perf_dager import pipeline_batches
    from textleak.attacks.dager import last_token

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    saved = torch.load(args.saved, weights_only=False)
    if saved["seed"] >= 1000:
        raise SystemExit("development seeds (< 1000) only")
    _, _, _, _, model, _, obs, _ = next(pipeline_batches(saved["case"], len(saved["sents"]), [saved["seed"]],
                                                         [saved["trial"]]))
    sents = saved["sents"]
    fns = [("new", last_token)]
    if args.base:
        from bench.dager_base import load_base
        fns.insert(0, ("base", load_base(args.base).last_token))
    count = {"terms": 0, "calls": 0, "rank_rows": 0}
    for name, mod in fns:  # count the terms each _packed_terms call computes
        orig = mod._packed_terms

        def counted(graph, w, ss, cc, _orig=orig):
            count["calls"] += 1
            count["terms"] += sum(map(len, cc))
            count["rank_rows"] += max(map(len, cc)) * int(graph.hidden.shape[0] * graph.hidden.shape[1])
            return _orig(graph, w, ss, cc)
        mod._packed_terms = counted
    outs = {}
    for _ in range(args.reps):
        for name, mod in fns:
            count.update(terms=0, calls=0, rank_rows=0)
            c = time.process_time()
            outs[name] = mod.complete_last(obs, model, sents)
            print(f"{name}: {time.process_time() - c:.2f} CPU s, {count}", flush=True)
    if args.base:
        print("same tokens:", outs["base"] == outs["new"])


if __name__ == "__main__":
    main()
