"""Trace of DAGER's encoder search on one batch (issue 18): every sentence-length search with its CPU seconds,
whether the length is true, the preselection, and what it found. Development seeds (< 1000) only.

    python bench/dager_enc_trace.py [--case text/minilm-bert/dager] [--b 8] [--seeds 0,1,2]
"""
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
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="text/minilm-bert/dager")
    ap.add_argument("--b", type=int, default=8)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--budget", type=float, default=600.0)
    ap.add_argument("--set", action="append", default=[], help="MODULE.NAME=VALUE (encoder.ESCALATE=0)")
    a = ap.parse_args()
    import importlib

    import torch

    from bench.perf_dager import _setup
    from common.seed import make_generator
    from textleak.attacks.dager import DAGER, DagerConfig
    from textleak.attacks.dager import encoder as enc

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    for kv in a.set:
        k, v = kv.split("=", 1)
        mod, name = k.rsplit(".", 1)
        m = importlib.import_module(f"textleak.attacks.dager.{mod}")
        setattr(m, name, type(getattr(m, name))(eval(v)))
    log: list = []
    orig = enc._EncoderSearch._length

    def traced(self, per, wide, penalise=True, *, preselect=None, passes=None):
        c = time.process_time()
        n = orig(self, per, wide, penalise, preselect=preselect, **({} if passes is None else {'passes': passes}))
        log.append((len(per), (preselect, passes), n, time.process_time() - c, max(len(x) for x in per)))
        return n

    enc._EncoderSearch._length = traced
    from textleak.attacks.dager import beam as bm
    plog: list = []
    orig_score = bm.score_seqs

    def score(li2, span2, seqs):
        mean, mx = orig_score(li2, span2, seqs)
        plog.append((float(mean.min()), float(mx.min()), time.process_time()))
        return mean, mx

    bm.score_seqs = score
    orig_length = traced

    def traced2(self, per, wide, penalise=True, *, preselect=None, passes=None):
        plog.clear()
        c = time.process_time()
        n = orig_length(self, per, wide, penalise, preselect=preselect, passes=passes)
        log[-1] = log[-1] + (" ".join(f"[{m:.2e}/{x:.2e} @{t - c:.1f}]" for m, x, t in plog),)
        return n

    enc._EncoderSearch._length = traced2
    for seed in [int(s) for s in a.seeds.split(",")]:
        if seed >= 1000:
            raise SystemExit("development seeds only")
        kit, case, model, prior, obs, truth = _setup(a.case, a.b, "cpu", seed)
        sents = truth["sentences"] if isinstance(truth, dict) else truth
        tl = sorted(len(prior.tokenizer(s)["input_ids"]) for s in sents)
        log.clear()
        atk = DAGER(DagerConfig(time_budget_s=a.budget, budget_clock="cpu"))
        c = time.process_time()
        rec = atk.reconstruct(obs, model, prior, generator=make_generator(7))
        cpu = time.process_time() - c
        r1 = kit.score(rec, truth, case=case)[0]["rouge1"]
        print(f"seed {seed} B={a.b} cpu {cpu:.1f} rouge1 {r1:.3f} true lengths {tl}", flush=True)
        tot = {True: 0.0, False: 0.0}
        for L, pre, n, t, w, *ps in log:
            tot[L in tl] += t
            print(f"  len {L:3d} {'T' if L in tl else '.'} pre {pre} maxlist {w:3d} found {n} cpu {t:6.2f} {' '.join(ps)}")
        print(f"  search cpu: true lengths {tot[True]:.1f}, false lengths {tot[False]:.1f}; "
              f"stats { {k: round(v, 3) for k, v in rec.stats.items()} }", flush=True)


if __name__ == "__main__":
    main()
