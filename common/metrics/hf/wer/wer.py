"""gradleak 'wer' as a local Hugging Face `evaluate` module.

Load it offline by path: `evaluate.load("<repo>/common/metrics/hf/wer")`. It calls the same
pure function as the rest of gradleak (`common.metrics.speech.wer`), so both paths give identical numbers.
"""
import datasets
import evaluate

from common.metrics.speech import wer as _metric


class GradleakWer(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="gradleak wer: per-example scores, then the plain mean (see common.metrics.speech)",
            citation="",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        return _metric(predictions=list(predictions), references=list(references))
