"""Every attack end to end on a CUDA device, next to the same run on the CPU (issue 18).

Each test runs twice: on CUDA (marked ``gpu``, skipped where ``torch.cuda.is_available()`` is false;
``GRADLEAK_GPU_DEVICE=cpu`` runs that column on the CPU instead: ``bench/gpu.sh --simulate`` does so to check,
on a machine without a GPU, that the device run will not fail on an import or an asset) and on the stand-in
accelerator of ``common.fake_device`` (every default CPU run: a tensor left on the host where CUDA would refuse
the mix raises ``DeviceMixError``, and the code-path flags must match the CPU's, so a silent fallback fails).
Speech clips come from ``$GRADLEAK_SPEECH_DATA`` (``kws/<keyword>/*.wav``, ``ctc/*.wav`` + ``.txt``,
written by ``bench/gpu_prepare.sh``), else from flite (skipped when absent).

Each test runs a tiny real attack on both devices and compares them: deterministic parts (the
fast TabLeak engine's objective and gradient, DAGER's exact recovery, the random baseline) must
agree to float tolerance or exactly; optimisation attacks must reach the same quality within a
stated margin (float rounding differs between the devices, and sign-Adam / L-BFGS amplify it).
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

_GPU = os.environ.get("GRADLEAK_GPU_DEVICE", "cuda")
FAKE = "fake"  # common.fake_device.FakeDevice


@pytest.fixture(params=[
    pytest.param(_GPU, id="gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(
        _GPU.startswith("cuda") and not torch.cuda.is_available(), reason="no CUDA device")]),
    pytest.param(FAKE, id="fake")])
def dev(request) -> str:
    return request.param


def _run(case_name: str, attack: str, device: str, *, overrides: dict | None = None, batch: int | None = None,
         options: dict | None = None, data_path: str | None = None, seed: int = 0, score: bool = True):
    """One trial through the runner's own steps on ``device``; returns (reconstruction, metrics, trial)."""
    if device == FAKE:
        from common.fake_device import FakeDevice

        with FakeDevice() as fd:
            return _run(case_name, attack, fd.device, overrides=overrides, batch=batch, options=options,
                        data_path=data_path, seed=seed, score=score)
    from common.seed import derive_seed, make_generator
    from eval.catalog import catalog
    from eval.pipeline import Resources, TrialSpec, make_kit, prepare, prepare_trial
    from eval.pipeline import score as score_fn

    case = catalog().cases.get(case_name)
    if batch is not None:
        case = case.with_batch_size(batch)
    if options:
        case = dataclasses.replace(case, options={**case.options, **options})
    p = prepare(TrialSpec(case, attack, seed=seed, overrides=overrides or {}, data_path=data_path))
    kit = make_kit(p.case.modality)
    dev = torch.device(device)
    t = prepare_trial(p, kit, Resources(), device=dev)
    a = t.attacker
    rec = p.attack.reconstruct(a.observation, a.model, a.prior,
                               generator=make_generator(derive_seed(seed, 0, "attack")))
    metrics = score_fn(kit, rec, t.truth, case=p.case)[0] if score else {}
    return rec, metrics, t


def _both(*args, dev: str, **kw):
    return _run(*args, device="cpu", **kw), _run(*args, device=dev, **kw)


def _speech_dir(sub: str) -> str | None:
    root = os.environ.get("GRADLEAK_SPEECH_DATA")
    if root and (Path(root) / sub).is_dir():
        return str(Path(root) / sub)
    if shutil.which("flite") is None:
        pytest.skip("no speech clips: set GRADLEAK_SPEECH_DATA (bench/gpu_prepare.sh) or install flite")
    return None


# -- tabular -----------------------------------------------------------------------------------
def test_tableak_fast_engine_objective_and_gradient_match_cpu(dev):
    """The closed-form engine's distance and ∂/∂x on the device equal the CPU's (same inputs)."""
    from tableak.attack import TabLeakConfig
    from tableak.fast import FastEngine
    from tableak.relax import Relaxer

    _, _, tc = _run("tabular/adult-fc/fedsgd-labels", "tableak", "cpu", batch=8, score=False,
                    overrides={"iterations": 1, "ensemble": 1})
    a = tc.attacker
    target = {k: v.detach() for k, v in a.observation.tensors.items()}
    out = {}

    def one(d) -> tuple:
        model = a.model.to(d)
        tgt = {k: v.to(d) for k, v in target.items()}
        rx = Relaxer(a.prior.schema, d)
        eng = FastEngine(model, tgt, list(tgt), rx, cfg=TabLeakConfig(), reduction="mean")
        g = torch.Generator().manual_seed(0)
        x = (torch.rand((3, 8, a.prior.schema.dim), generator=g) * 2 - 1).to(d)
        ys = torch.randint(0, 2, (3, 8), generator=g).to(d)
        xl = eng.relax.to_layout(x)
        xr, saved = eng.relax.forward(xl)
        dist, bar = eng.obj(xr, eng._onehot(ys, x))
        grad = eng.relax.from_layout(eng.relax.backward(bar, saved))
        return dist.cpu(), grad.cpu()

    out["cpu"] = one("cpu")
    if dev == FAKE:
        from common.fake_device import FakeDevice

        with FakeDevice() as fd:
            out[dev] = one(fd.device)
    else:
        out[dev] = one(dev)
    a.model.to("cpu")
    torch.testing.assert_close(out[dev][0], out["cpu"][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out[dev][1], out["cpu"][1], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("engine", ["fast", "vmap"])
def test_tableak_fedsgd_runs_on_device(engine, dev):
    if dev == FAKE and engine == "vmap":
        pytest.skip("the stand-in device does not check inside torch.func.vmap")
    its, floor = (1000, 0.7) if engine == "fast" else (400, 0.6)  # the vmap engine is ~40 ops per member-step
    ov = {"engine": engine, "iterations": its, "ensemble": 4}
    (rc, mc, _), (rd, md, _) = _both("tabular/adult-fc/fedsgd-labels", "tableak", batch=8, overrides=ov, dev=dev)
    assert rd.data.device.type == "cpu" and torch.isfinite(rd.data).all()
    assert rd.stats["fast_engine"] == rc.stats["fast_engine"] == float(engine == "fast")
    assert md["accuracy"] >= floor and mc["accuracy"] >= floor, (mc, md)
    assert abs(md["accuracy"] - mc["accuracy"]) <= 0.1, (mc, md)


def test_tableak_recovered_labels_on_device(dev):
    (_, mc, _), (_, md, _) = _both("tabular/adult-fc/fedsgd", "tableak", batch=8, dev=dev,
                                   overrides={"iterations": 800, "ensemble": 3, "search_iterations": 100})
    assert md["accuracy"] >= 0.65 and abs(md["accuracy"] - mc["accuracy"]) <= 0.12, (mc, md)


def test_tableak_fedavg_on_device(dev):
    (_, mc, _), (_, md, _) = _both("tabular/adult-fc/fedavg-e1-b16-labels", "tableak", dev=dev,
                                   overrides={"iterations": 300, "fedavg_ensemble": 2})
    assert md["accuracy"] >= 0.55 and abs(md["accuracy"] - mc["accuracy"]) <= 0.15, (mc, md)


def test_tabular_random_and_ig_on_device(dev):
    (rc, mc, _), (rd, md, _) = _both("tabular/adult-fc/fedsgd-labels", "tableak-random", batch=8, dev=dev)
    torch.testing.assert_close(rd.data, rc.data)  # CPU generator, same draws on both devices
    (_, mc, _), (_, md, _) = _both("tabular/adult-fc/fedsgd-labels", "tableak-ig", batch=4, dev=dev,
                                   overrides={"iterations": 200})
    assert abs(md["accuracy"] - mc["accuracy"]) <= 0.15, (mc, md)


def _same_stats(cpu: dict, device: dict) -> None:
    """The same statistics on both devices, timings aside: counts, ranks and flags (integral values) exactly,
    continuous diagnostics (residuals, tolerances, spectral scales) to float round-off (relative 1e-4, absolute 1e-6:
    cuBLAS sums in another order than the CPU; the reconstructions themselves are compared exactly by the caller)."""
    keys = {k for k in cpu if "second" not in k and not k.endswith("_s")}
    bad = {}
    for k in sorted(keys):
        a, b = cpu[k], device.get(k)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not (float(a).is_integer() and float(b).is_integer()):
            ok = math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)
        else:
            ok = a == b
        if not ok:
            bad[k] = (a, b)
    assert not bad, f"statistics differ (cpu, device): {bad}"


def test_tabular_exact_on_device(dev):
    """The exact tabular attack (labels recovered, B=8): the same rows and certificates on both devices."""
    (rc, _, _), (rd, _, _) = _both("tabular/adult-fc/fedsgd", "tabular-exact", batch=8, dev=dev, score=False)
    assert torch.equal(rd.data, rc.data) and rd.labels.tolist() == rc.labels.tolist()
    _same_stats(rc.stats, rd.stats)


# -- text --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["text/tiny-gpt2/dager", "text/tiny-llama/dager"])
def test_dager_decoders_exact_on_device(case, dev):
    (rc, mc, _), (rd, md, _) = _both(case, "dager", batch=3, dev=dev)
    assert md["exact_match"] == 1.0 and mc["exact_match"] == 1.0, (mc, md)
    assert rd.data == rc.data
    # the same code paths on both devices (the AffineScan prefilter, the incremental first/second blocks: a block
    # whose self-check fails on one device only, e.g. by comparing a cuda tensor with a CPU one, is a silent fallback)
    flags = ("fast_scan", "ffn_prefilter", "l2_block", "precondition_failed", "timed_out")
    assert {k: rd.stats.get(k) for k in flags} == {k: rc.stats.get(k) for k in flags}, (rc.stats, rd.stats)


@pytest.mark.parametrize("case", ["text/tiny-gpt2/dager", "text/tiny-llama/dager"])
def test_dager_past_the_rank_limit_on_device(case, dev):
    """B=8 on the tiny decoders is past their width (the frontier search, deep rerank, rotary ranked search):
    the same reconstruction and the same statistics (timings aside) on both devices."""
    (rc, _, _), (rd, _, _) = _both(case, "dager", batch=8, dev=dev)
    assert rd.data == rc.data
    _same_stats(rc.stats, rd.stats)


def _tiny_bert3_dager(device: str, b: int = 2):
    """DAGER's encoder path on a 3-layer float64 random BERT (as tests/textleak/test_dager.py:
    the kit's 2-layer tiny-bert has no layer-2 span), everything on ``device``."""
    if device == FAKE:
        from common.fake_device import FakeDevice

        with FakeDevice() as fd:
            return _tiny_bert3_dager(fd.device, b)
    import transformers as tf

    from common.fl import client_update
    from common.observe import observe
    from common.seed import make_generator
    from textleak.attacks.dager import DAGER
    from textleak.cases_dager import CASES
    from textleak.kit import TextKit
    from textleak.models import TextModelInfo, attach, minilm_tokenizer

    dev = torch.device(device)
    tok = minilm_tokenizer()
    cfg = tf.BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.BertForSequenceClassification(cfg).double().eval().to(dev)
    attach(model, TextModelInfo("tiny-bert-3l", "encoder", tok, 2))
    kit = TextKit()
    case = CASES["text/tiny-bert/dager"].with_batch_size(b)
    pool = kit.load_pool(case, data_path=None)
    batch, truth = kit.sample(pool, case, model=model, device=dev, generator=make_generator(1))
    upd = client_update(model, batch, kit.loss_fn, case.protocol, generator=make_generator(2))
    prior = kit.make_prior(case, model, "text", device=dev)
    rec = DAGER().reconstruct(observe(upd, case.threat), model, prior, generator=make_generator(3))
    return rec, kit.score(rec, truth, case=case)[0]


def test_dager_encoder_exact_on_device(dev):
    (rc, mc), (rd, md) = _tiny_bert3_dager("cpu"), _tiny_bert3_dager(dev)
    assert md["exact_match"] == 1.0 and mc["exact_match"] == 1.0, (mc, md, rd.stats)


def test_dager_encoder_past_the_rank_limit_on_device(dev):
    """B=8 on the 3-layer tiny BERT (width 64) is past its rank: the ranked encoder search, peeling and the
    certificates; the same sentences, flags and statistics (timings aside) on both devices."""
    (rc, _), (rd, _) = _tiny_bert3_dager("cpu", 8), _tiny_bert3_dager(dev, 8)
    assert rd.data == rc.data
    _same_stats(rc.stats, rd.stats)


@pytest.mark.parametrize("attack", ["lamp-cos", "tag"])
def test_lamp_and_tag_run_on_device(attack, dev):
    """A tiny BERT, B=2, a few steps (LAMP with swaps and a random tiny-GPT-2 LM prior): same
    first-step objective on both devices, finite results, the quality within a margin."""
    ov = {"n_steps": 30, "init_candidates": 4, "init_permutations": 4}
    if attack == "lamp-cos":
        ov |= {"swap_every": 10, "swap_candidates": 8, "swap_burnin": 0.0}
    (rc, mc, _), (rd, md, _) = _both("text/tiny-bert/fedsgd", attack, batch=2, overrides=ov, dev=dev,
                                     options={"lm_prior": "tiny-gpt2"})
    assert rd.stats["init_grad_loss"] == pytest.approx(rc.stats["init_grad_loss"], rel=1e-3, abs=1e-5)
    assert abs(md["rouge1"] - mc["rouge1"]) <= 0.3, (mc, md)


# -- speech ------------------------------------------------------------------------------------
def _feature_cosine(rec, t) -> float:
    f, g = rec.data["features"].flatten().double(), t.truth["feats"].flatten().double()
    return float(f @ g / (f.norm() * g.norm()))


def test_speech_lbfgs_keyword_on_device(dev):
    data = _speech_dir("kws")
    kw = dict(batch=1, overrides={"iterations": 15, "refine_iterations": 0, "griffin_lim_iters": 4},
              data_path=data, score=False)
    (rc, _, tc), (rd, _, td) = _both("speech/kws-mel/fedsgd", "speech-lbfgs", dev=dev, **kw)
    torch.testing.assert_close(td.truth["feats"], tc.truth["feats"], rtol=1e-4, atol=1e-4)
    cc, cd = _feature_cosine(rc, tc), _feature_cosine(rd, td)
    assert cd >= 0.5 and abs(cd - cc) <= 0.1, (cc, cd)
    assert rd.labels.tolist() == rc.labels.tolist()


def test_speech_lbfgs_ctc_on_device(dev):
    data = _speech_dir("ctc")
    kw = dict(batch=1, overrides={"iterations": 8, "refine_iterations": 0, "griffin_lim_iters": 4},
              data_path=data, score=False)
    (rc, _, tc), (rd, _, td) = _both("speech/ctc-mel/fedsgd", "speech-lbfgs", dev=dev, **kw)
    cc, cd = _feature_cosine(rc, tc), _feature_cosine(rd, td)
    assert torch.isfinite(rd.data["features"]).all()
    assert abs(cd - cc) <= 0.15, (cc, cd)
