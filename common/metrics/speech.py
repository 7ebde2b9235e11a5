"""Word and character error rates (jiwer): corpus-level and per-utterance mean."""
from __future__ import annotations

from statistics import fmean
from typing import Sequence


def _pairs(predictions, references):
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if len(references) == 0:
        raise ValueError("no references to score")
    if any(not r.strip() for r in references):
        raise ValueError("a reference transcript is empty: WER/CER are undefined for it")


def wer(*, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``wer``: corpus-level (Σ errors / Σ reference words); ``wer_mean``: mean of per-utterance WERs."""
    import jiwer

    _pairs(predictions, references)
    return {
        "wer": float(jiwer.wer(list(references), list(predictions))),
        "wer_mean": fmean(float(jiwer.wer(r, p)) for p, r in zip(predictions, references)),
    }


def cer(*, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    import jiwer

    _pairs(predictions, references)
    return {
        "cer": float(jiwer.cer(list(references), list(predictions))),
        "cer_mean": fmean(float(jiwer.cer(r, p)) for p, r in zip(predictions, references)),
    }
