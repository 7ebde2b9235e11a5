"""Ablation of the speech attack on a few clips: which change buys what (features and audio).

    OMP_NUM_THREADS=1 python bench/speech_ablation.py --case speech/kws-mel/fedsgd --trials 0,2 \
        '{"iterations": 1000, "restarts": 1, "mel_inversion": "lstsq"}' \
        '{"iterations": 300, "restarts": 1, "init_scale": 0.0, "tv_weight": 1e-5, "optimizer": "lbfgs", "precision": "float64"}'

Each JSON argument is a set of ``SpeechInversionConfig`` overrides on top of the defaults
(``speech-li23``). The client batches, model and seeds are those of ``python -m eval run``
(seed 0, trial k), so trial k here is trial k of the committed suites. Prints one JSON line
per (trial, config): seconds, feature MSE/cosine, mel power SNR, dB-mel SNR, PESQ-wb, STOI.
"""
from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="speech/kws-mel/fedsgd")
    ap.add_argument("--trials", default="0")
    ap.add_argument("configs", nargs="+")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from common.attack import apply_overrides
    from common.seed import derive_seed, make_generator
    from eval.catalog import catalog
    from eval.pipeline import simulate
    from speechleak import metrics as M
    from speechleak.attack import SpeechGradientInversion

    case = catalog().cases.get(args.case)
    kit = catalog().kits.get("speech")()
    pool = kit.load_pool(case, data_path=None)
    model = kit.load_model(case, device=torch.device("cpu"), generator=make_generator(derive_seed(0, "model")))
    configs = [json.loads(c) for c in args.configs]
    for tr in (int(t) for t in args.trials.split(",")):
        t = simulate(case, kit, model=model, pool=pool, prior_kind="speech", device=torch.device("cpu"),
                     data_generator=make_generator(derive_seed(0, tr, "data")),
                     client_generator=make_generator(derive_seed(0, tr, "client")))
        obs, prior, truth = t.attacker.observation, t.attacker.prior, t.truth
        fe = prior.frontend
        tf, tw = truth["feats"], truth["waves"]
        for over in configs:
            attack = SpeechGradientInversion(apply_overrides(SpeechGradientInversion.default_config(), over))
            t0 = time.perf_counter()
            rec = attack.reconstruct(obs, model, prior, generator=make_generator(derive_seed(0, tr, "attack")))
            out = {"trial": tr, "config": over, "seconds": round(time.perf_counter() - t0, 1)}
            rf, rw = rec.data["features"], rec.data["waves"]
            eps = fe.config.log_eps
            rm = (fe.features_to_logmel(rf).exp() - eps).clamp(min=0)
            tm = (fe.features_to_logmel(tf).exp() - eps).clamp(min=0)
            out.update(M.feature_similarity(predictions=list(rf), references=list(tf)))
            out.update(M.spectral_snr(predictions=list(rm), references=list(tm)))
            out.update(M.db_spectral_snr(predictions=list(rm), references=list(tm), floor=eps))
            out.update(M.pesq_wb(predictions=list(rw), references=list(tw)))
            out.update(M.stoi(predictions=list(rw), references=list(tw)))
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
