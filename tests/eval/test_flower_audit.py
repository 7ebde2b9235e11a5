"""Auditing a real Flower federation: capture client updates, recover client data from them."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

from eval.__main__ import main  # noqa: E402
from eval.capture import read_capture, write_capture  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def table(path: Path, n: int, seed: int) -> Path:
    import random

    rnd = random.Random(seed)
    rows = ["age,job,hours,city,income"] + [
        f"{rnd.randint(18, 70)},{rnd.choice(['clerk', 'farmer', 'nurse'])},{rnd.randint(10, 60)},"
        f"{rnd.choice(['x', 'y', 'z'])},{rnd.choice(['low', 'high'])}" for _ in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path


class LocalSGDClient(flwr.client.NumPyClient):
    """A Flower client running plain local SGD (lr and local_epochs from the server's fit config)."""

    def __init__(self, model, loss, n):
        self.model, self.loss, self.n = model, loss, n  # loss(model) -> scalar training loss

    def get_parameters(self, config):
        return [p.detach().numpy().copy() for p in self.model.parameters()]

    def fit(self, parameters, config):
        with torch.no_grad():
            for p, a in zip(self.model.parameters(), parameters):
                p.copy_(torch.from_numpy(a))
        opt = torch.optim.SGD(self.model.parameters(), lr=float(config["lr"]))
        for _ in range(int(config.get("local_epochs", 1))):
            opt.zero_grad()
            self.loss(self.model).backward()
            opt.step()
        return self.get_parameters({}), self.n, {}


def test_flower_federation_capture_and_audit_recovers_tabular_rows(tmp_path):
    from eval.flower import CapturingStrategy, run_inprocess
    from tableak.kit import TabularKit
    from eval.catalog import catalog
    from dataclasses import replace

    public = table(tmp_path / "public.csv", 200, 0)  # the schema source the server knows
    case = replace(catalog().cases.get("tabular/adult-fc/fedsgd"), data=str(public), options={"label": "income"})
    kit = TabularKit()
    pool = kit.load_pool(case, data_path=None)
    from common.seed import make_generator

    model = kit.load_model(case, device=torch.device("cpu"), generator=make_generator(0))
    clients, truths = {}, {}
    for cid in ("0", "1", "2"):
        rows = table(tmp_path / f"client{cid}.csv", 1, 10 + int(cid))
        df = __import__("pandas").read_csv(rows)
        import copy

        x, y = pool.schema.encode(df), pool.schema.encode_labels(df)
        clients[cid] = LocalSGDClient(copy.deepcopy(model),
                                      lambda m, x=x, y=y: torch.nn.functional.cross_entropy(m(x), y), len(x))
        truths[cid] = str(rows)
    names = [n for n, _ in model.named_parameters()]
    strategy = CapturingStrategy(
        flwr.server.strategy.FedAvg(min_fit_clients=3, min_available_clients=3, fraction_evaluate=0.0,
                                    initial_parameters=flwr.common.ndarrays_to_parameters(
                                        [p.detach().numpy() for p in model.parameters()]),
                                    on_fit_config_fn=lambda r: {"lr": 0.01, "local_epochs": 1, "batch_size": 1}),
        param_names=names, capture_dir=tmp_path / "captures", truth_for_client=truths.get)
    run_inprocess(clients, strategy, rounds=1)
    caps = sorted((tmp_path / "captures").rglob("header.json"))
    assert len(caps) == 3
    cap = read_capture(caps[0].parent)
    assert cap.header["protocol"]["local_lr"] == 0.01 and cap.header["kind"] == "delta"
    # the client's ground truth (a file elsewhere) is copied into its capture folder: captures are self-contained
    assert cap.header["truth"] == "truth.csv" and cap.truth_path == (caps[0].parent / "truth.csv").resolve()
    out = tmp_path / "audit"
    code = main(["audit", str(tmp_path / "captures"), "--attack", "idlg", "--case", "tabular/adult-fc/fedsgd",
                 "--data", str(public), "--label", "income", "--out", str(out)])
    assert code == 0
    recs = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all(r["status"] == "ok" for r in recs)
    assert np.mean([r["metrics"]["accuracy"] for r in recs]) > 0.9  # one row per client: recovered
    assert all(Path(r["artifacts"]["reconstruction"]).exists() for r in recs)


def test_audit_without_ground_truth_saves_reconstruction(tmp_path):
    from eval.catalog import catalog
    from dataclasses import replace
    from tableak.kit import TabularKit
    from common.seed import make_generator

    public = table(tmp_path / "public.csv", 100, 0)
    case = replace(catalog().cases.get("tabular/adult-fc/fedsgd"), data=str(public), options={"label": "income"})
    kit = TabularKit()
    model = kit.load_model(case, device=torch.device("cpu"), generator=make_generator(0))
    pool = kit.load_pool(case, data_path=None)
    g = {}
    x, y = pool.x[:1], pool.y[:1]
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    names = [n for n, _ in model.named_parameters()]
    # hand-written capture as another FL framework would write it (npz for the update)
    d = write_capture(tmp_path / "cap", round=1, client_id="a", kind="gradient",
                      before={n: p.detach() for n, p in model.named_parameters()},
                      update=dict(zip(names, grads)), num_examples=1)
    np.savez(d / "update.npz", **{n: t.numpy() for n, t in zip(names, grads)})
    h = json.loads((d / "header.json").read_text())
    h["update"] = "update.npz"
    (d / "header.json").write_text(json.dumps(h))
    out = tmp_path / "o"
    assert main(["audit", str(tmp_path / "cap"), "--attack", "idlg", "--case", "tabular/adult-fc/fedsgd",
                 "--data", str(public), "--label", "income", "--out", str(out)]) == 0
    rec = json.loads((out / "records.jsonl").read_text())
    assert rec["status"] == "ok" and rec["metrics"] == {} and rec["ground_truth"] is False
    assert Path(rec["artifacts"]["reconstruction"]).exists()


def test_bad_capture_is_a_user_error(tmp_path, capsys):
    d = tmp_path / "cap" / "round-0001" / "client-x"
    d.mkdir(parents=True)
    (d / "header.json").write_text('{"format": "something-else"}')
    assert main(["audit", str(tmp_path / "cap"), "--attack", "idlg", "--case", "tabular/adult-fc/fedsgd",
                 "--out", str(tmp_path / "o")]) == 2
    assert "format must be" in capsys.readouterr().err
    # a pickle disguised as npz is refused, never unpickled
    import pickle

    from eval.capture import CaptureError, _load_tensors

    bad = tmp_path / "evil.npz"
    bad.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(Exception):
        _load_tensors(bad)


def test_flower_federation_capture_and_audit_recovers_text(tmp_path):
    """Two clients fine-tune a tiny GPT-2; DAGER recovers their sentences from the captured deltas."""
    import copy

    from common.seed import make_generator
    from eval.catalog import catalog
    from eval.flower import CapturingStrategy, run_inprocess
    from textleak.kit import TextKit
    from textleak.models import info_of

    case = catalog().cases.get("text/tiny-gpt2/dager")
    kit = TextKit()
    model = kit.load_model(case, device=torch.device("cpu"), generator=make_generator(0))
    tok = info_of(model).tokenizer
    sentences = {"0": ["the movie was great fun", "a dull and tired plot"], "1": ["what a lovely little film"]}
    clients, truths = {}, {}
    for cid, texts in sentences.items():
        path = tmp_path / f"client{cid}.txt"
        path.write_text("\n".join(texts) + "\n")
        truths[cid] = str(path)
        enc = tok(texts, padding=True, return_tensors="pt")
        from common.types import Batch

        batch = Batch({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, None,
                      {"seq_lens": enc["attention_mask"].sum(1).tolist()})
        clients[cid] = LocalSGDClient(copy.deepcopy(model), lambda m, b=batch: kit.loss_fn(m, b).mean(), len(batch))
    names = [n for n, _ in model.named_parameters()]
    strategy = CapturingStrategy(
        flwr.server.strategy.FedAvg(min_fit_clients=2, min_available_clients=2, fraction_evaluate=0.0,
                                    initial_parameters=flwr.common.ndarrays_to_parameters(
                                        [p.detach().numpy() for p in model.parameters()]),
                                    on_fit_config_fn=lambda r: {"lr": 1e-4, "local_epochs": 1}),
        param_names=names, capture_dir=tmp_path / "captures", truth_for_client=truths.get)
    run_inprocess(clients, strategy, rounds=1)
    out = tmp_path / "audit"
    assert main(["audit", str(tmp_path / "captures"), "--attack", "dager", "--case", "text/tiny-gpt2/dager",
                 "--out", str(out)]) == 0
    recs = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(r["status"] == "ok" for r in recs), [r.get("error") for r in recs]
    assert min(r["metrics"]["rouge1"] for r in recs) > 0.99
