import numpy as np
import pytest
import soundfile as sf

from eval.catalog import catalog
from eval.runner import TrialSpec, run_trial


def _wav_dir(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k, word in enumerate(("yes", "no")):
        (tmp_path / word).mkdir()
        for spk, rate in (("alice", 22050), ("bob", 44100)):
            t = np.arange(int(rate * 0.6)) / rate
            f0 = 120 if spk == "bob" else 220
            x = sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 6)) * np.hanning(len(t)) * (0.2 + 0.1 * k)
            x = x + 0.002 * rng.standard_normal(len(t))
            sf.write(tmp_path / word / f"{spk}_nohash_{k}.wav", np.stack([x, x], 1), rate)  # stereo, odd rates
    return tmp_path


def test_catalog_registers_speech_tables():
    cat = catalog()
    assert "speech" in cat.kits
    for name in ("speech/kws-mel/fedsgd", "speech/kws-mfcc/fedsgd", "speech/ctc-mel/fedsgd", "speech/kws-mel/fedavg"):
        assert cat.cases.get(name).modality == "speech"
    for preset in ("speech-li23", "speech-ig", "speech-waveform", "speech-li23-refine", "speech-li23-layerweighted"):
        _, cls, _ = cat.resolve(preset)
        assert cls.info.modality == "speech"


def test_end_to_end_trial_on_user_wav_dir(tmp_path):
    """`--data DIR` with stereo WAVs at 22.05/44.1 kHz: a short L-BFGS attack recovers the clip's mel
    features from the gradient, is scored, and leaves WAV + spectrogram artifacts next to the original
    (the reconstruction WAV is the clip's length and not silent)."""
    data = _wav_dir(tmp_path / "wavs")
    case = catalog().cases.get("speech/kws-mel/fedsgd")
    rec = run_trial(TrialSpec(case, "speech-lbfgs", 0, 0, {"iterations": 40, "griffin_lim_iters": 8},
                              data_path=str(data)), out_dir=tmp_path / "out")
    assert rec["status"] == "ok", rec.get("error")
    m = rec["metrics"]
    for key in ("feature_cosine", "mel_cosine", "snr", "si_sdr", "mcd", "label_accuracy", "speaker_top1",
                "oracle_pesq_wb_n"):
        assert key in m
    assert m["label_accuracy"] == 1.0 and m["mel_cosine"] > 0.9
    arts = rec["artifacts"]
    assert arts["original_0"].endswith(".wav") and arts["reconstruction_0"].endswith(".wav")
    assert arts["spectrogram_0"].endswith(".png")
    orig, sr_o = sf.read(arts["original_0"])
    recon, sr_r = sf.read(arts["reconstruction_0"])
    assert sr_o == sr_r and len(orig) == len(recon) and np.abs(recon).max() > 1e-3


def test_user_data_errors_are_clear(tmp_path):
    from speechleak.kit import SpeechKit

    case = catalog().cases.get("speech/kws-mel/fedsgd")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        SpeechKit().load_pool(case, data_path=str(tmp_path / "nope"))
    (tmp_path / "flat").mkdir()
    sf.write(tmp_path / "flat" / "x.wav", 0.3 * np.sin(np.arange(8000) * 0.05), 16000)
    with pytest.raises(ValueError, match="no labelled clips"):
        SpeechKit().load_pool(case, data_path=str(tmp_path / "flat"))


@pytest.mark.slow
def test_end_to_end_synthetic_keywords_trial(tmp_path):
    import shutil

    if shutil.which("flite") is None:
        pytest.skip("flite is not installed")
    case = catalog().cases.get("speech/kws-mel/fedsgd")
    rec = run_trial(TrialSpec(case, "speech-li23", 0, 0, {"iterations": 200, "restarts": 1}), out_dir=tmp_path)
    assert rec["status"] == "ok", rec.get("error")
    assert rec["metrics"]["label_accuracy"] == 1.0
    assert "keyword_accuracy" in rec["metrics"] and "pesq_wb" in rec["metrics"]
