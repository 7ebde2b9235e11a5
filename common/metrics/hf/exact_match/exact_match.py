"""gradleak 'exact_match' as a local Hugging Face `evaluate` module.

Load it offline by path: `evaluate.load("<repo>/common/metrics/hf/exact_match")`. It calls the same
pure function as the rest of gradleak (`common.metrics.text.exact_match`), so both paths give identical numbers.
"""
import datasets
import evaluate

from common.metrics.text import exact_match as _metric


class GradleakExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="gradleak exact_match: per-example scores, then the plain mean (see common.metrics.text)",
            citation="",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        return _metric(predictions=list(predictions), references=list(references))
