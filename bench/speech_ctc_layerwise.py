"""Layer-wise inversion diagnostic after ``speech-ctc-tts`` (issue 21): is each layer's input determined by its
weight gradient, and does the closed-form solve move the attack's result towards the clip?

For each development trial of ``speech/ctc-mel/fedsgd`` (B=1, transcript granted, random-init recogniser):
the ``speech-ctc-tts`` feature stage once, then ``speechleak.layerwise`` at the clip and at the result:

* ``rank`` rows: per Linear/Conv1d layer, the unknown input rows, the equations per input column and the
  numerical rank of the clip's output error (``determinacy``);
* ``state`` rows: cosine of each layer's input and output error at the result vs at the clip;
* ``solve`` rows: for each layer whose input is determined, its input solved from the observed weight
  gradient (damped towards the result's input, ridge sweep), once with the clip's own output error (the
  oracle: what the update holds once that error is known) and once with the error at the result (what an
  attacker has); conv1's frames outside the result's speech block (± 8 frames) are held at the floor;
* ``precision`` rows (ff1, conv2): the same solve with the output error moved from the result's towards the
  clip's, e = e_clip + α (e_result − e_clip), best ridge of the sweep: how accurate the error must be before
  the solve beats the result's own state (an oracle diagnostic, not an attack).

    OMP_NUM_THREADS=1 python bench/speech_ctc_layerwise.py --trials 0,1,2 [--seed 0] > layerwise.jsonl

Development seeds only (< 1000); one JSON line per row.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RIDGES = (1e-8, 1e-3, 1e-2, 1e-1)
ALPHAS = (1.0, 0.3, 0.1, 0.03, 0.01)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0)), 4)


def run(seed: int, trial: int) -> list[dict]:
    import copy

    from common.seed import derive_seed, make_generator
    from common.types import Batch
    from eval.catalog import catalog
    from eval.pipeline import Resources, TrialSpec, make_kit, prepare, prepare_trial
    from speechleak.ctc import speech_block
    from speechleak.kit import ctc_loss
    from speechleak.layerwise import conv_input_solve, determinacy, layer_io, linear_input_solve

    case = catalog().cases.get("speech/ctc-mel/fedsgd").with_batch_size(1)
    p = prepare(TrialSpec(case, "speech-ctc-tts", seed=seed, trial=trial, overrides={"griffin_lim_iters": 1}))
    t = prepare_trial(p, make_kit("speech"), Resources(), device=torch.device("cpu"))
    a = t.attacker
    t0 = time.perf_counter()
    rec = p.attack.reconstruct(a.observation, a.model, a.prior, generator=make_generator(derive_seed(seed, trial, "attack")))
    attack_s = time.perf_counter() - t0
    model = copy.deepcopy(a.model).double()
    labels, lower = a.observation.labels, a.prior.lower
    tl = (labels != 0).sum(-1)

    def loss_of(x):
        return ctc_loss(model, Batch({"feats": x, "target_lengths": tl}, labels)).sum()

    truth, res = t.truth["feats"].double(), rec.data["features"].double()
    io_t, io_r = layer_io(model, loss_of, truth), layer_io(model, loss_of, res)
    head = {"seed": seed, "trial": trial}
    rows = [{**head, "row": "attack", "feature_cosine": _cos(res, truth), "feature_s": round(attack_s, 1),
             "voice": rec.extras.get("init_voice")}]
    ranks = determinacy(io_t)
    rows += [{**head, "row": "rank", "layer": r.name, "rows": r.rows, "width": r.width, "error_rank": r.error_rank,
              "determined": r.determined} for r in ranks]
    rows += [{**head, "row": "state", "layer": n, "input_cosine": _cos(io_r[n].inputs, io_t[n].inputs),
              "error_cosine": _cos(io_r[n].out_error, io_t[n].out_error)} for n in io_t]
    lo, hi = speech_block(res[0], lower)
    keep = torch.ones(1, res.shape[-1], dtype=torch.bool)
    keep[0, max(0, lo - 8): hi + 9] = False
    for r in ranks:
        if not r.determined and r.name != "conv1":
            continue
        g = a.observation.tensors[f"{r.name}.weight"].double()
        prior = io_r[r.name].inputs
        if r.name == "conv1":
            prior = torch.where(keep.unsqueeze(1), torch.full_like(prior, lower), prior)
        out = {**head, "row": "solve", "layer": r.name, "start_cosine": _cos(prior, io_t[r.name].inputs)}
        for which, io in (("clip_error", io_t), ("result_error", io_r)):
            for ridge in RIDGES:
                if isinstance(io[r.name].module, torch.nn.Conv1d):
                    got = conv_input_solve(io[r.name].module, io[r.name].out_error, g, prior, ridge=ridge,
                                           keep=keep if r.name == "conv1" else None)
                else:
                    got = linear_input_solve(io[r.name].out_error, g, prior, ridge=ridge)
                out[f"{which}_ridge_{ridge:g}"] = _cos(got, io_t[r.name].inputs)
        rows.append(out)
    for name in ("ff1", "conv2"):
        et, er, mod = io_t[name].out_error, io_r[name].out_error, io_t[name].module
        g = a.observation.tensors[f"{name}.weight"].double()
        for alpha in ALPHAS:
            e = et + alpha * (er - et)
            best = max((_cos(conv_input_solve(mod, e, g, io_r[name].inputs, ridge=ridge) if name == "conv2"
                             else linear_input_solve(e, g, io_r[name].inputs, ridge=ridge), io_t[name].inputs), ridge)
                       for ridge in (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1))
            rows.append({**head, "row": "precision", "layer": name, "alpha": alpha, "error_cosine": round(float(torch.nn.functional.cosine_similarity(e.flatten(), et.flatten(), dim=0)), 6),
                         "solve_cosine": best[0], "ridge": best[1], "start_cosine": _cos(io_r[name].inputs, io_t[name].inputs)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", default="0,1,2")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.seed >= 1000:
        raise SystemExit("development seeds only (< 1000): this is a tuning diagnostic")
    torch.set_num_threads(1)
    for tr in [int(v) for v in args.trials.split(",")]:
        for row in run(args.seed, tr):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
