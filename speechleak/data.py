"""Speech data built offline: synthetic keyword and sentence clips, and a user's own WAV files.

* Keyword clips: the ten Speech Commands keywords spoken by flite (slt, rms, awb, kal16) and
  espeak-ng (en-us, en-gb, en-us+f3, en-us+m3) voices at varied rates and pitches.
* Sentence clips: Rotten Tomatoes sentences (Pang & Lee polarity file shipped in the gensim
  wheel, read as cp1252; gensim is never imported) spoken by the same voices.
* ``load_wav_dir(DIR)``: any WAV files (any rate, mono or stereo), converted to 16 kHz mono:
  ``DIR/<keyword>/*.wav`` for keyword cases, ``x.wav`` with an ``x.txt`` transcript for CTC cases;
  ``check_clip_lengths`` compares them with a case's window before any trial.

Every loader returns a ``datasets.Dataset`` with one row per clip (``path``, ``text``,
``label``, ``speaker``, ...). Generated clips are cached as 16 kHz WAV under
``$GRADLEAK_CACHE/speechleak`` (default ``~/.cache/gradleak/speechleak``), never committed.
Audio I/O uses ``soundfile``; resampling uses ``torchaudio.functional.resample``.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.assets import rotten_tomatoes_file

SAMPLE_RATE = 16000
KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
FLITE_VOICES = ("slt", "rms", "awb", "kal16")
ESPEAK_VOICES = ("en-us", "en-gb", "en-us+f3", "en-us+m3")
#: (rate factor, pitch offset) variants; rate > 1 is faster speech.
VARIANTS = ((1.0, 0), (0.85, 10), (1.15, -10))
MIN_RATE = 8000
SILENCE_PEAK = 1e-4
MAX_CLIPPED = 0.2


def cache_dir() -> Path:
    root = os.environ.get("GRADLEAK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gradleak")
    d = Path(root) / "speechleak"
    d.mkdir(parents=True, exist_ok=True)
    return d


def have_tts(engine: str = "flite") -> bool:
    return shutil.which(engine) is not None


# -- audio conversion -------------------------------------------------------------------------
def to_mono_16k(audio: np.ndarray, rate: int, *, name: str = "audio") -> torch.Tensor:
    """[N] or [N, C] samples at ``rate`` -> float32 mono 16 kHz tensor; clear errors when unusable."""
    a = np.asarray(audio, dtype=np.float64)
    if a.ndim == 2:
        a = a.mean(axis=1)  # stereo / multichannel -> mono
    elif a.ndim != 1:
        raise ValueError(f"{name}: expected mono or multichannel samples, got array of shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name}: the file holds no samples; remove it or record it again")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains NaN or infinite samples; re-export it as PCM WAV")
    if rate < MIN_RATE:
        raise ValueError(f"{name}: sample rate {rate} Hz is below {MIN_RATE} Hz; speech models here need >= 8 kHz audio")
    peak = float(np.abs(a).max())
    if peak < SILENCE_PEAK:
        raise ValueError(f"{name}: the clip is silent (peak {peak:.1e}); nothing to attack, remove it")
    clipped = float(np.mean(np.abs(a) >= 0.999 * max(peak, 1e-12))) if peak >= 0.99 else 0.0
    if clipped > MAX_CLIPPED:
        raise ValueError(f"{name}: {clipped:.0%} of the samples are clipped at full scale; "
                         f"use an unclipped recording (at most {MAX_CLIPPED:.0%})")
    w = torch.from_numpy(a.astype(np.float32))
    if rate != SAMPLE_RATE:
        import torchaudio

        w = torchaudio.functional.resample(w, rate, SAMPLE_RATE)
    return w


def read_wav(path: str | os.PathLike) -> torch.Tensor:
    """Read a WAV (any rate, mono or stereo) as 16 kHz mono float32."""
    import soundfile as sf

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"audio file {str(p)!r} does not exist")
    try:
        data, rate = sf.read(str(p), dtype="float64", always_2d=False)
    except RuntimeError as e:
        raise ValueError(f"{p.name}: not a readable audio file ({e}); convert it to WAV") from None
    return to_mono_16k(data, int(rate), name=p.name)


def write_wav(path: str | os.PathLike, wave: torch.Tensor, rate: int = SAMPLE_RATE) -> None:
    import soundfile as sf

    w = wave.detach().cpu().float().numpy()
    sf.write(str(path), np.clip(w, -1.0, 1.0), rate, subtype="PCM_16")


def trim_and_fit(wave: torch.Tensor, num_samples: int | None, *, peak: float = 0.5, threshold: float = 0.02) -> torch.Tensor:
    """Peak-normalise, trim leading/trailing silence, then centre-crop or zero-pad to ``num_samples``."""
    w = wave / wave.abs().max().clamp(min=1e-8) * peak
    loud = torch.nonzero(w.abs() > threshold * peak).flatten()
    if len(loud):
        w = w[max(0, int(loud[0]) - 400): int(loud[-1]) + 400]
    if num_samples is None:
        return w
    if len(w) > num_samples:
        start = (len(w) - num_samples) // 2
        return w[start: start + num_samples]
    left = (num_samples - len(w)) // 2
    return torch.nn.functional.pad(w, (left, num_samples - len(w) - left))


# -- synthesis --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Voice:
    engine: str  # "flite" | "espeak-ng"
    name: str

    @property
    def speaker(self) -> str:
        return f"{self.engine}:{self.name}"


def all_voices(engines: tuple[str, ...] = ("flite", "espeak-ng")) -> list[Voice]:
    out = []
    if "flite" in engines and have_tts("flite"):
        out += [Voice("flite", v) for v in FLITE_VOICES]
    if "espeak-ng" in engines and have_tts("espeak-ng"):
        out += [Voice("espeak-ng", v) for v in ESPEAK_VOICES]
    if not out:
        raise FileNotFoundError("no speech synthesiser found: install flite and/or espeak-ng "
                                "(apt-get install flite espeak-ng) or pass --data DIR with your own WAV files")
    return out


def synthesize(text: str, voice: Voice, *, rate: float = 1.0, pitch: int = 0) -> Path:
    """Synthesize ``text`` (cached) and return the path of a 16 kHz mono WAV."""
    key = hashlib.sha256(f"{voice.engine}|{voice.name}|{rate}|{pitch}|{text}".encode()).hexdigest()[:20]
    out = cache_dir() / "clips" / f"{key}.wav"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        if voice.engine == "flite":
            cmd = ["flite", "-voice", voice.name, "--setf", f"duration_stretch={1.0 / rate:.3f}",
                   "--setf", f"int_f0_target_mean={100 + pitch}", "-t", text, "-o", str(raw)]
        elif voice.engine == "espeak-ng":
            cmd = ["espeak-ng", "-v", voice.name, "-s", str(int(160 * rate)), "-p", str(50 + pitch), "-w", str(raw), text]
        else:
            raise ValueError(f"unknown synthesiser {voice.engine!r}; use flite or espeak-ng")
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=60)
        except FileNotFoundError:
            raise FileNotFoundError(f"{voice.engine} is not installed (apt-get install {voice.engine})") from None
        wave = read_wav(raw)
        tmp_out = out.with_suffix(".tmp.wav")
        write_wav(tmp_out, wave)
        os.replace(tmp_out, out)
    return out


def keyword_dataset(*, keywords: tuple[str, ...] = KEYWORDS, engines: tuple[str, ...] = ("flite", "espeak-ng"),
                    variants: tuple[tuple[float, int], ...] = VARIANTS):
    """One row per (keyword, voice, variant); clips synthesised on first use."""
    import datasets

    rows = []
    for voice in all_voices(engines):
        for vi, (rate, pitch) in enumerate(variants):
            for k, word in enumerate(keywords):
                path = synthesize(word, voice, rate=rate, pitch=pitch)
                rows.append({"path": str(path), "text": word, "label": k, "speaker": voice.speaker,
                             "variant": vi, "rate": float(rate), "pitch": int(pitch)})
    return datasets.Dataset.from_list(rows)


def rotten_tomatoes_sentences() -> list[tuple[str, str]]:
    """(label, text) pairs from gensim's bundled Pang & Lee polarity file (cp1252)."""
    path = rotten_tomatoes_file()
    out = []
    for line in path.read_bytes().decode("cp1252").splitlines():
        label, _, text = line.partition(" ")
        if text.strip():
            out.append((label.replace("__label__", ""), text.strip()))
    return out


def detokenize(text: str) -> str:
    t = re.sub(r" ([,.;:!?)])", r"\1", text)
    t = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", t)
    return t.replace("( ", "(").replace("`` ", '"').replace(" ''", '"')


def sentence_dataset(*, max_chars: int = 60, limit: int | None = None, engines: tuple[str, ...] = ("flite",)):
    """Short Rotten Tomatoes sentences (<= ``max_chars`` characters), voices rotated."""
    import datasets

    from .models import decode_ids, encode_text

    voices = all_voices(engines)
    rows = []
    sents = [(lab, detokenize(t)) for lab, t in rotten_tomatoes_sentences()]
    sents = [s for s in sents if len(s[1]) <= max_chars]
    if limit is not None:
        sents = sents[:limit]
    for i, (lab, text) in enumerate(sents):
        voice = voices[i % len(voices)]
        rate, pitch = VARIANTS[(i // len(voices)) % len(VARIANTS)]
        path = synthesize(text, voice, rate=rate, pitch=pitch)
        rows.append({"path": str(path), "text": decode_ids(encode_text(text)), "label": -1, "speaker": voice.speaker,
                     "variant": 0, "rate": float(rate), "pitch": int(pitch), "polarity": lab})
    return datasets.Dataset.from_list(rows)


def load_wav_dir(directory: str | os.PathLike, *, keywords: tuple[str, ...] | None = None):
    """A user's WAV files: ``DIR/<keyword>/*.wav`` (Speech Commands layout; label = folder) and/or
    ``DIR/**/x.wav`` with an ``x.txt`` transcript next to it. Speaker = file-name prefix before
    the first ``_`` (Speech Commands' ``<speaker>_nohash_<n>.wav``), else the folder name.
    Every file is validated (rate, channels, silence, clipping) up front."""
    import datasets

    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {str(root)!r}: not a directory of WAV files")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() == ".wav")
    if not files:
        raise FileNotFoundError(f"--data {str(root)!r}: no .wav files found (searched recursively)")
    folders = sorted({p.parent.name for p in files if p.parent != root})
    vocab = list(keywords) if keywords else folders
    rows = []
    for p in files:
        read_wav(p)  # validate now: a clear error beats a failed trial later
        txt = p.with_suffix(".txt")
        text = txt.read_text(encoding="utf-8").strip() if txt.exists() else (p.parent.name if p.parent != root else "")
        label = vocab.index(p.parent.name) if p.parent != root and p.parent.name in vocab else -1
        speaker = p.stem.split("_")[0] if "_" in p.stem else (p.parent.name if p.parent != root else p.stem)
        rows.append({"path": str(p), "text": text, "label": label, "speaker": speaker,
                     "variant": 0, "rate": 1.0, "pitch": 0})
    return datasets.Dataset.from_list(rows)


def check_clip_lengths(directory: str | os.PathLike, *, seconds: float, task: str) -> str | None:
    """Compare a user's clips (after silence trimming, as the kit does) with the case's window.

    The kit centre-crops a longer clip to the window. For CTC a cropped clip would be paired with
    the transcript of the whole clip: refused (ValueError naming the window). Otherwise returns a
    one-line warning saying how many clips are cropped (None when none is)."""
    root = Path(directory)
    if not root.is_dir():
        return None  # load_wav_dir says what is wrong
    window = int(round(seconds * SAMPLE_RATE))
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() == ".wav")
    long = [(p, n / SAMPLE_RATE) for p in files if (n := len(trim_and_fit(read_wav(p), None))) > window]
    if not long:
        return None
    if task == "ctc":
        paired = [(p, d) for p, d in long if p.with_suffix(".txt").exists()]
        if paired:
            p, d = paired[0]
            raise ValueError(f"{len(paired)} clip(s) with a transcript are longer than the case's {seconds:g} s window "
                             f"(e.g. {p.name}: {d:.1f} s after trimming silence); cropping would pair part of the audio "
                             f"with the whole transcript: cut them into clips of at most {seconds:g} s, each with its "
                             f"own transcript (or set --option seconds=N)")
    p, d = long[0]
    return (f"{len(long)} of {len(files)} clips are longer than the case's {seconds:g} s window and are centre-cropped "
            f"to it (e.g. {p.name}: {d:.1f} s after trimming silence)")
