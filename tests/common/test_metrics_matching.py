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


# -- Unicode-aware ROUGE ------------------------------------------------------------------------
ASCII_SENTENCES = [
    "the cat sat on the mat", "The Cat is ON the mat!", "it's a well-known fact: 2024-01-02, 3.5%",
    "running dogs were running quickly", "a", "", "   ", "hello,world;foo_bar baz-qux", "I've got 99 problems",
    "the movie was neither funny nor moving", "don't stop believing (journey, 1981)", "e-mail me at x@y.com",
]


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_ascii_tokens_and_scores_equal_rouge_score_default(use_stemmer):
    """Published numbers must not move: on ASCII text the tokens, hence the scores, are rouge_score's own."""
    from nltk.stem import porter
    from rouge_score import rouge_scorer, tokenize

    from common.metrics.tokenize import UnicodeTokenizer, unicode_tokens

    stemmer = porter.PorterStemmer() if use_stemmer else None
    ours = UnicodeTokenizer(use_stemmer=use_stemmer)
    for s in ASCII_SENTENCES:
        assert ours.tokenize(s) == tokenize.tokenize(s, stemmer)
        assert unicode_tokens(s, stemmer) == tokenize.tokenize(s, stemmer)  # the Unicode path agrees too
    old = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=use_stemmer)
    for p in ASCII_SENTENCES:
        for r in ASCII_SENTENCES[:6]:
            if not r.strip():
                continue
            got = rouge(predictions=[p], references=[r], use_stemmer=use_stemmer)
            want = old.score(r, p)
            assert got == {k: want[k].fmeasure for k in got}, (p, r)


@pytest.mark.parametrize("text", [
    "我爱北京天安门", "今天天气很好，我们去公园吧。", "こんにちは世界", "안녕하세요 세계", "party time 🎉🎉 with 👨‍👩‍👧 ok 👍🏽",
    "Привет, как дела?", "Café crème brûlée à la carte", "नमस्ते दुनिया", "😀😎", "混合 mixed text 🚀 done",
])
def test_rouge_exact_reconstruction_in_any_script_scores_one(text):
    assert rouge(predictions=[text], references=[text]) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert rouge(predictions=[text], references=[text], use_stemmer=True)["rouge1"] == 1.0


@pytest.mark.parametrize("pred,ref", [
    ("我爱上海", "我爱北京天安门"), ("😀 hi 🎉", "🎉 hi 😀 again"), ("Привет мир", "Привет, как дела?"),
    ("café noir", "café crème"), ("👍🏻", "👍🏿"), ("", "我爱北京"), ("hello", "😀"),
])
def test_rouge_wrong_reconstruction_in_any_script_scores_below_one(pred, ref):
    r = rouge(predictions=[pred], references=[ref])
    assert r["rouge1"] < 1.0 and r["rougeL"] < 1.0


def test_rouge_cjk_and_emoji_are_one_token_each():
    from common.metrics.tokenize import unicode_tokens

    assert unicode_tokens("我爱北京") == ["我", "爱", "北", "京"]
    assert unicode_tokens("ok👍🏽🎉 👨‍👩‍👧!") == ["ok", "👍🏽", "🎉", "👨‍👩‍👧"]
    assert unicode_tokens("Crème Brûlée, ПРИВЕТ") == ["crème", "brûlée", "привет"]
    # half right: 2 of 4 characters
    assert rouge(predictions=["我爱上海"], references=["我爱北京"])["rouge1"] == pytest.approx(0.5)


def test_local_evaluate_rouge_is_unicode_aware(tmp_path, monkeypatch):
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    m = evaluate.load(str(HF / "rouge"))
    refs = ["我爱北京天安门", "party 🎉 time"]
    assert m.compute(predictions=refs, references=refs) == rouge(predictions=refs, references=refs)
    assert m.compute(predictions=refs, references=refs)["rouge1"] == 1.0


# -- metrics as data -------------------------------------------------------------------------
def test_metric_table_is_built_without_the_catalog_and_without_mutation():
    code = ("import sys, common.metrics as M; n = len(M.METRICS); "
            "assert M.higher_is_better('mcd') is False and M.higher_is_better('nrmse') is False; "
            "assert M.higher_is_better('asr_wer') is False and M.higher_is_better('exact_row') is True; "
            "assert M.higher_is_better('pesq_wb_n') is None and M.higher_is_better('feature_mse') is False; "
            "assert len(M.METRICS) == n, 'the common registry was mutated'; "
            "assert 'eval.catalog' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_published_metric_key_is_registered():
    """Every key in the published records (what the kits' score methods emit) has an entry."""
    import glob
    import json

    from common.metrics import metric_table

    table = metric_table()
    root = Path(__file__).resolve().parents[2]
    seen = set()
    for f in glob.glob(str(root / "results" / "**" / "*.jsonl"), recursive=True):
        for line in open(f, encoding="utf-8"):
            try:
                seen |= set(json.loads(line).get("metrics") or {})
            except (json.JSONDecodeError, AttributeError):
                continue
    assert seen, "no published records found"
    assert sorted(seen - set(table.keys())) == []
    for key in ("accuracy", "exact_row", "nrmse", "mcd", "snr", "si_sdr", "pesq_wb", "stoi", "speaker_top1"):
        assert key in seen or key in table.keys()


def test_accuracy_means_cell_accuracy_for_tabular_records():
    from common.metrics import metric_info, metric_table

    tab = metric_info("accuracy", modality="tabular")
    assert tab.name == "tabular_accuracy" and "cell" in tab.description
    assert metric_info("accuracy").name == "accuracy" and metric_info("accuracy", modality="text").name == "accuracy"
    assert "tabular_accuracy" in metric_table().get("accuracy").description


def test_conflicting_directions_are_refused():
    from common.metrics import MetricInfo, build_metric_table

    a = MetricInfo("a", "x:y", "any", ("k",), higher_is_better=True)
    b = MetricInfo("b", "x:y", "any", ("k",), higher_is_better=False)
    with pytest.raises(ValueError, match="higher- and lower-is-better"):
        build_metric_table([[a], [b]])
    with pytest.raises(ValueError, match="twice"):
        build_metric_table([[a], [MetricInfo("a", "x:z", "any", ("k",))]])
    assert build_metric_table([[a], [a]]).higher_is_better("k") is True


def test_every_registered_target_resolves():
    from common.metrics import metric_function, metric_table

    for name in metric_table().names():
        assert callable(metric_function(name)), name
