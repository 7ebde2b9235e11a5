"""Which searches to average, and how (issue 21, session 14; development seeds only).

For each development trial of ``speech/ctc-mel/fedsgd`` (B=1, transcript granted, random-init recogniser), the
preset's aligned espeak-ng starts (4 voices, 60 warp iterations each, ranked by objective) once, then:

* ``S150``: 150 float64 L-BFGS iterations from each of the two best-aligned voices (``speech-ctc-tts-avg``'s searches);
* ``S75``: 75 iterations from each of the 4 voices, and a continuation (75 more, a fresh L-BFGS) of the two whose
  objective after those 75 is lowest (the start chosen by a short search's objective, not the start's own);
* offline combinations of those results: plain means, means after aligning every result to the best-objective one
  by dynamic time warping (``speechleak.multistart.dtw_average``), and a short polish search (``--polish``
  iterations) from a mean; each scored raw and after the preset's 5-frame time blur.

    OMP_NUM_THREADS=1 python bench/speech_ctc_multistart.py --seed 0 --trials 0,1 [--polish 30] [--save DIR]

One JSON line per trial (cosines of every variant, objectives, seconds per stage).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0)), 4)


def search(pb, start: torch.Tensor, iterations: int) -> tuple[torch.Tensor, float]:
    """The preset's search (float64 L-BFGS, history 50, softplus bound) from features ``start``."""
    from common.optim import optimise

    z = pb.from_feats(start).clone().requires_grad_(True)
    optimise([z], lambda: pb.objective(pb.to_feats(z)), optimizer="lbfgs", lr=1.0, iterations=iterations, history_size=50)
    with torch.no_grad():
        f = pb.to_feats(z.detach()).clamp(min=pb.lower, max=pb.upper)
        return f, float(pb.objective(f))


def select(pb, starts, row: dict, s: dict, *, short: int) -> None:
    """``--mode select``: the baseline (two 150-iteration searches averaged), the best-aligned voice searched 300
    iterations, and a short search (``short`` iterations) from every voice ranked by its objective, the best one
    continued to the same total cost (and the best two continued half as long each, averaged)."""
    from speechleak.ctc import time_blur

    t1 = time.perf_counter()
    s150 = [search(pb, f, 150) for f, _ in starts[:2]]
    s["s150x2"] = round(time.perf_counter() - t1, 1)
    t1 = time.perf_counter()
    s300 = search(pb, s150[0][0], 150)
    s["cont150"] = round(time.perf_counter() - t1, 1)
    t1 = time.perf_counter()
    sh = [search(pb, f, short) for f, _ in starts]
    s[f"short{short}x4"] = round(time.perf_counter() - t1, 1)
    order = sorted(range(len(sh)), key=lambda i: sh[i][1])
    rest = 300 - short * len(sh)
    t1 = time.perf_counter()
    best1 = search(pb, sh[order[0]][0], rest)
    s["cont_best1"] = round(time.perf_counter() - t1, 1)
    t1 = time.perf_counter()
    best2 = [search(pb, sh[i][0], rest // 2) for i in order[:2]]
    s["cont_best2"] = round(time.perf_counter() - t1, 1)
    w = torch.tensor([1.0 / s150[0][1], 1.0 / s150[1][1]], dtype=torch.float64)
    cands = {"s150_0": s150[0][0], "s150_1": s150[1][0], "base_avg2_s150": (s150[0][0] + s150[1][0]) / 2,
             "wavg2_s150": (w[0] * s150[0][0] + w[1] * s150[1][0]) / w.sum(), "s300_best_aligned": s300[0],
             "select1": best1[0], "select2_avg": (best2[0][0] + best2[1][0]) / 2}
    for i, (f, _) in enumerate(sh):
        cands[f"short_{i}"] = f
    row["obj"] = {"s150": [round(o, 2) for _, o in s150], "s300": round(s300[1], 2), "short": [round(o, 2) for _, o in sh],
                  "select1": round(best1[1], 2), "select2": [round(o, 2) for _, o in best2]}
    row["short_order"] = order
    with torch.no_grad():
        row["cos"] = {k: _cos(v, pb.truth) for k, v in cands.items()}
        for sg in (5.0, 8.0):
            row[f"cos_blur{sg:g}"] = {k: _cos(time_blur(v, sg), pb.truth) for k, v in cands.items()}
    row["s"] = s
    print(json.dumps(row), flush=True)


def main() -> None:
    from speech_ctc_diagnose import Problem

    from speechleak.ctc import time_blur
    from speechleak.multistart import dtw_average

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trials", default="0")
    ap.add_argument("--polish", type=int, default=30)
    ap.add_argument("--save", default="")
    ap.add_argument("--mode", default="combine", choices=("combine", "select"))
    ap.add_argument("--short", type=int, default=40)
    args = ap.parse_args()
    if args.seed >= 1000:
        raise SystemExit("development seeds only (< 1000): this is a tuning benchmark")
    torch.set_num_threads(1)
    for tr in [int(v) for v in args.trials.split(",")]:
        t0 = time.perf_counter()
        pb = Problem(args.seed, tr)

        def fobj(feats, ar=None):
            return pb.objective(feats)

        starts = pb.p.attack._tts_start(pb.labels, pb.prior, fobj, device=torch.device("cpu"), dtype=torch.float64)
        s: dict = {"align": round(time.perf_counter() - t0, 1)}
        row: dict = {"seed": args.seed, "trial": tr, "voices": [v for _, v in starts],
                     "start_cos": [_cos(f, pb.truth) for f, _ in starts]}
        if args.mode == "select":
            select(pb, starts, row, s, short=args.short)
            continue
        t1 = time.perf_counter()
        s150 = [search(pb, f, 150) for f, _ in starts[:2]]
        s["s150x2"] = round(time.perf_counter() - t1, 1)
        t1 = time.perf_counter()
        s75 = [search(pb, f, 75) for f, _ in starts]
        s["s75x4"] = round(time.perf_counter() - t1, 1)
        order = sorted(range(len(s75)), key=lambda i: s75[i][1])
        t1 = time.perf_counter()
        cont = [search(pb, s75[i][0], 75) for i in order[:2]]
        s["cont75x2"] = round(time.perf_counter() - t1, 1)
        row["obj"] = {"s150": [round(o, 2) for _, o in s150], "s75": [round(o, 2) for _, o in s75],
                      "cont": [round(o, 2) for _, o in cont]}
        row["s75_order"] = order
        cands = {
            "s150_0": s150[0][0], "s150_1": s150[1][0],
            "base_avg2_s150": (s150[0][0] + s150[1][0]) / 2,
            "avg4_s75": torch.stack([f for f, _ in s75]).mean(0),
            "avg2_s75_byobj": torch.stack([s75[i][0] for i in order[:2]]).mean(0),
            "avg2_cont": (cont[0][0] + cont[1][0]) / 2,
            "avg4_cont_plus_s75": torch.stack([cont[0][0], cont[1][0]] + [s75[i][0] for i in order[2:]]).mean(0),
            "avg4_s150_s75": torch.stack([s150[0][0], s150[1][0]] + [f for f, _ in s75[2:]]).mean(0),
            "avg6_all": torch.stack([s150[0][0], s150[1][0]] + [f for f, _ in s75]).mean(0),
        }
        t1 = time.perf_counter()
        cands["dtw_avg2_s150"] = dtw_average([f[0] for f, _ in s150]).unsqueeze(0)
        cands["dtw_avg4_s75"] = dtw_average([s75[i][0][0] for i in order]).unsqueeze(0)
        cands["dtw_avg2_cont"] = dtw_average([f[0] for f, _ in cont]).unsqueeze(0)
        s["dtw3"] = round(time.perf_counter() - t1, 1)
        if args.polish > 0:
            for name in ("base_avg2_s150", "avg4_s75"):
                t1 = time.perf_counter()
                cands[name + "_polish"] = search(pb, cands[name], args.polish)[0]
                s["polish_" + name] = round(time.perf_counter() - t1, 1)
        with torch.no_grad():
            row["cos"] = {k: _cos(v, pb.truth) for k, v in cands.items()}
            for sg in (3.0, 5.0, 8.0):
                row[f"cos_blur{sg:g}"] = {k: _cos(time_blur(v, sg), pb.truth) for k, v in cands.items()}
        row["s"] = s
        print(json.dumps(row), flush=True)
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            torch.save({"truth": pb.truth, **cands, "starts": [f for f, _ in starts]},
                       Path(args.save) / f"s{args.seed}_t{tr}.pt")


if __name__ == "__main__":
    main()
