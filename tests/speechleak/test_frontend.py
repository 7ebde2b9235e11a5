import pytest
import torch

from speechleak.frontend import FrontEnd, FrontEndConfig, refine_waveform
from speechleak.models import KWSCNN


def _tone(n=4000, sr=16000):
    t = torch.arange(n) / sr
    return 0.3 * torch.sin(2 * torch.pi * 440 * t) * torch.hann_window(n) + 0.1 * torch.sin(2 * torch.pi * 1200 * t)


@pytest.mark.parametrize("kind", ["mel", "mfcc"])
def test_front_end_gradcheck(kind):
    fe = FrontEnd(FrontEndConfig(kind=kind, n_fft=64, hop=32, n_mels=8, n_mfcc=6)).double()
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(96, generator=g, dtype=torch.double) * 0.3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: fe(x), (w,))


@pytest.mark.parametrize("kind", ["mel", "mfcc"])
def test_model_gradient_reaches_the_waveform_and_second_order(kind):
    fe = FrontEnd(FrontEndConfig(kind=kind, n_mels=32, n_mfcc=16, hop=256))
    w = _tone().requires_grad_(True)
    feats = fe(w.unsqueeze(0))
    model = KWSCNN(feats.shape[1], feats.shape[2], 5, channels=(4,), hidden=8, generator=torch.Generator().manual_seed(0))
    loss = torch.nn.functional.cross_entropy(model(feats), torch.tensor([2]))
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, create_graph=True)
    # gradient matching differentiates the parameter gradient w.r.t. the waveform
    gw, = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), w)
    assert torch.isfinite(gw).all() and gw.abs().max() > 0


def test_mfcc_inverse_is_exact_with_full_dct_and_lowpass_otherwise():
    w = _tone().unsqueeze(0)
    full = FrontEnd(FrontEndConfig(kind="mfcc", n_mels=40, n_mfcc=40))
    torch.testing.assert_close(full.features_to_logmel(full(w)), full.log_mel(w), rtol=1e-4, atol=1e-4)
    part = FrontEnd(FrontEndConfig(kind="mfcc", n_mels=40, n_mfcc=13))
    err_part = (part.features_to_logmel(part(w)) - part.log_mel(w)).abs().mean()
    assert err_part > 1e-3  # truncated cepstrum loses detail: the MFCC->mel step is not free


def test_griffin_lim_round_trip_and_refinement(flite_keyword):
    fe = FrontEnd(FrontEndConfig(kind="mel"))
    feats = fe(flite_keyword)
    wave = fe.features_to_wave(feats, length=flite_keyword.numel(), n_iter=32)
    assert wave.shape == flite_keyword.shape
    cos = torch.nn.functional.cosine_similarity(fe(wave).flatten(), feats.flatten(), dim=0)
    assert cos > 0.9
    err0 = (fe(wave) - feats).pow(2).mean()
    refined = refine_waveform(fe, feats, wave, iterations=20, lr=1e-4)
    assert (fe(refined) - feats).pow(2).mean() < err0


def test_nnls_mel_inversion_is_consistent_nonnegative_and_stable(flite_keyword):
    """NNLS mel->linear reproduces the mel map it inverts, never goes negative, and under a
    small log-domain perturbation of the mel map stays closer to the true linear power than the
    minimum-norm least-squares inverse (the reason it is the default before Griffin-Lim)."""
    fe = FrontEnd(FrontEndConfig(kind="mel"))
    power = fe.power_spectrogram(flite_keyword)
    mel = fe.fbanks.T @ power
    lin = fe.mel_to_linear(mel)
    assert float(lin.min()) >= 0.0
    rel = (fe.fbanks.T @ lin - mel).norm() / mel.norm()
    assert rel < 0.05
    g = torch.Generator().manual_seed(0)
    noisy = mel * torch.exp(0.04 * torch.randn(mel.shape, generator=g))
    loud = power > power.max() * 1e-4

    def log_err(x):
        return (torch.log(x[loud] + 1e-8) - torch.log(power[loud] + 1e-8)).abs().mean()

    assert log_err(fe.mel_to_linear(noisy)) < log_err(fe.mel_to_linear(noisy, method="lstsq"))
    with pytest.raises(ValueError, match="mel inversion"):
        fe.mel_to_linear(mel, method="magic")
