"""A small real CTC inversion: a flite sentence's mel map recovered from one FedSGD gradient of
a CTC recogniser (transcript granted, Dang et al. 2022 setting) with the speech-lbfgs settings."""
import time

import torch

from speechleak.attack import SpeechGradientInversion, SpeechInversionConfig


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_short_flite_sentence_recovered_from_ctc_gradient(ctc_case):
    fe, feats, model, obs, prior, lower = ctc_case("go on now", 16000)  # feats [1, 16, 63]
    cfg = SpeechInversionConfig(optimizer="lbfgs", precision="float64", init_scale=0.0, tv_weight=1e-5,
                                iterations=120, restarts=1, griffin_lim_iters=1)
    t0 = time.perf_counter()
    rec = SpeechGradientInversion(cfg).reconstruct(obs, model, prior, generator=torch.Generator().manual_seed(0))
    assert time.perf_counter() - t0 < 60  # ~14 s on a loaded core
    assert _cos(rec.data["features"], feats) > 0.95  # measured 0.988; the zero start has cosine 0
    assert float(rec.data["features"].min()) >= lower - 1e-6
