"""gradleak 'rouge' as a local Hugging Face `evaluate` module.

Load it offline by path: `evaluate.load("<repo>/common/metrics/hf/rouge")`. It calls the same
pure function as the rest of gradleak (`common.metrics.text.rouge`, Unicode-aware tokens: an exact
reconstruction in any script scores 1), so both paths give identical numbers.
"""
import datasets
import evaluate

from common.metrics.text import rouge as _metric


class GradleakRouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="gradleak rouge: per-example scores, then the plain mean (see common.metrics.text)",
            citation="",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        return _metric(predictions=list(predictions), references=list(references))
