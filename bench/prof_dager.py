"""cProfile of one DAGER batch (issue 18): ``python bench/prof_dager.py CASE B [--seed 0] [--trial T] [--top 40]``.

Development seeds only (< 1000). Prints wall and CPU seconds and the top functions by cumulative
and by internal time; ``--out FILE`` keeps the raw profile (``pstats``); ``--trial T`` draws the batch as the
evaluation pipeline draws trial T of ``--seed`` (what ``python -m eval run`` attacks)."""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case")
    ap.add_argument("b", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trial", type=int, default=None, help="draw the batch as the pipeline's trial T")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--out", default="")
    ap.add_argument("--approx", action="store_true", help="DAGER(exact_scores=False)")
    args = ap.parse_args()
    if args.seed >= 1000:
        raise SystemExit("development seeds (< 1000) only")
    import torch

    from bench.perf_dager import _setup
    from common.seed import make_generator
    from textleak.attacks.dager import DAGER, DagerConfig

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    kit, case, model, prior, obs, truth = _setup(args.case, args.b, "cpu", args.seed, args.trial)
    atk = DAGER(DagerConfig(time_budget_s=600.0), exact_scores=not args.approx)
    prof = cProfile.Profile()
    t, c = time.perf_counter(), time.process_time()
    prof.enable()
    rec = atk.reconstruct(obs, model, prior, generator=make_generator(7))
    prof.disable()
    print(f"wall {time.perf_counter() - t:.2f} s, cpu {time.process_time() - c:.2f} s, "
          f"rouge1 {kit.score(rec, truth, case=case)[0]['rouge1']:.4f}")
    if args.out:
        prof.dump_stats(args.out)
    st = pstats.Stats(prof)
    st.sort_stats("cumulative").print_stats(args.top)
    st.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
