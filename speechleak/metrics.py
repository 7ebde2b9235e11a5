"""Speech reconstruction metrics: pure, keyword-only functions returning ``dict[str, float]``.

Predictions must be aligned to references beforehand (the kit uses Hungarian matching on
feature MSE). Each metric scores every example and then takes the plain mean; a metric that
is undefined for an example (PESQ on a silent clip, STOI on < 30 non-silent frames) skips
it and reports how many examples it scored in ``<name>_n``; if none, the key is absent
(never a silent 0).

A non-finite reconstruction (NaN or Inf anywhere in an example) never crashes a metric and
never scores well: it gets the metric's worst value (the bad end of its registered range:
cosine -1, PESQ -0.5, STOI -1, SNRs the -300 dB floor, MSE and MCD +inf, a miss for speaker
re-identification and classification), wherever the metric is defined for the reference.
"""
from __future__ import annotations

import math
import warnings
from functools import lru_cache
from statistics import fmean
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from common.metrics.classification import as_label

SAMPLE_RATE = 16000
DB_FLOOR = -300.0  # SNR of a hopeless (or non-finite) reconstruction
PESQ_WORST, STOI_WORST, COSINE_WORST = -0.5, -1.0, -1.0


def _check(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references: align them first")
    if len(references) == 0:
        raise ValueError("no references to score")


def _np(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)


def _finite(a: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(a)))


def _db(ratio: float) -> float:
    """10 log10 of a power ratio; DB_FLOOR where that is undefined (NaN, 0: an infinite error)."""
    ratio = float(ratio)
    if not ratio > 0:  # also catches NaN
        return DB_FLOOR
    return 10 * math.log10(ratio)


def feature_similarity(*, predictions: Sequence, references: Sequence) -> dict[str, float]:
    """Feature-map MSE and cosine similarity (flattened), per example then mean."""
    _check(predictions, references)
    mse, cos = [], []
    for p, r in zip(predictions, references):
        p, r = _np(p).ravel(), _np(r).ravel()
        c = _flat_cosine(p, r)
        mse.append(math.inf if c is None else float(np.mean((p - r) ** 2)))
        cos.append(COSINE_WORST if c is None else c)
    return {"feature_mse": fmean(mse), "feature_cosine": fmean(cos)}


def _flat_cosine(p: np.ndarray, r: np.ndarray) -> float | None:
    """Cosine of two flattened maps; None when the reconstruction is not finite."""
    return float(p @ r / (np.linalg.norm(p) * np.linalg.norm(r) + 1e-12)) if _finite(p) else None


def feature_cosine_share(*, predictions: Sequence, references: Sequence, at: float = 0.9) -> dict[str, float]:
    """Share of the examples whose feature cosine is at least ``at`` (0.9: issue 21's B=4 bar, "at least
    half of the utterances at >= 0.9"); a non-finite reconstruction counts as below it."""
    _check(predictions, references)
    cos = [_flat_cosine(_np(p).ravel(), _np(r).ravel()) for p, r in zip(predictions, references)]
    hits = sum(c is not None and c >= at for c in cos)
    return {"feature_cosine_ge90": hits / len(predictions)}


def speech_region_similarity(*, predictions: Sequence, references: Sequence, floor: float, margin: float = 0.15,
                             max_shift: int = 16) -> dict[str, float]:
    """Where a feature cosine comes from (mel maps [F, T] with silence at ``floor``). The speech
    frames are the reference's frames whose mean lies more than ``margin`` above the floor
    (references without such frames are skipped). ``speech_cosine``: cosine over those frames
    only; ``dynamics_cosine``: the same after removing each mel bin's mean over those frames (the
    long-term spectrum), i.e. how much of the time-varying content is recovered;
    ``shift_cosine``: the plain whole-map cosine at the best circular time shift within
    ±``max_shift`` frames (a diagnostic for the time-shift symmetry; never the headline)."""
    _check(predictions, references)
    sp, dyn, sh = [], [], []

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))

    for p, r in zip(predictions, references):
        p, r = _np(p), _np(r)
        mask = (r - floor).mean(0) > margin
        if not mask.any():
            continue
        if not _finite(p):
            sp.append(COSINE_WORST), dyn.append(COSINE_WORST), sh.append(COSINE_WORST)
            continue
        ps, rs = p[:, mask], r[:, mask]
        sp.append(cos(ps, rs))
        dyn.append(cos(ps - ps.mean(1, keepdims=True), rs - rs.mean(1, keepdims=True)))
        sh.append(max(cos(np.roll(p, k, axis=1), r) for k in range(-max_shift, max_shift + 1)))
    if not sp:
        return {}
    return {"speech_cosine": fmean(sp), "dynamics_cosine": fmean(dyn), "shift_cosine": fmean(sh)}


def snr(*, predictions: Sequence, references: Sequence) -> dict[str, float]:
    """Waveform SNR and scale-invariant SDR (dB), per example then mean."""
    _check(predictions, references)
    s, sd = [], []
    for p, r in zip(predictions, references):
        p, r = _np(p).ravel(), _np(r).ravel()
        n = min(len(p), len(r))
        p, r = p[:n], r[:n]
        if not _finite(p):
            s.append(DB_FLOOR)
            sd.append(DB_FLOOR)
            continue
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            s.append(_db((r @ r + 1e-20) / (((r - p) @ (r - p)) + 1e-20)))
            alpha = (p @ r) / (r @ r + 1e-20)
            target = alpha * r
            sd.append(_db((target @ target + 1e-20) / (((p - target) @ (p - target)) + 1e-20)))
    return {"snr": fmean(s), "si_sdr": fmean(sd)}


def spectral_snr(*, predictions: Sequence, references: Sequence) -> dict[str, float]:
    """SNR (dB) of a (mel power) spectrogram against the original one: 10 log10 ‖S‖² / ‖S − Ŝ‖²."""
    _check(predictions, references)
    out = []
    for p, r in zip(predictions, references):
        p, r = _np(p).ravel(), _np(r).ravel()
        if not _finite(p):
            out.append(DB_FLOOR)
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            ratio = (r @ r + 1e-20) / (((r - p) @ (r - p)) + 1e-20)
        out.append(10 * math.log10(max(float(np.nan_to_num(ratio, nan=1e-30)), 1e-30)))  # floor: -300 dB
    return {"mel_snr": fmean(out)}


def db_spectral_snr(*, predictions: Sequence, references: Sequence, floor: float = 1e-5) -> dict[str, float]:
    """SNR (dB) of the spectrogram *in decibels*: L = 10 log10(mel power + floor), then
    10 log10 ‖L‖² / ‖L − L̂‖². The usual "mel-spectrogram SNR" of a dB-scaled mel image; it is far
    higher than the SNR of the power spectrogram (``spectral_snr``) for the same reconstruction
    and depends on ``floor`` (the front end's log epsilon), so the two are reported side by side."""
    def db(x):
        a = _np(x)
        if not _finite(a):
            return a  # stays non-finite: scored DB_FLOOR
        return 10 * np.log10(np.clip(a, 0, None) + floor)

    snr = spectral_snr(predictions=[db(p) for p in predictions], references=[db(r) for r in references])
    return {"logmel_snr": snr["mel_snr"]}


def pesq_wb(*, predictions: Sequence, references: Sequence, rate: int = SAMPLE_RATE) -> dict[str, float]:
    """Wide-band PESQ (ITU-T P.862.2, ``pesq`` package), -0.5..4.5."""
    from pesq import pesq

    _check(predictions, references)
    vals = []
    for p, r in zip(predictions, references):
        p, r = _np(p).ravel(), _np(r).ravel()
        n = min(len(p), len(r))
        broken = not _finite(p[:n])
        try:  # a broken reconstruction: worst score where PESQ is defined for the reference
            v = float(pesq(rate, r[:n], r[:n] if broken else p[:n], "wb"))
        except Exception:  # noqa: BLE001 - pesq raises NoUtterancesError etc. where undefined
            continue
        vals.append(PESQ_WORST if broken else v)
    return {"pesq_wb": fmean(vals), "pesq_wb_n": float(len(vals))} if vals else {"pesq_wb_n": 0.0}


def stoi(*, predictions: Sequence, references: Sequence, rate: int = SAMPLE_RATE) -> dict[str, float]:
    """STOI (``pystoi``), 0..1; examples with too few non-silent frames are skipped, not scored 0."""
    from pystoi import stoi as _stoi

    _check(predictions, references)
    vals = []
    for p, r in zip(predictions, references):
        p, r = _np(p).ravel(), _np(r).ravel()
        n = min(len(p), len(r))
        broken = not _finite(p[:n])  # worst score where STOI is defined (that depends on the reference only)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            v = float(_stoi(r[:n], r[:n] if broken else p[:n], rate, extended=False))
        if any("Not enough STFT frames" in str(w.message) for w in caught):
            continue
        vals.append(STOI_WORST if broken else v)
    return {"stoi": fmean(vals), "stoi_n": float(len(vals))} if vals else {"stoi_n": 0.0}


@lru_cache(maxsize=1)
def _mcd_frontend():
    from .frontend import FrontEnd, FrontEndConfig

    return FrontEnd(FrontEndConfig(kind="mfcc", n_mels=80, n_mfcc=25, offset=0.0, scale=1.0))


_MCD_SCALE = 0.5 * math.sqrt(2.0 / 80)


def mcd(*, predictions: Sequence, references: Sequence) -> dict[str, float]:
    """Mel-cepstral distortion (dB): (10 / ln 10) · sqrt(2 Σ_{d=1..24} (c_d − ĉ_d)²), mean over
    frames where the original is not silent. Cepstra: DCT of the natural-log mel amplitude
    spectrum (80 bins) in the (2/N) scaling, c0 excluded; no time warping (the clips are
    aligned). An approximation of the SPTK mel-cepstrum MCD, not numerically identical."""
    _check(predictions, references)
    fe = _mcd_frontend()
    vals = []
    for p, r in zip(predictions, references):
        p = torch.as_tensor(_np(p), dtype=torch.float32).flatten()
        r = torch.as_tensor(_np(r), dtype=torch.float32).flatten()
        n = min(len(p), len(r))
        with torch.no_grad():
            energy = fe.log_mel(r[:n]).exp().sum(0)
        keep = energy > energy.max() * 1e-4
        if not bool(keep.any()):
            continue
        if not bool(torch.isfinite(p[:n]).all()):  # worst distortion (MCD is defined for this reference)
            vals.append(math.inf)
            continue
        with torch.no_grad():
            # log *amplitude* cepstra, rescaled from the orthonormal DCT to the (2/N) convention
            cp, cr = (fe(p[:n]) * _MCD_SCALE, fe(r[:n]) * _MCD_SCALE)  # [25, T]
        d = (cp[1:, keep] - cr[1:, keep]).pow(2).sum(0).mul(2).sqrt() * (10 / math.log(10))
        vals.append(float(d.mean()))
    return {"mcd": fmean(vals)} if vals else {}


def word_error(*, predictions: Sequence[str], references: Sequence[str], prefix: str = "") -> dict[str, float]:
    """WER and CER (jiwer, corpus level) of ASR transcripts; empty references are skipped."""
    import jiwer

    _check(predictions, references)
    pairs = [(p if isinstance(p, str) else "", r) for p, r in zip(predictions, references) if r.strip()]
    if not pairs:
        return {}
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    return {f"{prefix}wer": float(jiwer.wer(refs, preds)), f"{prefix}cer": float(jiwer.cer(refs, preds))}


def keyword_accuracy(*, predictions: Sequence[int], references: Sequence[int]) -> dict[str, float]:
    """Fraction of reconstructions a separately trained keyword classifier labels correctly
    (a missing prediction, None or NaN, e.g. for a non-finite reconstruction, is wrong)."""
    _check(predictions, references)
    return {"keyword_accuracy": fmean(1.0 if as_label(p) == int(r) else 0.0 for p, r in zip(predictions, references))}


def predicted_labels(logits: Tensor) -> list[int | None]:
    """argmax per row of classifier logits; None for a row with a NaN/Inf logit (a broken
    reconstruction), so that it can never hit the true class by accident."""
    ok = torch.isfinite(logits).flatten(1).all(1).tolist()
    idx = logits.argmax(-1).tolist()
    return [i if good else None for i, good in zip(idx, ok)]


def speaker_reid(*, predictions: Sequence, references: Sequence[str], enrolled: dict) -> dict[str, float]:
    """Top-1 speaker re-identification: each reconstruction's speaker embedding is compared
    (cosine) with every enrolled voice's mean embedding; correct when the nearest is the
    true speaker. Also the number of enrolled voices (chance = 1 / that)."""
    _check(predictions, references)
    names = sorted(enrolled)
    bank = np.stack([_np(enrolled[n]) for n in names])
    bank = bank / (np.linalg.norm(bank, axis=1, keepdims=True) + 1e-12)
    hits = []
    for p, r in zip(predictions, references):
        e = _np(p)
        if not _finite(e):  # a broken reconstruction identifies nobody
            hits.append(0.0)
            continue
        e = e / (np.linalg.norm(e) + 1e-12)
        hits.append(1.0 if names[int(np.argmax(bank @ e))] == r else 0.0)
    return {"speaker_top1": fmean(hits), "speakers_enrolled": float(len(names))}


def label_accuracy(*, predictions: Sequence[int], references: Sequence[int]) -> dict[str, float]:
    """Recovered labels as a multiset (order-free) against the true labels (None/NaN: wrong)."""
    _check(predictions, references)
    p, r = sorted(as_label(x) for x in predictions), sorted(int(x) for x in references)
    return {"label_accuracy": fmean(1.0 if a == b else 0.0 for a, b in zip(p, r))}


def char_histogram(*, predictions: Sequence, references: Sequence[str]) -> dict[str, float]:
    """Bag-of-characters recovery for CTC: cosine between the recovered per-character
    occupancy (non-blank classes) and the true character counts of the batch."""
    from .models import VOCAB, encode_text

    if len(predictions) != 1:
        raise ValueError("char_histogram takes one batch-level occupancy vector")
    occ = _np(predictions[0])[1:]
    if not _finite(occ):  # a broken occupancy vector recovers nothing
        return {"char_hist_cosine": 0.0, "char_set_recall": 0.0}
    counts = np.zeros(len(VOCAB) - 1)
    for text in references:
        for i in encode_text(text):
            counts[i - 1] += 1
    cos = float(occ @ counts / (np.linalg.norm(occ) * np.linalg.norm(counts) + 1e-12))
    true_set = counts > 0
    top = np.argsort(-occ)[: int(true_set.sum())]
    recall = float(true_set[top].mean()) if true_set.any() else 0.0
    return {"char_hist_cosine": cos, "char_set_recall": recall}
