"""The speech front end as an exportable/importable encoding (issue 22): ``python -m eval schema
export SPEECH_CASE`` writes sample rate, STFT, window, mel bins, band and log scaling; ``--schema``
(or the capture's declared ``schema.json``) makes the audit compute features the federation's
way; a mismatch is refused, an undeclared front end is assumed with a warning; a user's own
keyword model (``--model module:factory``) is audited with it."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from eval.__main__ import main

CASE = "speech/kws-mel/fedsgd"


def export(capsys, case: str = CASE) -> dict:
    assert main(["schema", "export", case]) == 0
    return json.loads(capsys.readouterr().out)


def test_export_round_trips_and_db_scaling_is_the_same_features(capsys):
    from speechleak.frontend import FrontEnd, load_frontend
    from speechleak.kit import frontend_for
    from eval.catalog import catalog

    d = export(capsys)
    fe = d["frontend"]
    assert (fe["sample_rate"], fe["n_fft"], fe["hop"], fe["n_mels"], fe["f_min"], fe["f_max"], fe["window"], fe["log"]) \
        == (16000, 512, 128, 80, 0.0, 8000.0, "hann", "ln")
    assert load_frontend(d) == frontend_for(catalog().cases.get(CASE)).config
    assert export(capsys, "speech/kws-mfcc/fedsgd")["frontend"]["kind"] == "mfcc"
    # a federation that scales in dB: (10 log10(mel + eps) - o) / s, o = -26 dB, s = 17 dB
    db = {"modality": "speech", "frontend": {**fe, "n_mels": 40, "log": "db", "offset": -26.0, "scale": 17.0}}
    front = FrontEnd(load_frontend(db))
    wave = torch.sin(torch.linspace(0, 2000, 16000)) * torch.linspace(0, 1, 16000)
    mel = torch.matmul(front.power_spectrogram(wave).T, front.fbanks).T
    expected = (10 * torch.log10(mel + fe["log_eps"]) - -26.0) / 17.0
    assert torch.allclose(front(wave), expected, atol=1e-4)
    for bad, needle in (({**fe, "window": "hamming"}, "window"), ({**fe, "sample_rate": 8000}, "16000 Hz"),
                        ({**fe, "n_bins": 3}, "unknown fields"), ({**fe, "log": "log2"}, "'ln' or 'db'")):
        with pytest.raises(ValueError, match=needle):
            load_frontend({"modality": "speech", "frontend": bad})
    with pytest.raises(ValueError, match="not a speech front end"):
        load_frontend({"dim": 105, "features": []})


@pytest.fixture(scope="module")
def capture64(tmp_path_factory):
    """A real keyword client update (FedSGD, B = 1) computed with a 64-mel, 7.6 kHz front end."""
    import contextlib
    import io

    from eval.capture import write_capture
    from eval.catalog import catalog
    from eval.pipeline import Resources, TrialSpec, make_kit, prepare, prepare_trial

    root = tmp_path_factory.mktemp("speech")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["schema", "export", CASE]) == 0
    d = json.loads(buf.getvalue())
    (root / "fe80.json").write_text(json.dumps(d))
    d["frontend"].update(n_mels=64, f_max=7600.0)
    (root / "fe64.json").write_text(json.dumps(d))
    case = catalog().cases.get(CASE)
    case = replace(case, options={**case.options, "frontend": str(root / "fe64.json")})
    t = prepare_trial(prepare(TrialSpec(case, "speech-lbfgs", seed=0)), make_kit("speech"), Resources(),
                      device=torch.device("cpu"))
    obs, model = t.attacker.observation, t.attacker.model
    before = {n: q.detach() for n, q in model.named_parameters()}
    for name, schema in (("declared", root / "fe64.json"), ("undeclared", None)):
        write_capture(root / name, round=1, client_id="c", kind=obs.kind, num_examples=1, before=before,
                      update=obs.tensors, schema=schema)
    return root


def test_the_declared_front_end_is_used_and_a_mismatch_is_refused(capture64, tmp_path, capsys):
    root = capture64
    cmd = ["audit", str(root / "declared"), "--attack", "speech-lbfgs", "--case", CASE, "--set", "iterations=5"]
    assert main([*cmd, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "is assumed" not in err
    rec = json.loads((tmp_path / "a" / "records.jsonl").read_text())
    assert rec["status"] == "ok" and rec["encoding"]["source"] == "declared", rec.get("error")
    wav = Path(rec["artifacts"]["decoded"])  # no ground truth: the reconstruction is written as audio
    assert wav.suffix == ".wav" and wav.stat().st_size > 16000
    assert main([*cmd, "--schema", str(root / "fe64.json"), "--out", str(tmp_path / "b")]) == 0
    # the case's 80-mel front end against a capture that declares 64 mels: refused, with the fix
    assert main([*cmd, "--schema", str(root / "fe80.json"), "--out", str(tmp_path / "c")]) == 2
    assert "declares another speech front end than --schema" in capsys.readouterr().err
    # undeclared: the case's front end is assumed (warning), and the model no longer fits (refused, with the fix)
    assert main([*cmd[:1], str(root / "undeclared"), *cmd[2:], "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "declare no speech front end" in err and "is assumed" in err and "pass its --schema" in err
    # a tabular schema is not a front end
    tab = tmp_path / "tab.json"
    tab.write_text(json.dumps({"dim": 105}))
    assert main([*cmd, "--schema", str(tab), "--out", str(tmp_path / "e")]) == 2
    assert "not a speech front end" in capsys.readouterr().err


def test_a_users_own_keyword_model_is_audited_with_the_declared_front_end(tmp_path, capsys, monkeypatch):
    """``--model mykws:make`` (an MLP, not the kit's CNN) on a real keyword update, 64-mel front end."""
    from eval.capture import write_capture
    from speechleak.frontend import FrontEnd, load_frontend

    (tmp_path / "mykws.py").write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64 * 126, 16), torch.nn.Sigmoid(),\n"
        "                               torch.nn.Linear(16, 10))\n"
        "def wrong():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(80 * 126, 10))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    d = {"modality": "speech", "frontend": {"n_mels": 64, "f_max": 7600.0}}
    (tmp_path / "fe.json").write_text(json.dumps(d))
    import mykws

    from eval.catalog import catalog
    from speechleak.kit import SpeechKit

    pool = SpeechKit().load_pool(catalog().cases.get(CASE), data_path=None)
    feats = FrontEnd(load_frontend(tmp_path / "fe.json"))(pool.wave(0)[None])  # [1, 64, 126]
    label = torch.tensor([int(pool.dataset[0]["label"])])
    model = mykws.make()
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(feats), label), list(model.parameters()))
    write_capture(tmp_path / "caps", round=1, client_id="c", kind="gradient", num_examples=1,
                  before={n: p.detach() for n, p in model.named_parameters()}, update=dict(zip(names, grads)),
                  schema=tmp_path / "fe.json")
    cmd = ["audit", str(tmp_path / "caps"), "--attack", "speech-lbfgs", "--case", CASE, "--set", "iterations=100"]
    assert main([*cmd, "--model", "mykws:wrong", "--out", str(tmp_path / "w")]) == 2
    assert "features of shape [B, 64, 126]" in capsys.readouterr().err
    assert main([*cmd, "--model", "mykws:make", "--out", str(tmp_path / "o")]) == 0
    rec = json.loads((tmp_path / "o" / "records.jsonl").read_text())
    assert rec["status"] == "ok" and rec["case"]["model"] == "mykws:make", rec.get("error")
    from safetensors.torch import load_file

    got = load_file(rec["artifacts"]["reconstruction"])["features"]
    cos = torch.nn.functional.cosine_similarity(got.flatten(), feats.detach().flatten(), dim=0)
    assert cos > 0.9, float(cos)
