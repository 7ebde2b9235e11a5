"""Bad inputs refused before any work (issue 16): captures for ``eval audit`` (non-finite
tensors, paths outside the client's folder, pickled npz arrays, wrongly typed header fields),
attacks on a case of another modality, a non-finite simulated update (a failed record, never
scored), run ids from the data's contents, and the kit contract."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from eval.__main__ import main

CASE = "tabular/adult-fc/fedsgd"


def table(path: Path, n: int = 60, seed: int = 0) -> Path:
    import random

    rnd = random.Random(seed)
    rows = ["age,job,hours,income"] + [f"{rnd.randint(18, 70)},{rnd.choice(['a', 'b', 'c'])},{rnd.randint(10, 60)},"
                                       f"{rnd.choice(['low', 'high'])}" for _ in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def capture(tmp_path):
    """A valid one-client gradient capture for the tabular case, and the audit command for it."""
    from common.seed import make_generator
    from eval.capture import write_capture
    from eval.catalog import catalog
    from tableak.kit import TabularKit

    public = table(tmp_path / "public.csv")
    case = replace(catalog().cases.get(CASE), data=str(public), options={"label": "income"})
    kit = TabularKit()
    model = kit.load_model(case, device=torch.device("cpu"), generator=make_generator(0))
    pool = kit.load_pool(case, data_path=None)
    loss = torch.nn.functional.cross_entropy(model(pool.x[:1]), pool.y[:1])
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss, list(model.parameters()))
    d = write_capture(tmp_path / "cap", round=1, client_id="a", kind="gradient",
                      before={n: p.detach() for n, p in model.named_parameters()},
                      update=dict(zip(names, grads)), num_examples=1)
    cmd = ["audit", str(tmp_path / "cap"), "--attack", "idlg", "--case", CASE, "--data", str(public),
           "--label", "income", "--out", str(tmp_path / "o")]
    return d, names, cmd


def _header(d: Path, **changes) -> None:
    h = json.loads((d / "header.json").read_text())
    h.update(changes)
    (d / "header.json").write_text(json.dumps(h))


def _refused(cmd, capsys, *needles: str) -> str:
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


def test_the_valid_capture_is_audited(capture):
    d, _, cmd = capture
    assert main(cmd) == 0
    rec = json.loads((Path(cmd[-1]) / "records.jsonl").read_text())
    assert rec["status"] == "ok"


@pytest.mark.parametrize("which", ["update", "before"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_audit_refuses_a_non_finite_capture_before_any_attack(capture, capsys, which, bad):
    from safetensors.torch import load_file, save_file

    d, names, cmd = capture
    f = d / f"{which}.safetensors"
    t = dict(load_file(str(f)))
    t[names[-1]] = t[names[-1]].clone()
    t[names[-1]][0] = bad
    save_file(t, str(f))
    _refused(cmd, capsys, "NaN or Inf", repr(names[-1]), which)
    assert not (Path(cmd[-1]) / "records.jsonl").exists()  # nothing attacked, nothing recorded


@pytest.mark.parametrize("field, value", [("update", "../other/update.safetensors"), ("before", "/etc/passwd"),
                                          ("truth", "/etc/passwd"), ("truth", "../../public.csv")])
def test_audit_refuses_capture_paths_outside_the_client_folder(capture, capsys, field, value):
    d, _, cmd = capture
    other = d.parent / "other"
    other.mkdir()
    (other / "update.safetensors").write_bytes((d / "update.safetensors").read_bytes())
    _header(d, **{field: value})
    _refused(cmd, capsys, "outside the client's folder", value)


def test_audit_refuses_a_pickled_npz_with_one_line(capture, capsys):
    d, names, cmd = capture
    np.savez(d / "update.npz", **{n: np.array([{"evil": 1}], dtype=object) for n in names})
    _header(d, update="update.npz")
    _refused(cmd, capsys, "pickled object array", "update.npz")


@pytest.mark.parametrize("changes, needle", [
    ({"labels": ["x"]}, "labels must be"),
    ({"num_examples": "many"}, "num_examples must be"),
    ({"num_examples": 0}, "num_examples must be"),
    ({"protocol": {"kind": "fedsgd", "batch_size": "one"}}, "protocol.batch_size must be"),
    ({"protocol": {"kind": "fedavg", "local_lr": "fast"}}, "protocol.local_lr must be"),
    ({"protocol": {"kind": "fedavg", "shuffle": "yes"}}, "protocol.shuffle must be"),
    ({"protocol": ["fedsgd"]}, "protocol must be"),
    ({"round": "first"}, "round must be"),
])
def test_audit_refuses_wrongly_typed_header_fields(capture, capsys, changes, needle):
    d, _, cmd = capture
    _header(d, **changes)
    _refused(cmd, capsys, needle)


@pytest.mark.parametrize("command", ["run", "audit"])
def test_an_attack_of_another_modality_is_refused_up_front(capture, capsys, command, tmp_path):
    _, _, cmd = capture
    if command == "audit":
        cmd = [c if c != "idlg" else "dager" for c in cmd]
    else:
        cmd = ["run", "--attack", "dager", "--case", CASE, "--out", str(tmp_path / "r")]
    _refused(cmd, capsys, "cannot run on case", "'dager'", "tabular")


def test_generic_continuous_baselines_still_fit_tabular_and_speech_cases():
    from eval.catalog import catalog
    from eval.pipeline import check_modality, resolve_attack

    cat = catalog()
    for attack in ("idlg", "dlg", "inverting-gradients"):
        _, atk = resolve_attack(attack, {})
        check_modality(cat.cases.get(CASE), atk)
        check_modality(cat.cases.get("speech/kws-mel/fedsgd"), atk)


def test_a_simulated_update_that_became_non_finite_is_a_failed_record(tmp_path, monkeypatch):
    from common.defenses import Defense
    from eval.catalog import catalog
    from eval.runner import TrialSpec, run_trial
    import eval.pipeline as P

    @dataclass(frozen=True)
    class NaNDefense(Defense):
        """A broken defense: one tensor of its output is NaN."""

        name: ClassVar[str] = "nan-test"

        def apply_update(self, tensors, *, generator):
            out = dict(tensors)
            k = sorted(out)[0]
            out[k] = out[k] * float("nan")
            return out

    monkeypatch.setattr(P, "build_defense", lambda spec: NaNDefense())
    case = replace(catalog().cases.get(CASE), defenses=({"name": "nan-test"},), options={"label": "income"})
    rec = run_trial(TrialSpec(case, "idlg", 0, 0, {"iterations": "2"}, str(table(tmp_path / "t.csv"))))
    assert rec["status"] == "failed" and rec["metrics"] == {}
    assert "NonFiniteUpdate" in rec["error"] and "NaN or Inf" in rec["error"] and "'" in rec["error"]


def test_run_id_hashes_the_data_contents_not_the_path(tmp_path, monkeypatch):
    from common.attack import config_dict
    from eval.catalog import catalog
    from eval.pipeline import TrialSpec, data_digest, prepare
    from eval.records import run_id

    case = replace(catalog().cases.get(CASE), options={"label": "income"})
    monkeypatch.chdir(tmp_path)
    table(tmp_path / "x.csv")
    a = prepare(TrialSpec(case, "idlg", data_path="x.csv"))
    b = prepare(TrialSpec(case, "idlg", data_path="./x.csv"))
    c = prepare(TrialSpec(case, "idlg", data_path=str(tmp_path / "x.csv")))
    assert a.run_id == b.run_id == c.run_id
    assert a.data_source["sha256"] == data_digest(tmp_path / "x.csv")
    table(tmp_path / "x.csv", seed=1)  # edited: --resume must not keep the old results
    assert prepare(TrialSpec(case, "idlg", data_path="x.csv")).run_id != a.run_id
    # built-in data: the run id is exactly the one of the case dict (published records rely on it)
    p = prepare(TrialSpec(case, "idlg"))
    assert p.data_source is None
    assert p.run_id == run_id(case=case.to_dict(), attack="idlg", config=config_dict(p.attack.config), seed=0, trial=0)


def test_a_wav_folder_digest_covers_every_file_in_path_order(tmp_path):
    from eval.pipeline import data_digest

    d = tmp_path / "wavs"
    (d / "yes").mkdir(parents=True)
    (d / "no").mkdir()
    (d / "yes" / "a.wav").write_bytes(b"1")
    (d / "no" / "b.wav").write_bytes(b"2")
    first = data_digest(d)
    assert first is not None and data_digest(d) == first
    (d / "no" / "b.wav").write_bytes(b"3")
    assert data_digest(d) != first
    (d / "no" / "b.wav").write_bytes(b"2")
    (d / "no" / "b.wav").rename(d / "no" / "c.wav")
    assert data_digest(d) != first


def test_the_kit_contract_is_checked_when_a_kit_loads():
    from common.kit import check_kit
    from eval.catalog import catalog
    from tableak.kit import TabularKit

    cat = catalog()
    for modality in cat.kits:
        check_kit(cat.kits.get(modality))

    class Undeclared(TabularKit):
        optional = frozenset()

    class Missing(TabularKit):
        optional = frozenset({"truth_from_file", "save_artifacts", "explain"})

    class NoPriors(TabularKit):
        priors = {}

    for bad, needle in ((Undeclared, "without declaring"), (Missing, "unknown optional part 'explain'"),
                        (NoPriors, "priors")):
        with pytest.raises(TypeError, match=needle):
            check_kit(bad)
