"""tabular-exact past the pattern search (``tableak/exact/pursuit.py``): German Credit at B = 64."""
import numpy as np
import torch

from common.seed import make_generator
from common.threat import HONEST
from tableak.exact import TabularExact, TabularExactConfig
from tableak.exact.pursuit import _complement, deflation_scale, two_class_head

from .test_exact import _case, _same_rows


def test_deflation_scale_is_each_rows_p1_minus_label(german):
    """Handle of the pursuit: with a 2-class head the second weight gradient is ``sum_i s_i (v * m2_i)
    h1_i^T`` with ``s_i = p_1 - y_i`` (summed loss), so the rank-one downdate of a true row recovers
    ``s_i`` (and with it the row's label) from the gradient alone."""
    _, schema = german
    model, rows, batch, obs, prior = _case(german, 16, seed=5)
    x = batch.inputs["x"].double()
    m64 = model.double()
    with torch.no_grad():
        h1 = torch.relu(m64.net[0](x))
        m2 = (m64.net[2](h1) > 0).double()
        p1 = torch.softmax(m64(x), -1)[:, 1]
    v = two_class_head(model, model.net[2])
    dw2 = obs.tensors["net.2.weight"].double().numpy() * 16  # mean reduction -> summed
    uu, ss, vt, _ = _complement(dw2, 16)
    s = [deflation_scale(uu, ss, vt, v * m2[i].numpy(), h1[i].numpy()) for i in range(16)]
    np.testing.assert_allclose(s, (p1 - batch.labels.double()).numpy(), rtol=1e-3, atol=1e-6)


def test_german_b64_recovered_exactly_without_labels(german):
    """German B = 64 (dev seed 3), labels not granted: the first-layer span has rank < 64 with every
    continuous direction free, peeling finds a few rows and ~3e7 categorical patterns are left (past
    ``max_patterns``). The pursuit finds the rest on the second layer; the whole-gradient fit certifies
    every row, and every row and label equals the truth (before the pursuit: only the peeled rows, 1-5
    of 64 on dev seeds 0-9, were certified)."""
    _, schema = german
    model, rows, batch, obs, prior = _case(german, 64, seed=3, threat=HONEST)
    cfg = TabularExactConfig(fallback="none", resolution=False)
    rec = TabularExact(cfg).reconstruct(obs, model, prior, generator=make_generator(1))
    assert rec.stats["rank"] < 64 and rec.stats["pursuit_rows"] >= 32
    assert _same_rows(schema, rec, rows) and rec.stats["certified_rows"] == 1.0
    pairs = sorted(zip(map(tuple, schema.decode_arrays(rec.data)[0].tolist()), rec.labels.tolist()))
    truth = sorted(zip(map(tuple, schema.frame_to_arrays(rows)[0].tolist()), batch.labels.tolist()))
    assert pairs == truth


def test_relu_gauss_newton_finds_true_rows_and_early_stop_changes_nothing(german):
    """The one Gauss-Newton solver of the root search and the pursuit (``layer2.ReluGaussNewton``), on a real
    German batch (B = 16, dev seed 5): from the box's centre, every true row's categorical pattern gets its
    continuous values back (second-layer residual ~0, raw values equal after rounding); dropping rows whose
    ReLU pattern stopped changing (the root search) gives the values of running every step (the pursuit) up
    to rounding (not bit for bit: the batched products round differently on fewer rows, which is why the
    merged solver keeps both loops); the clipped solve never leaves the box."""
    from tableak.exact.layer2 import ReluGaussNewton

    _, schema = german
    model, rows, batch, obs, prior = _case(german, 16, seed=5)
    x = batch.inputs["x"].double().numpy()
    w1, b1 = (t.detach().double().numpy() for t in (model.net[0].weight, model.net[0].bias))
    ci = np.asarray(schema.continuous_index)
    lo, hi = (t.double().numpy()[ci] for t in schema.bounds())
    _, _, _, comp = _complement(obs.tensors["net.2.weight"].double().numpy() * 16, 16)
    z0 = (x - np.isin(np.arange(schema.dim), ci) * x) @ w1.T + b1  # categorical part only
    gn = ReluGaussNewton(w1[:, ci], comp)
    start = np.repeat(((lo + hi) / 2)[None], 16, 0)
    t_all = gn.solve(z0, start, 12, ridge=1e-12)
    t_stop = gn.solve(z0, start, 12, ridge=1e-12, early_stop=True)
    np.testing.assert_allclose(t_stop, t_all, rtol=1e-9, atol=1e-9)
    _, res = gn.residual(z0, t_all)
    assert np.all(res < 1e-6)
    y = x.copy()
    y[:, ci] = t_all
    assert np.array_equal(schema.decode_arrays(y)[1], schema.frame_to_arrays(rows)[1])
    far = np.repeat((lo - 10 * (hi - lo))[None], 16, 0)  # a start far outside the box
    t_box = ReluGaussNewton(w1[:, ci], comp, dtype=np.float32).solve(z0, far, 3, ridge=1e-9, lo=lo, hi=hi)
    assert np.all((t_box >= lo) & (t_box <= hi))
