"""Flower integration: record every client's update while a real federation runs.

``CapturingStrategy`` wraps any Flower ``Strategy``: it remembers the global parameters
sent in each round (``configure_fit``) and, when results come back (``aggregate_fit``),
writes one capture per client (``eval/capture.py`` format): the parameters before, the
delta θ_before − θ_after, the number of examples, and the hyper-parameters the server sent
in the fit config (``lr``, ``local_epochs``, ``batch_size``). Then it delegates to the
wrapped strategy, so the federation is unchanged.

``run_inprocess`` drives Flower's own ``Server`` with in-process client proxies, which is
enough for tests and small audits without Ray or network sockets.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from flwr.client import NumPyClient
from flwr.common import (Code, EvaluateIns, EvaluateRes, FitIns, FitRes, GetParametersIns, GetParametersRes,
                         GetPropertiesIns, GetPropertiesRes, ReconnectIns, DisconnectRes, Status,
                         parameters_to_ndarrays)
from flwr.server import Server
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from .capture import write_capture


class CapturingStrategy(Strategy):
    def __init__(self, strategy: Strategy, *, param_names: Sequence[str], capture_dir: str | Path,
                 loss_reduction: str = "mean", truth_for_client: Callable[[str], str | None] | None = None) -> None:
        self.inner = strategy
        self.param_names = list(param_names)
        self.capture_dir = Path(capture_dir)
        self.loss_reduction = loss_reduction
        self.truth_for_client = truth_for_client
        self._sent: dict[int, tuple[list[np.ndarray], dict[str, dict]]] = {}

    def initialize_parameters(self, client_manager):
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round, parameters, client_manager):
        pairs = self.inner.configure_fit(server_round, parameters, client_manager)
        self._sent[server_round] = (parameters_to_ndarrays(parameters), {p.cid: dict(ins.config) for p, ins in pairs})
        return pairs

    def aggregate_fit(self, server_round, results, failures):
        before, configs = self._sent.pop(server_round)
        if len(before) != len(self.param_names):
            raise ValueError(f"the model has {len(self.param_names)} named parameters but Flower sent {len(before)} arrays")
        for proxy, res in results:
            after = parameters_to_ndarrays(res.parameters)
            cfg = configs.get(proxy.cid, {})
            protocol = None
            if "lr" in cfg:
                protocol = {"kind": "fedavg", "batch_size": int(res.num_examples),
                            "local_epochs": int(cfg.get("local_epochs", 1)),
                            "local_batch_size": int(cfg["batch_size"]) if "batch_size" in cfg else None,
                            "local_lr": float(cfg["lr"]), "loss_reduction": self.loss_reduction,
                            "shuffle": bool(cfg.get("shuffle", True))}
            truth = self.truth_for_client(proxy.cid) if self.truth_for_client else None
            write_capture(self.capture_dir, round=server_round, client_id=proxy.cid, kind="delta",
                          before=dict(zip(self.param_names, before)),
                          update={n: b - a for n, b, a in zip(self.param_names, before, after)},
                          num_examples=res.num_examples, protocol=protocol, truth=truth,
                          meta={"fit_config": {k: v for k, v in cfg.items() if isinstance(v, (int, float, str, bool))}})
        return self.inner.aggregate_fit(server_round, results, failures)

    def configure_evaluate(self, server_round, parameters, client_manager):
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round, results, failures):
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round, parameters):
        return self.inner.evaluate(server_round, parameters)


class InProcessClientProxy(ClientProxy):
    """A Flower client proxy that calls a NumPyClient in this process."""

    def __init__(self, cid: str, client: NumPyClient) -> None:
        super().__init__(cid)
        self.client = client

    def get_properties(self, ins: GetPropertiesIns, timeout, group_id) -> GetPropertiesRes:
        return GetPropertiesRes(Status(Code.OK, ""), {})

    def get_parameters(self, ins: GetParametersIns, timeout, group_id) -> GetParametersRes:
        from flwr.common import ndarrays_to_parameters

        return GetParametersRes(Status(Code.OK, ""), ndarrays_to_parameters(self.client.get_parameters({})))

    def fit(self, ins: FitIns, timeout, group_id) -> FitRes:
        from flwr.common import ndarrays_to_parameters

        params, n, metrics = self.client.fit(parameters_to_ndarrays(ins.parameters), dict(ins.config))
        return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(params), n, metrics)

    def evaluate(self, ins: EvaluateIns, timeout, group_id) -> EvaluateRes:
        loss, n, metrics = self.client.evaluate(parameters_to_ndarrays(ins.parameters), dict(ins.config))
        return EvaluateRes(Status(Code.OK, ""), loss, n, metrics)

    def reconnect(self, ins: ReconnectIns, timeout, group_id) -> DisconnectRes:
        return DisconnectRes("")


def run_inprocess(clients: dict[str, NumPyClient], strategy: Strategy, *, rounds: int = 1):
    """Run Flower's ``Server`` loop with in-process clients; returns Flower's History."""
    manager = SimpleClientManager()
    for cid, client in clients.items():
        manager.register(InProcessClientProxy(cid, client))
    server = Server(client_manager=manager, strategy=strategy)
    history, _ = server.fit(num_rounds=rounds, timeout=None)
    return history
