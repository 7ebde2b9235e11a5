"""One ranked decoder step of DAGER past layer 2's rank limit: the cost per extension at layer 2's
input (the previous ranking) vs the first block's feed-forward input (``frontier.ffn_inputs``),
measured in the same process on the same prefixes and candidates, plus the rank of the true
extension under each (issue 20 / 18; development seed only).

    OMP_NUM_THREADS=1 python bench/dager_ffn_step.py [--batch-size 32] [--trial 0] [--paths 16]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--trial", type=int, default=0)
    ap.add_argument("--paths", type=int, default=16)
    ap.add_argument("--position", type=int, default=8)
    a = ap.parse_args()
    import torch

    from bench.dager_frontier_dev import trial
    from textleak.attacks.dager import attack as A
    from textleak.attacks.dager import frontier as F
    from textleak.attacks.dager.run import Run
    from textleak.attacks.dager.span import LayerInputs, decoder_last_inputs, span_distance

    p, _, t = trial("text/gpt2/dager", a.batch_size, 0, a.trial, {})
    obs, model = t.attacker.observation, t.attacker.model
    model.eval()
    truth = [list(x) for x in t.truth["token_ids"]]
    probe = torch.tensor([[50256, 1, 2]])
    taps, spans, stats = p.attack.spans(obs, model, probe)
    run = Run(p.attack.config, p.attack._taus(stats), stats=stats)
    l1 = A._scan_l1(run, LayerInputs(model, taps[0]), spans[0], 128, False)
    q = a.position
    sents = [s for s in truth if len(s) > q + 1][: a.paths]
    prefixes = [s[:q] for s in sents]
    cands = l1[q][0]
    tests = {"layer 2 input": (LayerInputs(model, taps[1]), spans[1]),
             "feed-forward input": F.ffn_inputs(obs, model, probe, 0.0)}
    print(f"B={a.batch_size} trial={a.trial} position={q} paths={len(prefixes)} candidates={len(cands)} "
          f"threads={torch.get_num_threads()} load={os.getloadavg()[0]:.1f}")
    times = {}
    for name, (li, sp) in tests.items():
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            xs = decoder_last_inputs(li, prefixes, [cands] * len(prefixes))
            ds = span_distance(sp.basis, torch.cat(xs), exact_below=1.01).split([x.shape[0] for x in xs])
            best = min(best, time.perf_counter() - t0)
        times[name] = best
        med = float(torch.cat(ds).median())
        first = sum(int(d.argmin()) == cands.index(s[q]) for d, s in zip(ds, sents) if s[q] in cands)
        print(f"{name:20s} {best:7.2f} s ({1e3 * best / (len(prefixes) * len(cands)):.3f} ms/extension), "
              f"true extension nearest on {first}/{len(prefixes)} paths, median distance {med:.3f}")
    print(f"ratio layer 2 / feed-forward: {times['layer 2 input'] / times['feed-forward input']:.2f}x")


if __name__ == "__main__":
    main()
