"""DLG / iDLG / IG recover a single input of a small fully connected network."""
import pytest
import torch
from torch import nn

from common.baselines import DLG, IDLG, GradientMatchingConfig, InvertingGradients
from common.fl import client_update
from common.kit import ContinuousPrior
from common.labels import idlg_label, label_counts
from common.observe import observe
from common.seed import make_generator
from common.threat import HONEST, HONEST_WITH_LABELS
from common.types import Batch, FLProtocol

D, C = 12, 4


def loss_fn(model, batch):
    y = batch.labels
    return nn.functional.cross_entropy(model(batch.inputs["x"]), y, reduction="none")


def setup(b=1, seed=0, threat=HONEST):
    g = make_generator(seed)
    model = nn.Sequential(nn.Linear(D, 32), nn.Sigmoid(), nn.Linear(32, C))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x = torch.rand(b, D, generator=g)
    y = torch.randint(0, C, (b,), generator=g)
    upd = client_update(model, Batch({"x": x}, y), loss_fn, FLProtocol(batch_size=b), generator=g)
    prior = ContinuousPrior((D,), C, lambda xx, yy: Batch({"x": xx}, yy), loss_fn,
                            label_weight="2.weight", label_bias="2.bias",
                            sample_inputs=lambda n, gg: torch.rand(n, D, generator=gg))
    return model, x, y, observe(upd, threat), prior


def test_idlg_label_rule_recovers_each_class():
    for seed in range(8):
        _, _, y, obs, _ = setup(seed=seed)
        assert idlg_label(obs.tensors, weight="2.weight", bias="2.bias") == y.item()


def test_label_counts_for_a_batch():
    _, _, y, obs, _ = setup(b=6, seed=3)
    counts = label_counts(obs.tensors, num_examples=6, weight="2.weight", bias="2.bias")
    assert counts.sum() == 6
    truth = torch.bincount(y, minlength=C).numpy()
    assert abs(counts - truth).sum() <= 2


@pytest.mark.parametrize("attack", [DLG(), IDLG()])
def test_dlg_family_recovers_single_input(attack):
    model, x, y, obs, prior = setup(seed=1)
    rec = attack.reconstruct(obs, model, prior, generator=make_generator(5))
    assert rec.stats["final_grad_loss"] < 1e-8
    torch.testing.assert_close(rec.data, x, atol=1e-3, rtol=0)
    assert rec.labels.tolist() == y.tolist()


def test_inverting_gradients_recovers_single_input_and_fixed_point():
    model, x, y, obs, prior = setup(seed=2, threat=HONEST_WITH_LABELS)
    cfg = GradientMatchingConfig(distance="cosine", optimizer="adam", lr=0.05, iterations=800, restarts=4,
                                 lr_schedule=True, labels="observed")
    rec = InvertingGradients(cfg).reconstruct(obs, model, prior, generator=make_generator(0))
    # cosine matching is scale-invariant only up to the model's non-linearity: the input is identified
    assert (rec.data - x).abs().max() < 0.02
    # fixed point: started at the truth, the loss is ~0 and the attack stays there
    cfg0 = GradientMatchingConfig(distance="l2", optimizer="adam", lr=1e-4, iterations=20, init_scale=0.0,
                                  labels="observed")

    class AtTruth(InvertingGradients):
        pass

    atk = AtTruth(cfg0)
    shifted = ContinuousPrior(prior.input_shape, C, lambda xx, yy: Batch({"x": xx + x}, yy), loss_fn)
    rec0 = atk.reconstruct(obs, model, shifted, generator=make_generator(0))
    assert rec0.stats["final_grad_loss"] < 1e-9
    assert rec0.data.abs().max() < 5e-3


def test_batched_restarts_equal_sequential():
    model, x, y, obs, prior = setup(seed=4, threat=HONEST_WITH_LABELS)
    base = dict(distance="cosine", optimizer="adam", lr=0.05, iterations=30, restarts=3, labels="observed")
    a = InvertingGradients(GradientMatchingConfig(**base, batched=True)).reconstruct(obs, model, prior, generator=make_generator(9))
    b = InvertingGradients(GradientMatchingConfig(**base, batched=False)).reconstruct(obs, model, prior, generator=make_generator(9))
    torch.testing.assert_close(a.data, b.data, atol=1e-5, rtol=1e-4)


def test_labels_required_when_observed_mode():
    model, x, y, obs, prior = setup()
    with pytest.raises(ValueError, match="LABELS"):
        InvertingGradients(GradientMatchingConfig(labels="observed")).reconstruct(obs, model, prior, generator=make_generator(0))
