"""Flower today (issue 22): the Message-API strategies (``flwr.serverapp.strategy.FedAvg`` with
``strategy.start``) are captured by the same ``CapturingStrategy``, the example federation in
``examples/flower_tabular`` runs end to end, and its audit with the federation's own model
(``--model flower_tabular.task:make_model``) recovers the clients' rows."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

flwr = pytest.importorskip("flwr")

from eval.__main__ import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "flower_tabular"
CASE = "tabular/adult-fc/fedsgd"


@pytest.fixture
def example(monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.delenv("FLOWER_TABULAR_CONFIG", raising=False)
    assert main(["schema", "export", CASE]) == 0  # step 1 of the README's guide
    schema = tmp_path / "schema.json"
    schema.write_text(capsys.readouterr().out)
    import importlib.util

    spec = importlib.util.spec_from_file_location("flower_tabular_run", EXAMPLE / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    return run, schema


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]


def test_message_api_federation_is_captured_and_audited_with_the_users_model(example, tmp_path, capsys):
    from eval.flower import CapturingStrategy, MessageCapturingStrategy
    from flwr.serverapp.strategy import FedAvg

    assert isinstance(CapturingStrategy(FedAvg(), capture_dir=tmp_path / "x"), MessageCapturingStrategy)
    run, schema = example
    caps = tmp_path / "captures"
    run.run(str(caps), str(schema), **{"rows-per-client": 1, "batch-size": 1})
    headers = sorted(caps.rglob("header.json"))
    assert len(headers) == 2
    h = json.loads(headers[0].read_text())
    assert h["protocol"] == {"kind": "fedavg", "batch_size": 1, "local_epochs": 1, "local_batch_size": 1,
                             "local_lr": 0.01, "loss_reduction": "mean", "shuffle": False}
    assert h["truth"] == "truth.csv" and h["schema"] == "schema.json"  # copied in: the folder is self-contained
    assert {json.loads(p.read_text())["meta"]["partition_id"] for p in headers} == {"0", "1"}
    out = tmp_path / "audit"
    assert main(["audit", str(caps), "--attack", "idlg", "--case", CASE, "--model", "flower_tabular.task:make_model",
                 "--out", str(out)]) == 0
    report = capsys.readouterr()
    assert "warning" not in report.err, report.err
    assert "## round 1 · case tabular/adult-fc/fedsgd" in report.out and "| client |" in report.out
    recs = records(out)
    assert len(recs) == 2 and all(r["status"] == "ok" for r in recs), [r.get("error") for r in recs]
    assert all(r["case"]["model"] == "flower_tabular.task:make_model" and r["encoding"]["source"] == "declared"
               for r in recs)
    assert all(r["case"]["protocol"]["kind"] == "fedavg" and r["shuffle"] is False for r in recs)
    assert min(r["metrics"]["accuracy"] for r in recs) > 0.8  # the federation's model leaks its rows (random: ~0.5)
    assert all(r["baseline"]["verdict"] == "leaks" for r in recs)


def test_a_model_without_a_first_linear_layer_is_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def conv():\n    return torch.nn.Sequential(torch.nn.Conv1d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(206, 2))\n"
        "def narrow():\n    return torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from eval.audit_inputs import user_tabular_model

    from eval.errors import UserError

    with pytest.raises(UserError, match="first nn.Linear layer reading the 105 encoded columns.*Conv1d"):
        user_tabular_model("mymodels:conv", dim=105, num_classes=2)
    with pytest.raises(UserError, match="with 10 inputs"):
        user_tabular_model("mymodels:narrow", dim=105, num_classes=2)
    with pytest.raises(UserError, match="cannot import"):
        user_tabular_model("nosuchmodule_xyz:f", dim=105, num_classes=2)
    m = user_tabular_model("mymodels:narrow", dim=10, num_classes=2)
    import torch

    x = torch.randn(3, 10)
    assert m.last is m[2] and torch.equal(m.penultimate(x), m[1](m[0](x)))
    assert [n for n, _ in m.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_the_missing_names_error_lists_every_name_and_the_fix():
    import torch

    from eval.audit_inputs import load_into
    from eval.errors import UserError

    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(3)])
    with pytest.raises(UserError) as e:
        load_into(model, {"w": torch.zeros(2)})
    msg = str(e.value)
    assert all(f"{i}.{k}" in msg for i in range(3) for k in ("weight", "bias")) and "named_parameters()" in msg
    big = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(10)])
    with pytest.raises(UserError, match=r"\(20 names\)"):
        load_into(big, {})


@pytest.mark.slow
def test_the_example_runs_on_flowers_simulation_engine_and_tableak_recovers_the_rows(example, tmp_path):
    """`run_simulation` (Ray backend), 2 clients x 4 rows, one FedAvg step; TabLeak on the captures."""
    run, schema = example
    caps = tmp_path / "captures"
    run.run(str(caps), str(schema), ray=True)
    assert len(list(caps.rglob("header.json"))) == 2
    out = tmp_path / "audit"
    assert main(["audit", str(caps), "--attack", "tableak", "--case", CASE, "--model",
                 "flower_tabular.task:make_model", "--out", str(out)]) == 0
    recs = records(out)
    assert all(r["status"] == "ok" and r["baseline"]["verdict"] == "leaks" for r in recs)
    assert min(r["metrics"]["accuracy"] for r in recs) > 0.8


def test_legacy_strategy_maps_fit_config_spellings_and_keys_truth_by_partition(tmp_path):
    """Legacy ``flwr.server.strategy.FedAvg``: ``learning_rate``/``epochs`` become the protocol,
    an unknown shuffle stays unknown, ``truth_for_client`` gets the reported partition id."""
    import numpy as np
    import torch

    from eval.capture import read_capture
    from eval.flower import CapturingStrategy, run_inprocess

    model = torch.nn.Linear(3, 2)
    init = [p.detach().numpy().copy() for p in model.parameters()]

    class Client(flwr.client.NumPyClient):
        def __init__(self, pid):
            self.pid = pid

        def fit(self, parameters, config):
            return [a - 0.1 for a in parameters], 5, {"partition-id": self.pid}

    asked = []

    def truth(key):
        asked.append(key)
        path = tmp_path / f"truth{key}.csv"
        path.write_text("a,b\n1,2\n")
        return str(path)

    strategy = CapturingStrategy(
        flwr.server.strategy.FedAvg(min_fit_clients=2, min_available_clients=2, fraction_evaluate=0.0,
                                    initial_parameters=flwr.common.ndarrays_to_parameters(init),
                                    on_fit_config_fn=lambda r: {"learning_rate": 0.05, "epochs": 2}),
        param_names=[n for n, _ in model.named_parameters()], capture_dir=tmp_path / "caps", truth_for_client=truth)
    run_inprocess({"node-a": Client(7), "node-b": Client(3)}, strategy, rounds=1)
    assert sorted(asked) == ["3", "7"]
    caps = {c.header["client_id"]: c for c in map(read_capture, sorted(p.parent for p in (tmp_path / "caps").rglob("header.json")))}
    c = caps["node-a"]
    assert c.header["protocol"] == {"kind": "fedavg", "batch_size": 5, "local_epochs": 2, "local_batch_size": None,
                                    "local_lr": 0.05, "loss_reduction": "mean", "shuffle": None}
    assert c.header["meta"]["partition_id"] == "7" and c.header["truth"] == "truth.csv"
    assert np.allclose(c.update["weight"].numpy(), 0.1) and set(c.before) == {"weight", "bias"}


def test_state_dict_extras_buffers_and_tied_copies_are_set_aside(tmp_path):
    """``ArrayRecord(model.state_dict())`` also carries buffers and tied copies: loaded or skipped,
    and left out of the update the attack sees."""
    import torch

    from eval.audit_inputs import load_into
    from eval.capture import read_capture, write_capture

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 3)
            self.norm = torch.nn.BatchNorm1d(3)
            self.head = torch.nn.Linear(3, 5, bias=False)
            self.head.weight = self.emb.weight  # tied: state_dict has both names

    src, dst = Tied(), Tied()
    src.norm.running_mean.fill_(0.5)
    state = {k: v.detach().clone() for k, v in src.state_dict().items()}
    assert "head.weight" in state and "head.weight" not in dict(src.named_parameters())
    d = write_capture(tmp_path, round=1, client_id="a", kind="delta", num_examples=1, before=state,
                      update={k: torch.zeros_like(v, dtype=torch.float32) for k, v in state.items()})
    cap = load_into(dst, read_capture(d))
    assert set(cap.update) == set(cap.before) == {n for n, _ in dst.named_parameters()}
    assert torch.equal(dst.emb.weight, src.emb.weight) and torch.allclose(dst.norm.running_mean, torch.full((3,), 0.5))


@pytest.mark.slow  # ~15-30 s: GPT-2 federation + DAGER; the tied-weight handling has a default unit test
def test_text_federation_on_the_message_api_is_recovered_exactly_by_dager(tmp_path, monkeypatch, capsys):
    """examples/flower_text: GPT-2's ``state_dict`` (with its tied ``lm_head.weight``) as sent by
    ``ArrayRecord``; DAGER recovers both clients' sentences (B = 2) from the captured deltas."""
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "examples" / "flower_text"))
    monkeypatch.delenv("FLOWER_TEXT_CONFIG", raising=False)
    spec = importlib.util.spec_from_file_location("flower_text_run", ROOT / "examples" / "flower_text" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    run.run(str(tmp_path / "caps"))
    out = tmp_path / "audit"
    assert main(["audit", str(tmp_path / "caps"), "--attack", "dager", "--case", "text/tiny-gpt2/dager",
                 "--out", str(out)]) == 0
    recs = records(out)
    assert len(recs) == 2 and all(r["status"] == "ok" for r in recs), [r.get("error") for r in recs]
    assert min(r["metrics"]["rouge1"] for r in recs) > 0.99
    assert all(r["case"]["protocol"]["local_lr"] == 0.0001 and r["protocol_source"] == "capture" for r in recs)
    lines = Path(recs[0]["artifacts"]["decoded"]).read_text().splitlines()
    assert len(lines) == 2 and all(line.strip() for line in lines)
