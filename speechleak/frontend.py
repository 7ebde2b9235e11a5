"""Differentiable speech front ends (waveform -> normalised log-mel or MFCC) and their inverses.

Everything from the waveform to the feature map is plain torch/torchaudio autograd
(STFT -> |.|^2 -> mel filterbank -> log -> affine normalisation -> orthonormal DCT), so an
attack can optimise the feature map *or* the raw waveform end to end. The inverse path
(MFCC -> log-mel by the DCT pseudo-inverse, mel -> linear by non-negative least squares
(or ``InverseMelScale`` with the ``gelsd`` driver), Griffin-Lim with a deterministic zero-phase start) is used to turn
recovered features back into audio.

Default resolution (a free choice; Li et al. 2023 do not state theirs): 16 kHz, n_fft 512,
hop 128, 80 mel bins, 40 MFCCs. Stated next to every number in docs/speechleak.md.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torchaudio
from torch import Tensor, nn

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class FrontEndConfig:
    kind: Literal["mel", "mfcc"] = "mel"
    sample_rate: int = SAMPLE_RATE
    n_fft: int = 512
    hop: int = 128
    n_mels: int = 80
    n_mfcc: int = 40
    f_min: float = 0.0
    f_max: float = 8000.0
    log_eps: float = 1e-5
    offset: float = -6.0  # normalisation: (log-mel - offset) / scale
    scale: float = 4.0

    def __post_init__(self) -> None:
        if self.kind not in ("mel", "mfcc"):
            raise ValueError(f"front end kind must be 'mel' or 'mfcc', got {self.kind!r}")
        if self.kind == "mfcc" and not 1 <= self.n_mfcc <= self.n_mels:
            raise ValueError(f"n_mfcc must be in 1..n_mels ({self.n_mels}), got {self.n_mfcc}")

    @property
    def n_features(self) -> int:
        return self.n_mels if self.kind == "mel" else self.n_mfcc

    def n_frames(self, num_samples: int) -> int:
        return num_samples // self.hop + 1  # centred STFT

    def to_dict(self) -> dict:
        return asdict(self)


class FrontEnd(nn.Module):
    """waveform [..., N] -> features [..., n_features, frames] (differentiable)."""

    def __init__(self, config: FrontEndConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or FrontEndConfig()
        self.register_buffer("window", torch.hann_window(c.n_fft), persistent=False)
        fb = torchaudio.functional.melscale_fbanks(c.n_fft // 2 + 1, c.f_min, c.f_max, c.n_mels, c.sample_rate)
        self.register_buffer("fbanks", fb, persistent=False)  # [n_freq, n_mels]
        dct = torchaudio.functional.create_dct(min(c.n_mfcc, c.n_mels), c.n_mels, norm="ortho")  # [n_mels, n_mfcc]
        self.register_buffer("dct", dct, persistent=False)

    # -- forward path -------------------------------------------------------------------
    def power_spectrogram(self, wave: Tensor) -> Tensor:
        c = self.config
        shape = wave.shape[:-1]
        flat = wave.reshape(-1, wave.shape[-1])
        spec = torch.stft(flat, c.n_fft, hop_length=c.hop, win_length=c.n_fft, window=self.window,
                          center=True, pad_mode="reflect", return_complex=True)
        power = spec.real.pow(2) + spec.imag.pow(2)
        return power.reshape(*shape, *power.shape[-2:])

    def log_mel(self, wave: Tensor) -> Tensor:
        mel = torch.matmul(self.power_spectrogram(wave).transpose(-1, -2), self.fbanks).transpose(-1, -2)
        return torch.log(mel + self.config.log_eps)

    def logmel_to_features(self, log_mel: Tensor) -> Tensor:
        c = self.config
        z = (log_mel - c.offset) / c.scale
        if c.kind == "mel":
            return z
        return torch.matmul(z.transpose(-1, -2), self.dct).transpose(-1, -2)

    def forward(self, wave: Tensor) -> Tensor:
        return self.logmel_to_features(self.log_mel(wave))

    # -- inverse path -------------------------------------------------------------------
    def features_to_logmel(self, feats: Tensor) -> Tensor:
        """Normalised features -> log-mel. MFCC uses the DCT pseudo-inverse (exact when
        n_mfcc == n_mels, a cepstral low-pass otherwise)."""
        c = self.config
        z = feats
        if c.kind == "mfcc":
            z = torch.matmul(feats.transpose(-1, -2), self.dct.T).transpose(-1, -2)
        return z * c.scale + c.offset

    def mel_to_linear(self, mel: Tensor, *, method: str = "nnls", iterations: int = 200) -> Tensor:
        """Mel power [..., n_mels, frames] -> linear power [..., n_fft/2+1, frames].

        ``nnls`` (default): non-negative least squares by multiplicative updates (Lee & Seung),
        started from the filterbank-weighted spread of each mel value. ``lstsq``: torchaudio's
        ``InverseMelScale(driver="gelsd")`` (minimum-norm least squares, then clamped at 0).
        The least-squares inverse is exact on a true mel map but unstable: perturbing the
        normalised log-mel by 0.01 (0.04 nats) drops Griffin-Lim PESQ-wb from 4.2 to 1.8 on a
        keyword clip, while the NNLS inverse stays at 4.2 (docs/speechleak.md)."""
        c = self.config
        if method == "lstsq":
            inv = torchaudio.transforms.InverseMelScale(c.n_fft // 2 + 1, c.n_mels, c.sample_rate, c.f_min, c.f_max,
                                                        driver="gelsd").to(mel.device, torch.float64)
            return inv(mel.double()).float().clamp(min=0.0)
        if method != "nnls":
            raise ValueError(f"unknown mel inversion {method!r}; use nnls or lstsq")
        fb = self.fbanks.to(mel.device, torch.float64)  # [n_freq, n_mels]
        m = mel.double().clamp(min=0.0)
        spread = fb / fb.sum(0, keepdim=True).clamp(min=1e-12)
        s = torch.matmul(spread, m).clamp(min=1e-12)
        num = torch.matmul(fb, m)
        for _ in range(iterations):
            s = s * num / torch.matmul(fb, torch.matmul(fb.T, s)).clamp(min=1e-20)
        return s.float()

    def logmel_to_wave(self, log_mel: Tensor, *, length: int | None = None, n_iter: int = 100,
                       mel_inversion: str = "nnls") -> Tensor:
        """Griffin-Lim (torchaudio) from a log-mel map [..., n_mels, frames]."""
        c = self.config
        with torch.no_grad():
            mel = (log_mel.exp() - c.log_eps).clamp(min=0.0)
            linear = self.mel_to_linear(mel, method=mel_inversion)
            gl = torchaudio.transforms.GriffinLim(n_fft=c.n_fft, hop_length=c.hop, win_length=c.n_fft, power=2.0,
                                                  n_iter=n_iter, rand_init=False, length=length).to(mel.device)
            return gl(linear)

    def features_to_wave(self, feats: Tensor, *, length: int | None = None, n_iter: int = 100,
                         mel_inversion: str = "nnls") -> Tensor:
        return self.logmel_to_wave(self.features_to_logmel(feats), length=length, n_iter=n_iter,
                                   mel_inversion=mel_inversion)


def refine_waveform(frontend: FrontEnd, feats: Tensor, init_wave: Tensor, *, iterations: int = 200,
                    lr: float = 1e-3) -> Tensor:
    """Stronger waveform stage: optimise the waveform through the differentiable front end so
    that its features match ``feats`` (Adam on the sample values, started from Griffin-Lim)."""
    w = init_wave.detach().clone().requires_grad_(True)
    target = feats.detach()
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(iterations):
        opt.zero_grad()
        loss = (frontend(w) - target).pow(2).mean()
        loss.backward()
        opt.step()
    return w.detach().clamp(-1.0, 1.0)


# -- the front end as a file (``python -m eval schema export`` / ``--schema``) --------------------
#: what the file states besides the config fields: the STFT window and the log of the mel power
WINDOW, LOG = "hann", "ln"


def frontend_dict(config: FrontEndConfig) -> dict:
    """The front end as JSON-able data: every config field plus the fixed choices (centred STFT,
    Hann window, power spectrum, natural log of mel power + ``log_eps``, then
    ``(x - offset) / scale``, DCT-II ortho for MFCC)."""
    return {"modality": "speech", "frontend": {**config.to_dict(), "window": WINDOW, "log": LOG,
                                               "stft": "centred, reflect padding, power 2"}}


def load_frontend(source) -> FrontEndConfig:
    """A front end from :func:`frontend_dict`'s data or a JSON file of it (ValueError naming the
    problem otherwise). ``"log": "db"`` (``10 log10``, as torchaudio's ``AmplitudeToDB``) with
    its ``offset``/``scale`` in dB is converted to the equivalent natural-log normalisation."""
    import json
    import math
    from dataclasses import fields
    from pathlib import Path

    d = source
    if not isinstance(source, dict):
        try:
            d = json.loads(Path(source).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"speech front end {str(source)!r}: not a readable JSON file ({e})") from None
    if not isinstance(d, dict) or d.get("modality") != "speech" or not isinstance(d.get("frontend"), dict):
        raise ValueError(f"{str(source)!r} is not a speech front end (expected {{\"modality\": \"speech\", "
                         f"\"frontend\": {{...}}}} as `python -m eval schema export` writes for a speech case)")
    fe = dict(d["frontend"])
    window, log = fe.pop("window", WINDOW), str(fe.pop("log", LOG)).lower()
    fe.pop("stft", None)
    if window != WINDOW:
        raise ValueError(f"speech front end: window {window!r} is not supported (the kit's STFT uses a Hann window)")
    known = {f.name for f in fields(FrontEndConfig)}
    unknown = sorted(set(fe) - known)
    if unknown:
        raise ValueError(f"speech front end: unknown fields {unknown}; known: {sorted(known)}")
    if log in ("db", "decibel"):  # (10 log10 m - o) / s == (ln m - o ln10/10) / (s ln10/10)
        k = math.log(10.0) / 10.0
        fe["offset"], fe["scale"] = float(fe.get("offset", 0.0)) * k, float(fe.get("scale", 1.0)) * k
    elif log != LOG:
        raise ValueError(f"speech front end: log {log!r} must be 'ln' or 'db'")
    if int(fe.get("sample_rate", SAMPLE_RATE)) != SAMPLE_RATE:
        raise ValueError(f"speech front end: sample_rate {fe['sample_rate']} is not supported (the speech kit works "
                         f"at {SAMPLE_RATE} Hz); resample the federation's audio to {SAMPLE_RATE} Hz")
    try:
        return FrontEndConfig(**fe)
    except TypeError as e:
        raise ValueError(f"speech front end: {e}") from None
