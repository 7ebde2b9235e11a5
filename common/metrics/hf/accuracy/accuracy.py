"""gradleak 'accuracy' as a local Hugging Face `evaluate` module.

Load it offline by path: `evaluate.load("<repo>/common/metrics/hf/accuracy")`. It calls the same
pure function as the rest of gradleak (`common.metrics.classification.accuracy`), so both paths give identical numbers.
"""
import datasets
import evaluate

from common.metrics.classification import accuracy as _metric


class GradleakAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="gradleak accuracy: per-example scores, then the plain mean (see common.metrics.classification)",
            citation="",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return _metric(predictions=list(predictions), references=list(references))
