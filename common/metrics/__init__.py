"""Metrics: pure, keyword-only functions returning ``dict[str, float]``.

Every metric scores per example first and then takes a plain mean; predictions must be
aligned to references (``common.matching.align``) before a metric is called. Metrics
live in a registry with their direction and range, which leaderboards use for sorting.
Modality packages add their own metrics to the same registry with lazy targets.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..registry import Registry


@dataclass(frozen=True)
class MetricInfo:
    name: str
    target: str  # "module:function"
    modality: str
    outputs: tuple[str, ...]  # keys of the returned dict
    higher_is_better: bool = True
    range: tuple[float, float] | None = (0.0, 1.0)
    description: str = ""


METRICS: Registry[MetricInfo] = Registry("metric")

for _info in (
    MetricInfo("rouge", "common.metrics.text:rouge", "text", ("rouge1", "rouge2", "rougeL"),
               description="ROUGE-1/2/L F-measure per example (rouge_score), then mean"),
    MetricInfo("token_accuracy", "common.metrics.text:token_accuracy", "text", ("token_accuracy",),
               description="fraction of reference tokens recovered at the same position"),
    MetricInfo("exact_match", "common.metrics.text:exact_match", "text", ("exact_match",),
               description="fraction of examples reconstructed exactly"),
    MetricInfo("accuracy", "common.metrics.classification:accuracy", "any", ("accuracy",),
               description="classification accuracy (e.g. recovered labels)"),
    MetricInfo("wer", "common.metrics.speech:wer", "speech", ("wer", "wer_mean"), higher_is_better=False,
               range=(0.0, float("inf")), description="word error rate: corpus-level (wer) and per-utterance mean (wer_mean)"),
    MetricInfo("cer", "common.metrics.speech:cer", "speech", ("cer", "cer_mean"), higher_is_better=False,
               range=(0.0, float("inf")), description="character error rate: corpus-level and per-utterance mean"),
):
    METRICS.add(_info.name, _info)


def metric_function(name: str):
    import importlib

    info = METRICS.get(name)
    module, _, attr = info.target.partition(":")
    return getattr(importlib.import_module(module), attr)


def higher_is_better(output_key: str) -> bool | None:
    """Direction of a metric output key (e.g. 'rouge2'); None when unknown."""
    for name in METRICS.names():
        info = METRICS.get(name)
        if output_key in info.outputs or output_key == name:
            return info.higher_is_better
    return None
