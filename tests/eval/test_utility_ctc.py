"""Utility of the CTC recogniser under a defense: held-out WER/CER after federated training (eval/utility_ctc.py)."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from eval.__main__ import main
from eval.catalog import catalog
from eval.utility import measure
from eval.utility_ctc import greedy_decode

CASE = "speech/ctc-mel/fedsgd"


def _have_speech_pool() -> bool:
    from speechleak.data import have_tts

    return have_tts("flite")


def test_greedy_decode_merges_repeats_and_drops_blanks():
    from speechleak.models import VOCAB

    ids = [0, VOCAB.index("h"), VOCAB.index("h"), 0, VOCAB.index("i"), VOCAB.index(" "), VOCAB.index(" "), 0,
           VOCAB.index("o"), 0, VOCAB.index("o")]
    lp = torch.full((1, len(ids), len(VOCAB)), -10.0)
    lp[0, torch.arange(len(ids)), torch.tensor(ids)] = 0.0
    assert greedy_decode(lp) == ["hi oo"]


@pytest.mark.skipif(not _have_speech_pool(), reason="flite not installed (the sentence pool is synthesised)")
def test_recogniser_learns_without_defense_and_not_under_huge_noise():
    case = catalog().cases.get(CASE)
    start = measure(case, rounds=1, clients=1, lr=1e-7, seed=0)
    clean = measure(case, rounds=150, clients=2, lr=3e-3, seed=0)
    noisy = measure(replace(case, defenses=({"name": "gaussian", "sigma": 1e4},)), rounds=150, clients=2, lr=3e-3,
                    seed=0)
    assert clean["train_loss"] < 0.5 * start["train_loss"]  # real learning on the training sentences
    assert clean["train_cer"] < 0.8 and clean["test_cer"] < clean["constant_cer"]  # reads, and beyond sentence priors
    assert noisy["train_loss"] > 0.8 * start["train_loss"]  # noise far above the gradient: no learning
    assert noisy["train_cer"] > clean["train_cer"] + 0.15 and noisy["test_loss"] > clean["test_loss"]
    assert 0.0 <= clean["test_cer"] and clean["test_wer"] <= 1.5
    assert clean["test_accuracy"] == max(0.0, 1.0 - clean["test_cer"])
    assert "held-out 7 of 35 sentences" in clean["note"]


@pytest.mark.skipif(not _have_speech_pool(), reason="flite not installed (the sentence pool is synthesised)")
def test_utility_cli_measures_ctc_case_and_its_undefended_twin(tmp_path):
    suite = tmp_path / "s.toml"
    suite.write_text(f'[[run]]\ncase = "{CASE}"\nattacks = ["speech-ctc-tts"]\n'
                     'defenses = [[{ name = "gaussian", sigma = 1.0 }]]\n')
    assert main(["utility", str(suite), "--out", str(tmp_path / "o"), "--rounds", "2", "--clients", "1"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "o" / "utility.jsonl").read_text().splitlines()]
    assert sorted(len(x["case"]["defenses"]) for x in lines) == [0, 1]
    assert all({"test_wer", "test_cer", "majority_baseline"} <= set(x["utility"]) for x in lines)
