import os
import shutil

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def flite_keyword():
    """A real 1 s keyword clip ("stop", flite slt) at 16 kHz, or skip when flite is absent."""
    if shutil.which("flite") is None:
        pytest.skip("flite is not installed (apt-get install flite)")
    from speechleak import data as D

    path = D.synthesize("stop", D.Voice("flite", "slt"))
    return D.trim_and_fit(D.read_wav(path), 16000)


@pytest.fixture(scope="session")
def ctc_case():
    """Factory: ``make(text, samples)`` -> (front end, features [1, 16, T], a random-init CTC recogniser
    (dim 32), its observation (one FedSGD gradient, transcript granted), the speech prior, the
    features' lower bound) for a real flite (slt) clip of ``text`` fitted to ``samples`` at 16 kHz,
    16 mel bins at hop 256; skips when flite is absent."""
    if shutil.which("flite") is None:
        pytest.skip("flite is not installed (apt-get install flite)")
    from common.fl import client_update
    from common.observe import observe
    from common.threat import HONEST_WITH_LABELS
    from common.types import Batch, FLProtocol
    from speechleak import data as D
    from speechleak.frontend import FrontEnd, FrontEndConfig
    from speechleak.kit import ctc_loss, pad_targets
    from speechleak.models import CTCRecognizer
    from speechleak.prior import SpeechPrior

    def make(text: str, samples: int):
        fe = FrontEnd(FrontEndConfig(n_mels=16, hop=256))
        wave = D.trim_and_fit(D.read_wav(D.synthesize(text, D.Voice("flite", "slt"))), samples)
        feats = fe(wave).unsqueeze(0)
        model = CTCRecognizer(16, dim=32, heads=2, generator=torch.Generator().manual_seed(6))
        tg, tl = pad_targets([text])
        batch = Batch({"feats": feats, "target_lengths": tl}, tg)
        upd = client_update(model, batch, ctc_loss, FLProtocol("fedsgd", batch_size=1),
                            generator=torch.Generator().manual_seed(1))
        obs = observe(upd, HONEST_WITH_LABELS)
        names = {id(p): k for k, p in model.named_parameters()}
        lower = float((torch.log(torch.tensor(fe.config.log_eps)) - fe.config.offset) / fe.config.scale)
        prior = SpeechPrior("ctc", fe, samples, tuple(feats.shape[1:]), int(model.head.out_features),
                            lambda x, y: Batch({"feats": x, "target_lengths": (y != 0).sum(-1)}, y), ctc_loss,
                            names[id(model.head.weight)], names[id(model.head.bias)], lower=lower, upper=4.0)
        return fe, feats, model, obs, prior, lower

    return make
