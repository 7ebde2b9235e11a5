"""A non-finite reconstruction (NaN, Inf, None) is never scored as a leak, in every metric family:
it gets the metric's worst value (or no credit), never a crash and never a perfect score."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from common.matching import assignment
from common.metrics import higher_is_better, metric_info, metric_table, worst_value
from common.metrics.classification import accuracy, label_accuracy
from common.metrics.text import exact_match, rouge, rouge_per_example, token_accuracy

BAD = [float("nan"), float("inf"), float("-inf")]


# -- tabular ---------------------------------------------------------------------------------
def _schema():
    from tableak.schema import TabularSchema

    df = pd.DataFrame({"age": [20, 30, 40, 50, 60, 35], "city": ["a", "b", "c", "a", "b", "c"],
                       "y": ["0", "1", "0", "1", "0", "1"]})
    return df, TabularSchema.infer(df, label="y")


@pytest.mark.parametrize("bad", BAD)
def test_tabular_nonfinite_cells_are_wrong(bad):
    from tableak.kit import tabular_scores

    df, schema = _schema()
    truth = df.drop(columns="y").iloc[:3].reset_index(drop=True)
    x = schema.encode(truth).numpy().astype(float)
    assert tabular_scores(schema.decode(torch.tensor(x)), truth, schema)["accuracy"] == 1.0  # sanity: exact -> 1
    x[:] = bad  # every cell of the reconstruction is non-finite
    pc, pn = schema.decode_arrays(x)
    assert (pc == -1).all() and np.isnan(pn).all()  # no category, no clamped value
    tc, tn = schema.frame_to_arrays(truth)
    errors = schema.feature_errors(pc, pn, tc, tn)
    assert errors.min() == 1.0  # every pair of cells is wrong
    m = tabular_scores(schema.arrays_to_frame(pc, pn), truth, schema)
    assert m["accuracy"] == 0.0 and m["cat_accuracy"] == 0.0 and m["cont_accuracy"] == 0.0
    assert m["exact_row"] == 0.0 and m["nrmse"] == math.inf


def test_tabular_feature_errors_nan_against_exact_value():
    """The old bug: abs(nan - x) > tol is False, so a NaN cell counted as correct."""
    _, schema = _schema()
    cat = np.zeros((1, 1), dtype=int)
    err = schema.feature_errors(cat, np.array([[np.nan]]), cat, np.array([[30.0]]))
    assert err[0, 0].tolist() == [0.0, 1.0]  # categorical right, NaN continuous cell wrong


# -- text ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), 3, b"the cat"])
def test_text_metrics_give_no_credit_to_garbage(bad):
    refs = ["the cat sat", "none of them nan"]
    r = rouge(predictions=[bad, bad], references=refs)
    assert r == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert all(v == 0.0 for d in rouge_per_example(predictions=[bad], references=refs[:1]) for v in d.values())
    assert exact_match(predictions=[bad, bad], references=refs)["exact_match"] == 0.0
    assert token_accuracy(predictions=[bad, bad], references=refs)["token_accuracy"] == 0.0


def test_text_nan_tokens_match_nothing():
    nan = float("nan")
    assert token_accuracy(predictions=[[nan, nan]], references=[[nan, 2.0]])["token_accuracy"] == 0.0
    assert exact_match(predictions=[nan], references=[nan])["exact_match"] == 0.0


# -- labels / classification -----------------------------------------------------------------
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf")])
def test_label_and_classification_accuracy_nonfinite(bad):
    assert label_accuracy(predictions=[bad, 1], references=[1, 2])["label_accuracy"] == 0.5
    assert label_accuracy(predictions=[bad, bad], references=[0, 0])["label_accuracy"] == 0.0
    assert accuracy(predictions=[bad, 1], references=[0, 1])["accuracy"] == 0.5


# -- matching --------------------------------------------------------------------------------
def test_assignment_puts_nonfinite_costs_last_instead_of_raising():
    cost = np.array([[np.nan, np.inf], [0.5, 0.2], [0.1, 0.9]])
    assert assignment(cost).tolist() == [2, 1]  # the broken prediction 0 is left out
    assert sorted(assignment(np.full((2, 2), np.nan)).tolist()) == [0, 1]  # all broken: still a matching


# -- speech ----------------------------------------------------------------------------------
def _speech():
    from speechleak import metrics as M

    g = torch.Generator().manual_seed(0)
    t = torch.arange(16000) / 16000
    ref = 0.5 * torch.sin(2 * math.pi * 220 * t) * (1 + 0.5 * torch.sin(2 * math.pi * 3 * t)) \
        + 0.05 * torch.randn(16000, generator=g)
    return M, ref


@pytest.mark.parametrize("bad", BAD)
def test_speech_waveform_metrics_nonfinite(bad):
    M, ref = _speech()
    broken = ref.clone()
    broken[100:200] = bad
    assert M.snr(predictions=[broken], references=[ref]) == {"snr": M.DB_FLOOR, "si_sdr": M.DB_FLOOR}
    assert M.pesq_wb(predictions=[broken], references=[ref]) == {"pesq_wb": -0.5, "pesq_wb_n": 1.0}
    s = M.stoi(predictions=[broken], references=[ref])
    assert s == {"stoi": -1.0, "stoi_n": 1.0}
    assert M.mcd(predictions=[broken], references=[ref]) == {"mcd": math.inf}
    # mixed batch: the broken example is the worst, the good one keeps its score
    good = M.pesq_wb(predictions=[ref], references=[ref])["pesq_wb"]
    both = M.pesq_wb(predictions=[ref, broken], references=[ref, ref])
    assert both["pesq_wb"] == pytest.approx((good - 0.5) / 2) and both["pesq_wb_n"] == 2.0


@pytest.mark.parametrize("bad", BAD)
def test_speech_feature_metrics_nonfinite(bad):
    M, _ = _speech()
    ref = torch.rand(40, 50) + 0.1
    broken = ref.clone()
    broken[0, 0] = bad
    f = M.feature_similarity(predictions=[broken], references=[ref])
    assert f == {"feature_mse": math.inf, "feature_cosine": -1.0}
    assert M.spectral_snr(predictions=[broken], references=[ref]) == {"mel_snr": M.DB_FLOOR}
    assert M.db_spectral_snr(predictions=[broken], references=[ref]) == {"logmel_snr": M.DB_FLOOR}
    occ = np.ones(30)
    occ[3] = bad
    assert M.char_histogram(predictions=[occ], references=["ab"]) == {"char_hist_cosine": 0.0, "char_set_recall": 0.0}


@pytest.mark.parametrize("bad", BAD)
def test_speaker_reid_and_classifiers_nonfinite(bad):
    from speechleak.speaker import speaker_embedding, transcribe

    M, ref = _speech()
    broken = ref.clone()
    broken[5] = bad
    emb = speaker_embedding(broken)
    assert emb.shape == speaker_embedding(ref).shape and np.isnan(emb).all()
    # the all-NaN embedding used to hit names[argmax(nan...)] = the first enrolled voice
    enrolled = {"alice": np.ones_like(emb), "bob": -np.ones_like(emb)}
    assert M.speaker_reid(predictions=[emb], references=["alice"], enrolled=enrolled)["speaker_top1"] == 0.0
    assert transcribe(broken) == ""
    logits = torch.tensor([[bad, 0.0, 1.0], [0.0, 5.0, 1.0]])
    pred = M.predicted_labels(logits)
    assert pred == [None, 1]
    assert M.keyword_accuracy(predictions=pred, references=[0, 1])["keyword_accuracy"] == 0.5
    assert M.label_accuracy(predictions=[bad, 1], references=[1, 2])["label_accuracy"] == 0.5


# -- the worst values come from the registered ranges ----------------------------------------
def test_worst_values_are_the_bad_end_of_the_registered_range():
    from speechleak import metrics as M

    assert worst_value("pesq_wb") == -0.5 and worst_value("stoi") == M.STOI_WORST
    assert worst_value("feature_cosine") == M.COSINE_WORST and worst_value("mcd") == math.inf
    assert worst_value("snr") == M.DB_FLOOR and worst_value("nrmse") == math.inf
    assert worst_value("accuracy", modality="tabular") == 0.0 and worst_value("rouge1") == 0.0
    assert metric_info("accuracy", modality="tabular").name == "tabular_accuracy"
    assert higher_is_better("speakers_enrolled") is None and len(metric_table()) > 20
