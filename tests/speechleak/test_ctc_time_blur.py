"""``output_time_blur`` (issue 21): the recovered features blurred over time by a Gaussian before the waveform
stage, a shrinkage for the frame timing that the update leaves uncertain."""
import pytest
import torch

from speechleak.attack import SpeechGradientInversion, SpeechInversionConfig
from speechleak.ctc import time_blur


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_time_blur_is_a_normalised_gaussian_average_over_time():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 40, generator=g, dtype=torch.float64)
    assert torch.equal(time_blur(x, 0.0), x)
    y = time_blur(x, 2.0)
    assert y.shape == x.shape
    t = torch.arange(-6, 7, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / 2.0) ** 2)
    k = k / k.sum()
    assert torch.allclose(y[1, 3, 20], (x[1, 3, 14:27] * k).sum())  # interior frame: the weighted mean
    const = torch.full((1, 3, 30), -4.0, dtype=torch.float64)
    assert torch.allclose(time_blur(const, 3.0), const)  # edge frames replicated: silence stays silence
    assert float(y.min()) >= float(x.min()) and float(y.max()) <= float(x.max())  # stays within the bounds
    assert torch.allclose(time_blur(x[..., :1], 2.0), x[..., :1])  # a single frame is its own average


def _jitter(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x [F, T] read at frames t + shift[t] (clamped)."""
    t = torch.arange(x.shape[-1])
    return x[:, (t + shift).clamp(0, x.shape[-1] - 1)]


def test_blur_lowers_the_error_of_a_mistimed_copy_of_a_real_clip(ctc_case):
    """A real flite clip's mel map read with a random per-segment timing error of up to ±3 frames (what the
    search leaves uncertain) comes closer to the clip when blurred; the clip itself moves away when blurred,
    so the gain comes from averaging over the timing error, not from the blur."""
    _, feats, _, _, _, lower = ctc_case("go on now and then come back", 32000)
    x = feats[0].double()
    g = torch.Generator().manual_seed(1)
    seg = torch.randint(-3, 4, (x.shape[-1] // 6 + 1,), generator=g)
    shift = seg.repeat_interleave(6)[: x.shape[-1]]
    off = _jitter(x, shift)
    assert _cos(time_blur(off, 1.5), x) > _cos(off, x) + 0.005
    assert _cos(time_blur(x, 1.5), x) < 1.0 - 1e-4


def test_attack_applies_the_blur_to_its_searched_features(ctc_case):
    """The attack with ``output_time_blur`` returns the blurred features of the same search (same seed)."""
    _, feats, model, obs, prior, _ = ctc_case("go on now and then come back", 32000)
    base = dict(optimizer="lbfgs", precision="float64", init_scale=0.0, tv_weight=1e-5, restarts=1, iterations=5,
                griffin_lim_iters=1, init_seconds_per_char=0.132)

    def run(**extra):
        cfg = SpeechInversionConfig(**base, **extra)
        return SpeechGradientInversion(cfg).reconstruct(obs, model, prior, generator=torch.Generator().manual_seed(0))

    plain = run().data["features"]
    blurred = run(output_time_blur=2.0).data["features"]
    assert torch.allclose(blurred, time_blur(plain, 2.0), atol=1e-5)
    with pytest.raises(ValueError):
        from common.attack import validate_config
        validate_config(SpeechInversionConfig(output_time_blur=-1.0))
    with pytest.raises(ValueError, match="output_time_blur"):  # waveform-domain results are not feature maps
        SpeechGradientInversion(SpeechInversionConfig(**{**base, "domain": "waveform"}, output_time_blur=2.0)).reconstruct(
            obs, model, prior, generator=torch.Generator().manual_seed(0))
