"""A small real CTC inversion: a flite sentence's mel map recovered from one FedSGD gradient of
a CTC recogniser (transcript granted, Dang et al. 2022 setting) with the speech-lbfgs settings."""
import shutil
import time

import pytest
import torch

from common.fl import client_update
from common.observe import observe
from common.threat import HONEST_WITH_LABELS
from common.types import Batch, FLProtocol
from speechleak import data as D
from speechleak.attack import SpeechGradientInversion, SpeechInversionConfig
from speechleak.frontend import FrontEnd, FrontEndConfig
from speechleak.kit import ctc_loss, pad_targets
from speechleak.models import CTCRecognizer
from speechleak.prior import SpeechPrior


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_short_flite_sentence_recovered_from_ctc_gradient():
    if shutil.which("flite") is None:
        pytest.skip("flite is not installed (apt-get install flite)")
    fe = FrontEnd(FrontEndConfig(n_mels=16, hop=256))
    n = 16000
    wave = D.trim_and_fit(D.read_wav(D.synthesize("go on now", D.Voice("flite", "slt"))), n)
    feats = fe(wave).unsqueeze(0)  # [1, 16, 63]
    model = CTCRecognizer(16, dim=32, heads=2, generator=torch.Generator().manual_seed(6))
    tg, tl = pad_targets(["go on now"])
    batch = Batch({"feats": feats, "target_lengths": tl}, tg)
    upd = client_update(model, batch, ctc_loss, FLProtocol("fedsgd", batch_size=1), generator=torch.Generator().manual_seed(1))
    obs = observe(upd, HONEST_WITH_LABELS)
    names = {id(p): k for k, p in model.named_parameters()}
    lower = float((torch.log(torch.tensor(fe.config.log_eps)) - fe.config.offset) / fe.config.scale)
    prior = SpeechPrior("ctc", fe, n, tuple(feats.shape[1:]), int(model.head.out_features),
                        lambda x, y: Batch({"feats": x, "target_lengths": (y != 0).sum(-1)}, y), ctc_loss,
                        names[id(model.head.weight)], names[id(model.head.bias)], lower=lower, upper=4.0)
    cfg = SpeechInversionConfig(optimizer="lbfgs", precision="float64", init_scale=0.0, tv_weight=1e-5,
                                iterations=120, restarts=1, griffin_lim_iters=1)
    t0 = time.perf_counter()
    rec = SpeechGradientInversion(cfg).reconstruct(obs, model, prior, generator=torch.Generator().manual_seed(0))
    assert time.perf_counter() - t0 < 60  # ~14 s on a loaded core
    assert _cos(rec.data["features"], feats) > 0.95  # measured 0.988; the zero start has cosine 0
    assert float(rec.data["features"].min()) >= lower - 1e-6
