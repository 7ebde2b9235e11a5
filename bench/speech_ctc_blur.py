"""``output_time_blur`` after ``speech-ctc-tts`` (issue 21): one search per clip, its features scored raw and
blurred over time with several σ, through the same Griffin-Lim and the kit's scorer (development seeds only).

For each development trial of ``speech/ctc-mel/fedsgd`` (B=1, transcript granted, random-init recogniser): the
preset's feature stage once (``--set KEY=VALUE`` overrides it, e.g. ``init_tts_average=2``), then for each σ of
``--sigmas`` (0 = the preset's own output) ``speechleak.ctc.time_blur`` of those features, Griffin-Lim (100
iterations, NNLS) and ``SpeechKit.score``: feature / speech / dynamics cosine, PESQ-wb, STOI, pocketsphinx WER.
The blur is a post-processing of the same search, so the rows of one trial differ only by σ.

    OMP_NUM_THREADS=1 python bench/speech_ctc_blur.py --seed 6 --trials 0,1,2 --sigmas 0,2,3.5,5 [--set k=v] [--preset P]

One JSON line per trial and σ.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KEYS = ("feature_cosine", "speech_cosine", "dynamics_cosine", "pesq_wb", "stoi", "asr_wer", "asr_original_wer")


def run(seed: int, trial: int, sigmas: list[float], overrides: dict, preset: str = "speech-ctc-tts") -> list[dict]:
    from common.seed import derive_seed, make_generator
    from common.types import Reconstruction
    from eval.catalog import catalog
    from eval.pipeline import Resources, TrialSpec, make_kit, prepare, prepare_trial
    from speechleak.ctc import time_blur

    case = catalog().cases.get("speech/ctc-mel/fedsgd").with_batch_size(1)
    p = prepare(TrialSpec(case, preset, seed=seed, trial=trial, overrides={**overrides, "griffin_lim_iters": 1}))
    kit = make_kit("speech")
    t = prepare_trial(p, kit, Resources(), device=torch.device("cpu"))
    a = t.attacker
    rec = p.attack.reconstruct(a.observation, a.model, a.prior, generator=make_generator(derive_seed(seed, trial, "attack")))
    fe, rows = a.prior.frontend, []
    for sigma in sigmas:
        feats = time_blur(rec.data["features"].float(), sigma)
        waves = fe.features_to_wave(feats, length=a.prior.num_samples, n_iter=100, mel_inversion="nnls")
        r = Reconstruction(data={"features": feats, "waves": waves}, labels=rec.labels, stats=dict(rec.stats), extras={})
        m, _ = kit.score(r, t.truth, case=case)
        rows.append({"seed": seed, "trial": trial, "preset": preset, "overrides": overrides, "output_time_blur": sigma,
                     "feature_s": round(rec.stats["feature_s"], 1), **{k: round(float(m[k]), 4) for k in KEYS if k in m}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trials", default="0,1,2")
    ap.add_argument("--sigmas", default="0,2,3.5,5")
    ap.add_argument("--preset", default="speech-ctc-tts", help="the preset whose feature stage runs (its own output_time_blur "
                    "applies before the --sigmas blur)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    if args.seed >= 1000:
        raise SystemExit("development seeds only (< 1000): this is a tuning benchmark")
    overrides = {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        overrides[k] = json.loads(v) if v[:1].isdigit() or v[:1] in "-[{" else v
    torch.set_num_threads(1)
    sigmas = [float(s) for s in args.sigmas.split(",")]
    for tr in [int(v) for v in args.trials.split(",")]:
        t0 = time.perf_counter()
        for row in run(args.seed, tr, sigmas, overrides, args.preset):
            print(json.dumps({**row, "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
