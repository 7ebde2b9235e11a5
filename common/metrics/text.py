"""Text reconstruction metrics (predictions aligned to references beforehand)."""
from __future__ import annotations

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

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=use_stemmer)


def rouge(*, predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = False) -> dict[str, float]:
    """ROUGE-1/2/L F-measure per example, then the plain mean (no bootstrap)."""
    _check(predictions, references)
    scorer = _scorer(use_stemmer)
    per = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {k: fmean(s[k].fmeasure for s in per) for k in ("rouge1", "rouge2", "rougeL")}


def rouge_per_example(*, predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
    _check(predictions, references)
    scorer = _scorer(False)
    return [{k: v.fmeasure for k, v in scorer.score(r, p).items()} for p, r in zip(predictions, references)]


def token_accuracy(*, predictions: Sequence[Sequence], references: Sequence[Sequence]) -> dict[str, float]:
    """Per example: fraction of reference positions whose token is reproduced; then mean.

    Inputs are token sequences (lists of ids or strings); a string is split on whitespace.
    """
    _check(predictions, references)
    scores = []
    for p, r in zip(predictions, references):
        p = p.split() if isinstance(p, str) else list(p)
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

    return {"exact_match": fmean(1.0 if norm(p) == norm(r) else 0.0 for p, r in zip(predictions, references))}
