"""The driver's per-process model cache (``eval.pipeline.Resources``) is bounded (issue 18).

A suite of one seed per run (``textleak_lamp_paper``: 20 seeds of MiniLM) kept every seed's model for the whole
process, ~87 MB each, so a long ``eval bench`` grew by about that per sentence. The cache now evicts its least
recently used models beyond ``model_budget_mb``; an evicted model is freed, and loading it again gives the same
model (same parameters), so records do not depend on the budget."""
import gc
import weakref

import torch

from eval.catalog import catalog
from eval.pipeline import Resources, TrialSpec, load_inputs, make_kit, model_mb


def _load(resources: Resources, seed: int):
    case = catalog().cases.get("text/tiny-bert/fedsgd")
    model, _ = load_inputs(TrialSpec(case, "lamp-cos", seed=seed), case, make_kit("text"), resources,
                           device=torch.device("cpu"))
    return model


def test_models_beyond_the_budget_are_freed_and_reload_identically():
    first = _load(Resources(), 0)
    size = model_mb(first)
    assert 5 < size < 20  # tiny-bert: MiniLM's 30,522 x 64 embedding table dominates
    res = Resources(model_budget_mb=1.5 * size)  # room for one model besides the one in use
    m0 = _load(res, 0)
    ref = weakref.ref(m0)
    assert _load(res, 0) is m0  # a hit: no reload
    del m0
    _load(res, 1)
    assert len(res.models) == 1
    gc.collect()
    assert ref() is None  # seed 0's model was evicted and nothing else holds it
    again = _load(res, 0)
    assert len(res.models) == 1
    a, b = first.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = _load(res, 1).state_dict()  # seed 1's fresh head differs: the cache is keyed by seed
    assert not torch.equal(a["classifier.weight"], c["classifier.weight"])


def test_small_models_stay_cached():
    res = Resources()  # default budget (128 MB): three tiny models fit
    models = [_load(res, s) for s in range(3)]
    assert len(res.models) == 3
    assert all(_load(res, s) is m for s, m in enumerate(models))
