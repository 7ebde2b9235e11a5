import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.matching import align, assignment
from common.metrics import METRICS, higher_is_better, metric_function
from common.metrics.classification import accuracy
from common.metrics.speech import cer, wer
from common.metrics.text import exact_match, rouge, token_accuracy

HF = Path(__file__).resolve().parents[2] / "common" / "metrics" / "hf"


def test_rouge_known_values():
    r = rouge(predictions=["the cat is on the mat"], references=["the cat sat on the mat"])
    assert r["rouge1"] == pytest.approx(5 / 6) and r["rouge2"] == pytest.approx(0.6)
    same = rouge(predictions=["a b c", "x y"], references=["a b c", "x y"])
    assert same == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    # per-example then mean: (1 + 0) / 2
    assert rouge(predictions=["a b", "c d"], references=["a b", "e f"])["rouge1"] == pytest.approx(0.5)


def test_wer_cer_corpus_vs_mean():
    w = wer(predictions=["hello world foo", "a"], references=["hello world bar", "a b c d e f"])
    assert w["wer"] == pytest.approx((1 + 5) / 9)
    assert w["wer_mean"] == pytest.approx((1 / 3 + 5 / 6) / 2)
    assert cer(predictions=["abc"], references=["abd"])["cer"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="empty"):
        wer(predictions=["x"], references=[" "])


def test_accuracy_token_accuracy_exact_match():
    assert accuracy(predictions=[1, 0, 1], references=[1, 1, 1])["accuracy"] == pytest.approx(2 / 3)
    assert token_accuracy(predictions=["a b x"], references=["a b c d"])["token_accuracy"] == 0.5
    assert exact_match(predictions=["a  b", "c"], references=["a b", "d"])["exact_match"] == 0.5
    with pytest.raises(ValueError, match="align"):
        rouge(predictions=["a"], references=["a", "b"])


def test_registry_directions():
    assert set(METRICS.names()) >= {"rouge", "wer", "cer", "accuracy", "token_accuracy", "exact_match"}
    assert higher_is_better("rouge2") is True and higher_is_better("wer") is False
    assert metric_function("rouge") is rouge


def test_hungarian_alignment():
    preds = ["dog barks", "the cat sat", "birds fly"]
    refs = ["the cat sat", "birds fly high", "dog barks loudly"]
    out = align(preds, refs, lambda p, r: 1 - rouge(predictions=[p], references=[r])["rouge1"])
    assert out == ["the cat sat", "birds fly", "dog barks"]
    cost = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    assert assignment(cost).tolist() == [0, 1]
    with pytest.raises(ValueError):
        assignment(np.ones((1, 2)))


@pytest.mark.parametrize("name,preds,refs,key,value", [
    ("rouge", ["the cat is on the mat"], ["the cat sat on the mat"], "rouge2", 0.6),
    ("wer", ["hello world foo"], ["hello world bar"], "wer", 1 / 3),
    ("accuracy", [1, 0, 1], [1, 1, 1], "accuracy", 2 / 3),
])
def test_local_evaluate_modules_load_offline(name, preds, refs, key, value, tmp_path, monkeypatch):
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    m = evaluate.load(str(HF / name))
    assert m.compute(predictions=preds, references=refs)[key] == pytest.approx(value)


def test_import_common_does_not_import_transformers():
    code = "import sys, common, common.fl, common.baselines, common.metrics.text, common.defenses; " \
           "assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
