import pytest
import torch
from torch import nn

from common.defenses import DEFENSES, DPSGD, GaussianNoise, Quantization, RandomMask, TopKPruning, build_defense
from common.fl import client_update, per_example_gradients
from common.observe import observe
from common.seed import make_generator
from common.threat import HONEST, HONEST_WITH_LABELS, Capability, ThreatModel
from common.types import Batch, FLProtocol


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    g = make_generator(1)
    batch = Batch({"x": torch.randn(3, 4, generator=g)}, torch.tensor([0, 1, 1]), {"seq_lens": [4, 4, 4]})
    lf = lambda m, b: nn.functional.cross_entropy(m(b.inputs["x"]), b.labels, reduction="none")  # noqa: E731
    return model, batch, lf


def test_observe_strips_ungranted_fields():
    model, batch, lf = setup()
    upd = client_update(model, batch, lf, FLProtocol(batch_size=3), generator=make_generator(0))
    assert upd.labels is not None and upd.seq_lens == (4, 4, 4)
    bare = observe(upd, ThreatModel("bare", frozenset({Capability.GRADIENTS})))
    assert bare.labels is None and bare.num_examples is None and bare.seq_lens is None and bare.protocol is None
    obs = observe(upd, HONEST)
    assert obs.labels is None and obs.num_examples == 3 and obs.protocol is not None
    full = observe(upd, HONEST_WITH_LABELS.with_grants(Capability.SEQUENCE_LENGTHS))
    assert torch.equal(full.labels, batch.labels) and full.seq_lens == (4, 4, 4)
    with pytest.raises(PermissionError):
        observe(upd, ThreatModel("deltas-only", frozenset({Capability.WEIGHT_DELTA})))
    assert HONEST.missing([Capability.LABELS]) == {Capability.LABELS}


#: what each capability lets through (fields of the Observation; "protocol.batch_size" is nested)
_FIELDS = {
    Capability.BATCH_SIZE: ("num_examples", "protocol.batch_size"),
    Capability.LABELS: ("labels",),
    Capability.SEQUENCE_LENGTHS: ("seq_lens",),
    Capability.LOCAL_HPARAMS: ("protocol",),
    Capability.PUBLIC_PRIOR: (),  # the prior is built by the kit, never part of the observation
}


def _get(obs, path):
    v = obs
    for part in path.split("."):
        v = None if v is None else getattr(v, part)
    return v


def _leaks(obs, update, path) -> bool:
    v, truth = _get(obs, path), _get(update, path)
    if v is None:
        return False
    return torch.equal(v, truth) if isinstance(v, torch.Tensor) else v == truth


@pytest.mark.parametrize("kind", ["gradient", "delta"])
@pytest.mark.parametrize("withheld", [c for c in Capability if c not in (Capability.GRADIENTS, Capability.WEIGHT_DELTA)])
def test_observe_never_leaks_a_withheld_capability(withheld, kind):
    """Everything granted but one capability: none of that capability's facts reach the server
    (in particular the batch size does not travel inside the protocol), and the others do."""
    model, batch, lf = setup()
    proto = FLProtocol("fedsgd" if kind == "gradient" else "fedavg", batch_size=3, local_batch_size=2)
    upd = client_update(model, batch, lf, proto, generator=make_generator(0))
    everything = ThreatModel("all", frozenset(Capability))
    obs = observe(upd, everything.without(withheld))
    for path in _FIELDS[withheld]:
        assert not _leaks(obs, upd, path), f"{path} leaked although {withheld.value} was withheld"
    for cap, paths in _FIELDS.items():
        if cap is withheld or (withheld is Capability.LOCAL_HPARAMS and cap is Capability.BATCH_SIZE):
            continue
        for path in paths:
            if withheld is Capability.BATCH_SIZE and path == "protocol":
                assert obs.protocol is not None and obs.protocol.local_lr == proto.local_lr
                continue
            assert _leaks(obs, upd, path), f"{path} missing although {cap.value} was granted"
    full = observe(upd, everything)
    assert all(_leaks(full, upd, p) for paths in _FIELDS.values() for p in paths)


@pytest.mark.parametrize("kind, needed", [("gradient", Capability.GRADIENTS), ("delta", Capability.WEIGHT_DELTA)])
def test_observe_refuses_an_update_kind_that_is_not_granted(kind, needed):
    model, batch, lf = setup()
    proto = FLProtocol("fedsgd" if kind == "gradient" else "fedavg", batch_size=3)
    upd = client_update(model, batch, lf, proto, generator=make_generator(0))
    with pytest.raises(PermissionError, match=needed.value):
        observe(upd, ThreatModel("all", frozenset(Capability)).without(needed))


def test_withheld_batch_size_is_not_recoverable_from_the_local_steps():
    model, batch, lf = setup()
    upd = client_update(model, batch, lf, FLProtocol("fedavg", batch_size=3, local_batch_size=2),
                        generator=make_generator(0))
    obs = observe(upd, HONEST.without(Capability.BATCH_SIZE))
    with pytest.raises(ValueError, match="BATCH_SIZE"):
        obs.protocol.steps_per_epoch


def test_observation_tensors_are_copies():
    model, batch, lf = setup()
    upd = client_update(model, batch, lf, FLProtocol(batch_size=3), generator=make_generator(0))
    obs = observe(upd, HONEST)
    k = next(iter(obs.tensors))
    obs.tensors[k].add_(1.0)
    assert not torch.equal(obs.tensors[k], upd.tensors[k])


def test_gaussian_noise_statistics_and_record():
    model, batch, lf = setup()
    clean = client_update(model, batch, lf, FLProtocol(batch_size=3), generator=make_generator(0))
    noisy = client_update(model, batch, lf, FLProtocol(batch_size=3), defenses=[GaussianNoise(0.5)],
                          generator=make_generator(0))
    diff = torch.cat([(noisy.tensors[k] - clean.tensors[k]).flatten() for k in clean.tensors])
    assert abs(diff.std().item() - 0.5) < 0.15
    assert noisy.defenses == ({"name": "gaussian", "sigma": 0.5},)


def test_dpsgd_without_noise_is_mean_of_clipped_per_example_grads():
    model, batch, lf = setup()
    clip = 0.05
    upd = client_update(model, batch, lf, FLProtocol(batch_size=3), defenses=[DPSGD(clip, 0.0)],
                        generator=make_generator(0))
    per = per_example_gradients(model, lf, batch, method="loop")
    norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in per.values()))
    assert (norms > clip).all()  # clipping is active
    for k, v in per.items():
        expect = (v * (clip / norms).view(-1, *[1] * (v.dim() - 1))).mean(0)
        torch.testing.assert_close(upd.tensors[k], expect, atol=1e-6, rtol=1e-4)


def test_topk_keeps_largest_fraction():
    t = {"w": torch.arange(1.0, 11.0).reshape(2, 5) * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])}
    out = TopKPruning(0.3).apply_update(t, generator=make_generator(0))["w"]
    assert (out != 0).sum() == 3 and set(out.abs()[out != 0].tolist()) == {8.0, 9.0, 10.0}


def test_mask_and_quantization():
    t = {"w": torch.randn(1000, generator=make_generator(0))}
    m = RandomMask(0.3).apply_update(t, generator=make_generator(1))["w"]
    assert 0.2 < (m == 0).float().mean() < 0.4
    q = Quantization(2).apply_update(t, generator=make_generator(1))["w"]
    assert len(torch.unique(q)) <= 3
    q8 = Quantization(8).apply_update(t, generator=make_generator(1))["w"]
    assert (q8 - t["w"]).abs().max() <= t["w"].abs().max() / 127 / 2 + 1e-6


def test_defense_registry_and_errors():
    assert set(DEFENSES.names()) == {"gaussian", "dpsgd", "topk", "mask", "quantize"}
    assert build_defense({"name": "topk", "keep": 0.1}) == TopKPruning(0.1)
    with pytest.raises(ValueError):
        build_defense({"name": "topk", "keep": 2.0})
    with pytest.raises(ValueError, match="bad parameters"):
        build_defense({"name": "gaussian", "sgima": 1})
    with pytest.raises(KeyError, match="unknown defense"):
        build_defense({"name": "nope"})
