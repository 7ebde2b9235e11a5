import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from speechleak import data as D


def _speechy(rate, seconds=0.5, channels=1):
    t = np.arange(int(rate * seconds)) / rate
    x = 0.4 * np.sin(2 * np.pi * 300 * t) * np.sin(2 * np.pi * 3 * t)
    return np.stack([x, 0.5 * x], axis=1) if channels == 2 else x


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000])
def test_odd_rates_are_resampled_to_16k(tmp_path, rate):
    p = tmp_path / "a.wav"
    sf.write(p, _speechy(rate), rate)
    w = D.read_wav(p)
    assert w.dtype == torch.float32 and w.dim() == 1
    assert abs(w.numel() - 8000) <= 2  # 0.5 s at 16 kHz


def test_stereo_is_mixed_to_mono(tmp_path):
    p = tmp_path / "s.wav"
    x = _speechy(16000, channels=2)
    sf.write(p, x, 16000, subtype="FLOAT")
    w = D.read_wav(p)
    np.testing.assert_allclose(w.numpy(), x.mean(1), atol=1e-6)


def test_silence_clipping_and_bad_rates_give_clear_errors(tmp_path):
    sf.write(tmp_path / "silent.wav", np.zeros(16000), 16000)
    with pytest.raises(ValueError, match="silent"):
        D.read_wav(tmp_path / "silent.wav")
    clipped = np.clip(_speechy(16000) * 50, -1, 1)
    sf.write(tmp_path / "clip.wav", clipped, 16000, subtype="FLOAT")
    with pytest.raises(ValueError, match="clipped"):
        D.read_wav(tmp_path / "clip.wav")
    mild = _speechy(16000)
    mild[100:110] = 1.0  # a few clipped samples are still usable
    sf.write(tmp_path / "mild.wav", mild, 16000, subtype="FLOAT")
    assert D.read_wav(tmp_path / "mild.wav").numel() == 8000
    sf.write(tmp_path / "low.wav", _speechy(4000), 4000)
    with pytest.raises(ValueError, match="8000 Hz"):
        D.read_wav(tmp_path / "low.wav")
    (tmp_path / "junk.wav").write_bytes(b"not audio")
    with pytest.raises(ValueError, match="not a readable audio file"):
        D.read_wav(tmp_path / "junk.wav")
    with pytest.raises(FileNotFoundError):
        D.read_wav(tmp_path / "missing.wav")
    with pytest.raises(ValueError, match="no samples"):
        D.to_mono_16k(np.zeros(0), 16000)
    with pytest.raises(ValueError, match="NaN"):
        D.to_mono_16k(np.array([0.1, np.nan]), 16000)


def test_wav_dir_loader_returns_dataset(tmp_path):
    import datasets

    for word in ("yes", "no"):
        (tmp_path / word).mkdir()
        sf.write(tmp_path / word / f"spk1_nohash_0.wav", _speechy(22050, channels=2), 22050)
    sf.write(tmp_path / "free.wav", _speechy(44100), 44100)
    (tmp_path / "free.txt").write_text("hello world")
    ds = D.load_wav_dir(tmp_path)
    assert isinstance(ds, datasets.Dataset) and len(ds) == 3
    rows = {r["path"].split("/")[-1] + r["text"]: r for r in ds}
    assert rows["free.wavhello world"]["label"] == -1
    labelled = [r for r in ds if r["label"] >= 0]
    assert sorted(r["text"] for r in labelled) == ["no", "yes"] and all(r["speaker"] == "spk1" for r in labelled)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .wav files"):
        D.load_wav_dir(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        D.load_wav_dir(tmp_path / "missing")


def test_wav_dir_rejects_unusable_files_up_front(tmp_path):
    sf.write(tmp_path / "a_1.wav", np.zeros(8000), 16000)
    with pytest.raises(ValueError, match="silent"):
        D.load_wav_dir(tmp_path)


def test_trim_and_fit_pads_and_crops():
    w = torch.zeros(30000)
    w[10000:14000] = 0.3 * torch.sin(torch.arange(4000) * 0.1)
    out = D.trim_and_fit(w, 16000)
    assert out.numel() == 16000 and abs(float(out.abs().max()) - 0.5) < 1e-3
    long = 0.3 * torch.sin(torch.arange(40000) * 0.1)
    assert D.trim_and_fit(long, 16000).numel() == 16000


@pytest.mark.skipif(shutil.which("flite") is None, reason="flite is not installed")
def test_flite_synthesis_is_cached_16k(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADLEAK_CACHE", str(tmp_path))
    v = D.Voice("flite", "rms")
    p = D.synthesize("left", v, rate=1.15, pitch=-10)
    assert p.exists() and str(tmp_path) in str(p)
    info = sf.info(p)
    assert info.samplerate == 16000 and info.channels == 1 and 0.2 < info.duration < 1.5
    assert D.synthesize("left", v, rate=1.15, pitch=-10) == p  # cached


def test_rotten_tomatoes_sentences_from_gensim_wheel():
    import importlib.util

    if importlib.util.find_spec("gensim") is None:
        pytest.skip("gensim wheel (data files only) not installed")
    sents = D.rotten_tomatoes_sentences()
    assert len(sents) == 200 and {lab for lab, _ in sents} == {"neg", "pos"}
    assert D.detokenize("it 's simplistic , silly .") == "it's simplistic, silly."
