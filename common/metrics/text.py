"""Text reconstruction metrics (predictions aligned to references beforehand)."""
from __future__ import annotations

import math
from functools import lru_cache
from statistics import fmean
from typing import Sequence


def _check(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references: align them first")
    if len(references) == 0:
        raise ValueError("no references to score")


@lru_cache(maxsize=4)
def _scorer(use_stemmer: bool):
    from rouge_score import rouge_scorer

    from .tokenize import UnicodeTokenizer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=UnicodeTokenizer(use_stemmer=use_stemmer))


def _text(x) -> str:
    """A prediction as text: anything but a string (None, NaN, a number, bytes) is the empty
    prediction, which gets no credit."""
    return x if isinstance(x, str) else ""


def rouge(*, predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = False) -> dict[str, float]:
    """ROUGE-1/2/L F-measure per example, then the plain mean (no bootstrap).

    Tokens (``common.metrics.tokenize``): ASCII text exactly as rouge_score's default tokenizer;
    other scripts keep their letters, and each CJK character or emoji is a token of its own."""
    _check(predictions, references)
    scorer = _scorer(use_stemmer)
    per = [scorer.score(ref, _text(pred)) for pred, ref in zip(predictions, references)]
    return {k: fmean(s[k].fmeasure for s in per) for k in ("rouge1", "rouge2", "rougeL")}


def rouge_per_example(*, predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
    _check(predictions, references)
    scorer = _scorer(False)
    return [{k: v.fmeasure for k, v in scorer.score(r, _text(p)).items()} for p, r in zip(predictions, references)]


def _tokens(x) -> list:
    if isinstance(x, str):
        return x.split()
    if x is None or isinstance(x, (int, float, bytes)):  # NaN, a bare number, garbage: nothing recovered
        return []
    try:
        return list(x)
    except TypeError:
        return []


def token_accuracy(*, predictions: Sequence[Sequence], references: Sequence[Sequence]) -> dict[str, float]:
    """Per example: fraction of reference positions whose token is reproduced; then mean.

    Inputs are token sequences (lists of ids or strings); a string is split on whitespace. A
    prediction that is not a sequence (None, NaN) recovers nothing; a NaN token matches nothing.
    """
    _check(predictions, references)
    scores = []
    for p, r in zip(predictions, references):
        p = _tokens(p)
        r = r.split() if isinstance(r, str) else list(r)
        if not r:
            scores.append(1.0 if not p else 0.0)
            continue
        scores.append(sum(1 for i, t in enumerate(r) if i < len(p) and p[i] == t) / len(r))
    return {"token_accuracy": fmean(scores)}


def exact_match(*, predictions: Sequence, references: Sequence, normalize: bool = True) -> dict[str, float]:
    """Fraction of examples reproduced exactly (whitespace-normalised for strings)."""
    _check(predictions, references)

    def norm(x):
        return " ".join(x.split()) if (normalize and isinstance(x, str)) else x

    def same(p, r) -> bool:
        if p is None or (isinstance(p, float) and not math.isfinite(p)):  # no reconstruction
            return False
        try:
            return bool(norm(p) == norm(r))
        except (TypeError, ValueError):  # e.g. arrays of different shapes: not equal
            return False

    return {"exact_match": fmean(1.0 if same(p, r) else 0.0 for p, r in zip(predictions, references))}
