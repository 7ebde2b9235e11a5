import numpy as np
import pytest
import torch

from speechleak import metrics as M


def test_snr_and_si_sdr():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16000, generator=g)
    same = M.snr(predictions=[x], references=[x])
    assert same["snr"] > 100 and same["si_sdr"] > 100
    noisy = x + 0.1 * torch.randn(16000, generator=g)
    r = M.snr(predictions=[noisy], references=[x])
    assert 19 < r["snr"] < 21  # 10 log10(1 / 0.01) = 20 dB
    scaled = M.snr(predictions=[0.5 * noisy], references=[x])
    assert abs(scaled["si_sdr"] - r["si_sdr"]) < 1e-6 and scaled["snr"] < r["snr"]  # SI-SDR ignores scale


def test_power_and_db_spectrogram_snr():
    """A uniform 1 dB error on a dB-scaled map L gives 10 log10(mean L^2 / 1); the power-domain
    SNR of the same error is 10 log10(1 / (10^0.1 - 1)^2) = 11.7 dB regardless of the map."""
    g = torch.Generator().manual_seed(0)
    mel = torch.rand(40, 50, generator=g) * 10 + 0.1
    off = mel * 10 ** 0.1  # +1 dB everywhere
    db = 10 * torch.log10(mel + 1e-5)
    expect = 10 * np.log10(float(db.pow(2).mean()) / 1.0)
    assert abs(M.db_spectral_snr(predictions=[off], references=[mel])["logmel_snr"] - expect) < 0.05
    assert abs(M.spectral_snr(predictions=[off], references=[mel])["mel_snr"] - (-20 * np.log10(10 ** 0.1 - 1))) < 1e-3
    assert M.db_spectral_snr(predictions=[mel], references=[mel])["logmel_snr"] > 100


def test_feature_cosine_share_counts_utterances_at_or_above_the_bar():
    g = torch.Generator().manual_seed(0)
    refs = [torch.randn(8, 10, generator=g) for _ in range(4)]
    preds = [refs[0].clone(), refs[1] + 0.1 * torch.randn(8, 10, generator=g),  # cosine ~1 and ~0.995
             torch.randn(8, 10, generator=g), torch.full((8, 10), float("nan"))]  # ~0 and non-finite
    assert M.feature_cosine_share(predictions=preds, references=refs)["feature_cosine_ge90"] == 0.5
    assert M.feature_cosine_share(predictions=preds[:1], references=refs[:1], at=1.5)["feature_cosine_ge90"] == 0.0
    with pytest.raises(ValueError, match="align"):
        M.feature_cosine_share(predictions=preds, references=refs[:2])


def test_feature_similarity_and_label_accuracy():
    a = torch.randn(8, 10)
    out = M.feature_similarity(predictions=[a], references=[a])
    assert out["feature_mse"] == 0 and out["feature_cosine"] == pytest.approx(1.0)
    assert M.label_accuracy(predictions=[3, 1], references=[1, 3])["label_accuracy"] == 1.0
    with pytest.raises(ValueError, match="align"):
        M.feature_similarity(predictions=[a], references=[a, a])


def test_pesq_stoi_mcd_on_real_speech(flite_keyword):
    x = flite_keyword
    p = M.pesq_wb(predictions=[x], references=[x])
    assert p["pesq_wb"] > 4.0 and p["pesq_wb_n"] == 1
    assert M.mcd(predictions=[x], references=[x])["mcd"] == pytest.approx(0.0, abs=1e-6)
    noisy = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert M.pesq_wb(predictions=[noisy], references=[x])["pesq_wb"] < p["pesq_wb"]
    assert M.mcd(predictions=[noisy], references=[x])["mcd"] > 0.5
    # a 1 s keyword has too few non-silent frames for STOI: reported as undefined, never 0
    short = M.stoi(predictions=[x], references=[x])
    assert short == {"stoi_n": 0.0} or short.get("stoi", 0) > 0.9
    long = torch.cat([x, x, x, x])
    s = M.stoi(predictions=[long], references=[long])
    assert s["stoi_n"] == 1 and s["stoi"] > 0.99
    silent = M.pesq_wb(predictions=[torch.zeros(16000)], references=[torch.zeros(16000)])
    assert "pesq_wb" not in silent and silent["pesq_wb_n"] == 0


def test_speaker_reid_and_char_histogram():
    enrolled = {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0])}
    out = M.speaker_reid(predictions=[np.array([0.9, 0.1]), np.array([0.9, 0.2])], references=["a", "b"],
                         enrolled=enrolled)
    assert out == {"speaker_top1": 0.5, "speakers_enrolled": 2.0}
    from speechleak.models import VOCAB, encode_text

    occ = torch.zeros(len(VOCAB))
    for i in encode_text("go go"):
        occ[i] += 1
    h = M.char_histogram(predictions=[occ], references=["go go"])
    assert h["char_hist_cosine"] == pytest.approx(1.0) and h["char_set_recall"] == 1.0


def test_word_error_and_keyword_accuracy():
    assert M.word_error(predictions=["go on"], references=["go on"], prefix="asr_") == {"asr_wer": 0.0, "asr_cer": 0.0}
    assert M.word_error(predictions=["x"], references=[""]) == {}
    assert M.keyword_accuracy(predictions=[1, 2], references=[1, 3])["keyword_accuracy"] == 0.5


def test_metrics_are_registered_with_lazy_targets():
    import speechleak
    from common.metrics import MetricInfo

    names = set()
    for info in speechleak.METRICS:
        assert isinstance(info, MetricInfo) and info.modality == "speech"
        module, _, attr = info.target.partition(":")
        import importlib

        assert callable(getattr(importlib.import_module(module), attr))
        names.add(info.name)
    assert {"pesq_wb", "stoi", "snr", "mcd", "speaker_top1", "keyword_accuracy", "asr_wer"} <= names


def test_package_tables_import_nothing_heavy():
    import subprocess
    import sys

    code = "import sys, speechleak; assert 'torchaudio' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_broken_example_gets_the_worst_score_and_the_good_ones_keep_theirs(bad):
    """NaN/Inf in one reconstruction of a batch: no crash (inf used to raise in snr's log10), no
    credit (NaN used to give NaN means or, for speaker re-id, a hit on the first voice)."""
    g = torch.Generator().manual_seed(1)
    refs = [torch.randn(16000, generator=g) * 0.3 for _ in range(2)]
    good = refs[0] + 0.1 * torch.randn(16000, generator=g)
    broken = refs[1].clone()
    broken[::1000] = bad
    one = M.snr(predictions=[good], references=refs[:1])
    both = M.snr(predictions=[good, broken], references=refs)
    assert both["snr"] == pytest.approx((one["snr"] + M.DB_FLOOR) / 2)
    fs = M.feature_similarity(predictions=[good, broken], references=refs)
    assert fs["feature_mse"] == float("inf") and fs["feature_cosine"] < 0.5
    assert M.mcd(predictions=[good, broken], references=refs)["mcd"] == float("inf")


def test_finite_extreme_reconstruction_scores_as_before():
    x = torch.linspace(-1, 1, 16000)
    r = M.snr(predictions=[x * 1e12], references=[x])  # finite: the plain formula, no floor
    assert r["snr"] == pytest.approx(-240.0, abs=1e-3)


def test_every_key_the_speech_kit_emits_is_registered_with_a_direction():
    from common.metrics import higher_is_better, metric_info

    emitted = {  # SpeechKit.score's keys
        "feature_mse", "feature_cosine", "mel_cosine", "mel_snr", "logmel_snr", "snr", "si_sdr", "pesq_wb", "stoi",
        "mcd", "oracle_pesq_wb", "oracle_stoi", "label_accuracy", "char_hist_cosine", "char_set_recall",
        "speaker_top1", "speaker_top1_original", "keyword_accuracy", "keyword_accuracy_original", "asr_wer",
        "asr_cer", "asr_original_wer", "asr_original_cer", "asr_vs_original_wer", "asr_vs_original_cer",
        "speech_cosine", "dynamics_cosine", "shift_cosine", "feature_cosine_ge90"}
    for key in emitted:
        assert metric_info(key, modality="speech") is not None, key
        assert higher_is_better(key) is (False if ("wer" in key or "cer" in key or key in ("mcd", "feature_mse"))
                                         else True), key
    for key in ("pesq_wb_n", "stoi_n", "oracle_pesq_wb_n", "oracle_stoi_n", "speakers_enrolled"):
        assert metric_info(key) is not None and higher_is_better(key) is None, key  # counts: no direction


def _speech_map(seed: int = 0) -> torch.Tensor:
    """A [16, 60] mel-like map: silence (floor -1) around 30 speech frames with varying content."""
    g = torch.Generator().manual_seed(seed)
    m = torch.full((16, 60), -1.0)
    m[:, 15:45] = 0.8 + torch.linspace(1, 0, 16).unsqueeze(1) + torch.randn((16, 30), generator=g) * 0.6
    return m


def test_speech_region_similarity_separates_the_long_term_spectrum_from_the_dynamics():
    r = _speech_map()
    same = M.speech_region_similarity(predictions=[r], references=[r], floor=-1.0)
    assert same["speech_cosine"] == pytest.approx(1.0) and same["dynamics_cosine"] == pytest.approx(1.0)
    # right silence and right per-bin mean over the speech frames, but other time-varying content
    wrong = _speech_map(seed=1)
    wrong[:, 15:45] += r[:, 15:45].mean(1, keepdim=True) - wrong[:, 15:45].mean(1, keepdim=True)
    w = M.speech_region_similarity(predictions=[wrong], references=[r], floor=-1.0)
    plain = M.feature_similarity(predictions=[wrong], references=[r])["feature_cosine"]
    assert plain > 0.8 and w["speech_cosine"] > 0.75 and abs(w["dynamics_cosine"]) < 0.3
    # a shifted copy: the plain cosine drops, the shift-aligned diagnostic does not
    shifted = torch.roll(r, 3, dims=1)
    s = M.speech_region_similarity(predictions=[shifted], references=[r], floor=-1.0)
    assert s["shift_cosine"] == pytest.approx(1.0)
    assert M.feature_similarity(predictions=[shifted], references=[r])["feature_cosine"] < 0.95
    assert M.speech_region_similarity(predictions=[r], references=[torch.full((16, 60), -1.0)], floor=-1.0) == {}
    bad = M.speech_region_similarity(predictions=[torch.full((16, 60), float("nan"))], references=[r], floor=-1.0)
    assert bad["speech_cosine"] == -1.0 and bad["shift_cosine"] == -1.0
