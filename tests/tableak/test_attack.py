import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.func import functional_call

from common.fl import batch_gradient, client_update
from common.observe import observe
from common.seed import make_generator
from common.threat import HONEST, HONEST_WITH_LABELS
from common.types import Batch, FLProtocol
from tableak.attack import TabLeak, TabLeakConfig, TabularRandom, restore_label_counts
from tableak.kit import TabularKit, entropy_quartiles
from tableak.models import FullyConnected
from tableak.relax import Relaxer


def _setup(data, b, seed=0, threat=HONEST_WITH_LABELS, protocol=None):
    df, schema = data
    g = make_generator(seed)
    model = FullyConnected(schema.dim, generator=g).eval()
    idx = torch.randint(0, len(df), (b,), generator=g)
    rows = df.iloc[idx.numpy()].reset_index(drop=True)
    batch = Batch({"x": schema.encode(rows)}, schema.encode_labels(rows))
    protocol = protocol or FLProtocol("fedsgd", batch_size=b)
    upd = client_update(model, batch, TabularKit.loss_fn, protocol, generator=g)
    return model, rows, batch, observe(upd, threat)


def _prior(data, model):
    df, schema = data
    from tableak.kit import TabularPool

    kit = TabularKit()
    pool = TabularPool(None, df, schema)
    cat, hist = pool.marginals()
    from tableak.prior import TabularPrior

    names = {id(p): n for n, p in model.named_parameters()}
    return TabularPrior(schema, lambda p, x: functional_call(model, p, (x,)), model.penultimate,
                        names[id(model.last.weight)], names[id(model.last.bias)], cat, hist)


def test_relaxations_keep_gradients_and_bounds(adult):
    _, schema = adult
    rx = Relaxer(schema)
    x = (torch.randn(3, 5, schema.dim) * 20).requires_grad_(True)  # far outside the data range
    soft = rx.softmax(x)
    for p in rx.probabilities(soft):
        assert torch.all(p >= 0)
    raw = soft * rx.scale + rx.mean
    for f, sl in schema.categorical:
        torch.testing.assert_close(raw[..., sl].sum(-1), torch.ones(3, 5), atol=1e-4, rtol=0)
        assert torch.all(raw[..., sl] >= -1e-5)
    sig = rx.sigmoid(x)
    lo, hi = schema.bounds()
    ci = schema.continuous_index
    assert torch.all(sig[..., ci] >= lo[ci] - 1e-5) and torch.all(sig[..., ci] <= hi[ci] + 1e-5)
    # both relaxations are built out of place: the leaf gets a gradient in every column
    (rx.sigmoid(rx.softmax(x)) * torch.randn(schema.dim)).sum().backward()
    assert x.grad is not None and torch.all(torch.isfinite(x.grad))
    assert (x.grad.abs().sum((0, 1)) > 0).float().mean() > 0.9
    assert not x.grad.isnan().any()
    # clamp only touches continuous columns
    y = rx.clamp(x.detach())
    cat_cols = np.setdiff1d(np.arange(schema.dim), ci)
    torch.testing.assert_close(y[..., cat_cols], x.detach()[..., cat_cols])


def _preimage(rx: Relaxer, schema, x_true: torch.Tensor) -> torch.Tensor:
    """A point whose relaxation decodes to ``x_true`` (softmax logits 12·one-hot, sigmoid logit)."""
    raw = x_true * rx.scale + rx.mean
    parts = []
    for f, sl in schema.blocks():
        piece = raw[..., sl]
        if f.kind == "categorical":
            parts.append((12 * piece - rx.mean[sl]) / rx.scale[sl])
        else:
            lo, hi = rx.lo[sl], rx.hi[sl]
            u = ((x_true[..., sl] - lo) / (hi - lo)).clamp(1e-7, 1 - 1e-7)
            parts.append(torch.log(u / (1 - u)))
    return torch.cat(parts, -1)


def test_fixed_point_truth_is_a_stationary_minimum(adult):
    """Started at the truth the attack stays there: zero loss, ~zero input gradient, and
    optimisation steps from (a pre-image of) the truth keep decoding to the truth."""
    _, schema = adult
    model, rows, batch, obs = _setup(adult, 4)
    prior = _prior(adult, model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    target = dict(obs.tensors)
    names = list(target)
    atk = TabLeak(TabLeakConfig(sign=False, lr=1e-3))

    def loss_one(x, y):
        g = torch.func.grad(lambda p: torch.nn.functional.cross_entropy(prior.forward(p, x), y))(params)
        return atk._distance(g, target, names)

    x_true = batch.inputs["x"].clone().requires_grad_(True)
    loss = loss_one(x_true, batch.labels)
    (gx,) = torch.autograd.grad(loss, x_true)
    assert float(loss.detach()) < 1e-5
    x_off = (x_true.detach() + 0.3 * torch.randn_like(x_true)).requires_grad_(True)
    loss_off = loss_one(x_off, batch.labels)
    (gx_off,) = torch.autograd.grad(loss_off, x_off)
    assert float(loss_off.detach()) > 100 * float(loss.detach()) and gx.norm() < 1e-2 * gx_off.norm()
    rx = Relaxer(schema)
    x0 = _preimage(rx, schema, batch.inputs["x"]).unsqueeze(0)
    out = atk._optimise(loss_one, x0, batch.labels.unsqueeze(0), rx, 20)[0]
    from common.types import Reconstruction

    m, _ = TabularKit().score(Reconstruction(out), {"frame": rows, "schema": schema, "labels": batch.labels}, case=None)
    assert m["accuracy"] == 1.0, m


def test_pooling_fixed_point(adult):
    """An ensemble of row-permuted copies of the truth pools back to the truth."""
    _, schema = adult
    _, rows, batch, _ = _setup(adult, 6)
    rx = Relaxer(schema)
    x = batch.inputs["x"]
    g = make_generator(1)
    cands = torch.stack([x[torch.randperm(6, generator=g)] for _ in range(7)])
    pooled, aligned, _ = TabLeak()._pool(rx, schema, cands, torch.arange(7.0), "median+softmax")
    from common.types import Reconstruction

    m, _ = TabularKit().score(Reconstruction(pooled), {"frame": rows, "schema": schema, "labels": batch.labels}, case=None)
    assert m["accuracy"] == 1.0 and m["nrmse"] < 1e-3, m
    # every member agrees after alignment, so the continuous spread is zero
    assert float(aligned[..., schema.continuous_index].std(0).max()) < 1e-6


def test_batched_ensemble_equals_sequential_loop(adult):
    """The vmapped ensemble computes exactly the per-member losses and input gradients of a loop
    (whole runs are not compared: the sign trick amplifies float rounding of near-zero gradients)."""
    _, schema = adult
    model, _, batch, obs = _setup(adult, 3)
    prior = _prior(adult, model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    target, names = dict(obs.tensors), list(obs.tensors)
    atk = TabLeak()
    rx = Relaxer(schema)

    def loss_one(xr, y):
        x = atk._relax(rx, xr)
        g = torch.func.grad(lambda p: torch.nn.functional.cross_entropy(prior.forward(p, x), y))(params)
        return atk._distance(g, target, names)

    x = (torch.rand(5, 3, schema.dim, generator=make_generator(2)) * 2 - 1).requires_grad_(True)
    ys = batch.labels.unsqueeze(0).expand(5, 3)
    lv = torch.func.vmap(loss_one)(x, ys)
    (gv,) = torch.autograd.grad(lv.sum(), x)
    ll = torch.stack([loss_one(x[e], ys[e]) for e in range(5)])
    (gl,) = torch.autograd.grad(ll.sum(), x)
    torch.testing.assert_close(lv, ll, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gv, gl, atol=1e-6, rtol=1e-4)
    # and both code paths of reconstruct run and give the same shapes / close results
    cfg = TabLeakConfig(iterations=5, ensemble=3)
    a = TabLeak(cfg).reconstruct(obs, model, prior, generator=make_generator(5))
    b = TabLeak(replace(cfg, batched=False)).reconstruct(obs, model, prior, generator=make_generator(5))
    assert a.data.shape == b.data.shape == (3, schema.dim)


def test_b1_recovery_on_adult_above_90_percent(adult):
    """Known label, B = 1: the full pipeline (small ensemble) recovers > 90 % of the features."""
    kit = TabularKit()
    accs = []
    for seed in range(3):
        model, rows, batch, obs = _setup(adult, 1, seed=seed)
        rec = TabLeak(TabLeakConfig(iterations=400, ensemble=4)).reconstruct(
            obs, model, _prior(adult, model), generator=make_generator(seed))
        m, _ = kit.score(rec, {"frame": rows, "schema": adult[1], "labels": batch.labels}, case=None)
        accs.append(m["accuracy"])
    assert np.mean(accs) > 0.9, accs


def test_label_counts_recovered_from_gradient(adult):
    """Geng et al. counts: TabLeak's weight rule (N(0,1) dummy rows) lands within the ±10 % search
    window; the bias rule is exact on an untrained FC."""
    for seed in range(5):
        model, rows, batch, obs = _setup(adult, 16, seed=seed, threat=HONEST)
        assert obs.labels is None
        prior = _prior(adult, model)
        params = {k: v.detach() for k, v in model.named_parameters()}
        truth = np.bincount(batch.labels.numpy(), minlength=2)
        w = restore_label_counts(dict(obs.tensors), prior, params, 16, generator=make_generator(seed))
        b = restore_label_counts(dict(obs.tensors), prior, params, 16, generator=make_generator(seed), rule="bias")
        assert w.sum() == b.sum() == 16
        assert abs(int(w[1]) - int(truth[1])) <= 2  # ceil(0.1 * 16)
        assert (b == truth).all()


def test_unknown_labels_attack_and_search(adult):
    """Labels not granted: the searched label counts land within one of the truth on batches that hold
    both classes (seeds 2 and 3 have 2 and 5 positives of 8), never the all-majority fallback."""
    for seed in (2, 3):
        model, rows, batch, obs = _setup(adult, 8, seed=seed, threat=HONEST)
        assert obs.labels is None
        rec = TabLeak(TabLeakConfig(iterations=30, ensemble=2, label_search=True, search_iterations=20,
                                    search_restarts=1)).reconstruct(obs, model, _prior(adult, model),
                                                                    generator=make_generator(0))
        assert rec.labels.shape == (8,) and rec.stats["label_search_candidates"] >= 3
        assert rec.data.shape == (8, adult[1].dim)
        truth_pos, got_pos = int(batch.labels.sum()), int(rec.labels.sum())
        assert truth_pos in (2, 5) and abs(got_pos - truth_pos) <= 1


def test_random_baseline_draws_continuous_per_row(adult):
    model, rows, batch, obs = _setup(adult, 16)
    prior = _prior(adult, model)
    schema = adult[1]
    rec = TabularRandom().reconstruct(obs, model, prior, generator=make_generator(0))
    df = schema.decode(rec.data)
    assert df["fnlwgt"].nunique() > 1 and df["age"].nunique() > 1  # the reference's bug would give 1
    for f, _ in schema.continuous:
        assert df[f.name].between(f.lower, f.upper).all()
    from tableak.attack import RandomBaselineConfig

    ref = TabularRandom(RandomBaselineConfig(continuous_per_row=False)).reconstruct(
        obs, model, prior, generator=make_generator(0))
    assert schema.decode(ref.data)["fnlwgt"].nunique() == 1


def test_fedavg_attack_recovers_small_client(adult):
    protocol = FLProtocol("fedavg", batch_size=4, local_epochs=2, local_batch_size=2, local_lr=0.01)
    model, rows, batch, obs = _setup(adult, 4, protocol=protocol)
    assert obs.kind == "delta"
    rec = TabLeak(TabLeakConfig(iterations=150, fedavg_ensemble=2)).reconstruct(
        obs, model, _prior(adult, model), generator=make_generator(0))
    kit = TabularKit()
    m, _ = kit.score(rec, {"frame": rows, "schema": adult[1], "labels": batch.labels}, case=None)
    rnd = TabularRandom().reconstruct(obs, model, _prior(adult, model), generator=make_generator(0))
    m_rnd, _ = kit.score(rnd, {"frame": rows, "schema": adult[1], "labels": batch.labels}, case=None)
    assert m["accuracy"] > m_rnd["accuracy"] + 0.1, (m, m_rnd)


def test_entropy_quartiles_and_heatmap(tmp_path, adult):
    errors = np.array([[0, 0, 1, 1]] * 4, dtype=float)
    entropy = np.array([[0.1, 0.2, 0.9, 0.8]] * 4)
    lo, hi = entropy_quartiles(errors, entropy)
    assert lo == 1.0 and hi == 0.0
    from tableak.entropy import save_heatmap

    schema = adult[1]
    nc, nn = len(schema.categorical), len(schema.continuous)
    save_heatmap(tmp_path / "h.png", schema, np.random.rand(5, nc), np.random.rand(5, nn),
                 np.random.rand(5, nc + nn) > 0.5)
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_kit_scoring_exact_and_tolerance(adult):
    df, schema = adult
    kit = TabularKit()
    rows = df.iloc[:5].reset_index(drop=True)
    x = schema.encode(rows)
    perm = torch.tensor([3, 1, 4, 0, 2])
    from common.types import Reconstruction

    m, _ = kit.score(Reconstruction(x[perm]), {"frame": rows, "schema": schema, "labels": torch.zeros(5)}, case=None)
    assert m["accuracy"] == 1.0 and m["exact_row"] == 1.0 and m["nrmse"] == 0.0
    # shift age by 0.3 σ (inside tolerance) and fnlwgt by 0.4 σ (outside)
    shifted = rows.copy()
    std = {f.name: f.std for f in schema.features}
    shifted["age"] = shifted["age"] + 0.3 * std["age"]
    shifted["fnlwgt"] = shifted["fnlwgt"] + 0.4 * std["fnlwgt"]
    m, _ = kit.score(Reconstruction(shifted), {"frame": rows, "schema": schema, "labels": torch.zeros(5)}, case=None)
    assert math.isclose(m["accuracy"], 1 - 1 / 14) and m["exact_row"] == 0.0


def test_fast_engine_equals_vmap_engine(adult):
    """The closed-form engine (tableak/fast.py) computes the vmap engine's per-member distances and
    input gradients (cosine and l2, τ ≠ 1), and a short whole run gives the same reconstruction."""
    from tableak.fast import FastEngine

    _, schema = adult
    model, rows, batch, obs = _setup(adult, 8)
    prior = _prior(adult, model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    target, names = dict(obs.tensors), list(obs.tensors)
    rx = Relaxer(schema)
    ys = batch.labels.unsqueeze(0).expand(4, 8)
    for cfg in (TabLeakConfig(), TabLeakConfig(loss="l2"), TabLeakConfig(temperature=0.5, sigmoid_temperature=2.0)):
        atk = TabLeak(cfg)

        def loss_one(xr, y):
            g = torch.func.grad(lambda p: torch.nn.functional.cross_entropy(prior.forward(p, atk._relax(rx, xr)), y))(
                params)
            return atk._distance(g, target, names)

        x = (torch.rand(4, 8, schema.dim, generator=make_generator(2)) * 6 - 3).requires_grad_(True)
        lv = torch.func.vmap(loss_one)(x, ys)
        (gv,) = torch.autograd.grad(lv.sum(), x)
        eng = FastEngine(model, target, names, rx, cfg=cfg, reduction="mean")
        with torch.no_grad():
            xl = eng.relax.to_layout(x.detach())
            xr, saved = eng.relax.forward(xl)
            torch.testing.assert_close(eng.relax.from_layout(xr), atk._relax(rx, x.detach()))
            lf, xb = eng.obj(xr, torch.nn.functional.one_hot(ys, 2).float())
            gf = eng.relax.from_layout(eng.relax.backward(xb, saved))
        torch.testing.assert_close(lf, lv.detach(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(gf, gv, atol=1e-7, rtol=1e-4)
        raw = [atk._distance(torch.func.grad(lambda p: torch.nn.functional.cross_entropy(
            prior.forward(p, x[e].detach()), ys[e]))(params), target, names) for e in range(4)]
        torch.testing.assert_close(eng.losses(x.detach(), ys), torch.stack(raw), atol=1e-6, rtol=1e-5)
    # whole (short) runs: same seed -> same reconstruction and projected losses
    cfg = TabLeakConfig(iterations=20, ensemble=3)
    a = TabLeak(replace(cfg, engine="fast")).reconstruct(obs, model, prior, generator=make_generator(4))
    b = TabLeak(replace(cfg, engine="vmap")).reconstruct(obs, model, prior, generator=make_generator(4))
    assert a.stats["fast_engine"] == 1.0 and b.stats["fast_engine"] == 0.0
    torch.testing.assert_close(a.data, b.data, atol=1e-4, rtol=1e-4)
    assert a.stats["final_projected_loss"] == pytest.approx(b.stats["final_projected_loss"], abs=1e-5)
    assert a.stats["best_member_projected_loss"] == pytest.approx(b.stats["best_member_projected_loss"], abs=1e-5)


def test_fast_engine_selection_and_fallback(adult):
    """auto picks the fast engine for the FC MLP and falls back to vmap for any other model;
    engine="fast" on a model it cannot handle is a one-line ValueError."""
    _, schema = adult
    model, _, batch, obs = _setup(adult, 4)
    prior = _prior(adult, model)
    cfg = TabLeakConfig(iterations=3, ensemble=2)
    assert TabLeak(cfg).reconstruct(obs, model, prior, generator=make_generator(0)).stats["fast_engine"] == 1.0
    assert TabLeak(replace(cfg, batched=False)).reconstruct(
        obs, model, prior, generator=make_generator(0)).stats["fast_engine"] == 0.0

    class Tanh(torch.nn.Module):  # same parameters, another activation: not a Linear/ReLU MLP
        def __init__(self, fc):
            super().__init__()
            self.net = fc.net

        def forward(self, x):
            return self.net[4](torch.tanh(self.net[2](torch.tanh(self.net[0](x)))))

    other = Tanh(model)
    upd = client_update(other, batch, TabularKit.loss_fn, FLProtocol("fedsgd", batch_size=4), generator=make_generator(1))
    obs2 = observe(upd, HONEST_WITH_LABELS)
    prior2 = replace(prior, forward=lambda p, x: functional_call(other, p, (x,)))
    assert TabLeak(cfg).reconstruct(obs2, other, prior2, generator=make_generator(0)).stats["fast_engine"] == 0.0
    with pytest.raises(ValueError, match="engine='fast'"):
        TabLeak(replace(cfg, engine="fast")).reconstruct(obs2, other, prior2, generator=make_generator(0))


def test_fast_engine_recovers_b1(adult):
    """The fast engine's whole pipeline, as the vmap engine's: B = 1 recovers > 90 % of features."""
    kit = TabularKit()
    accs = []
    for seed in range(3):
        model, rows, batch, obs = _setup(adult, 1, seed=seed)
        rec = TabLeak(TabLeakConfig(iterations=400, ensemble=4, engine="fast")).reconstruct(
            obs, model, _prior(adult, model), generator=make_generator(seed))
        m, _ = kit.score(rec, {"frame": rows, "schema": adult[1], "labels": batch.labels}, case=None)
        accs.append(m["accuracy"])
    assert np.mean(accs) > 0.9, accs
