"""Flower integration: record every client's update while a real federation runs.

``CapturingStrategy(strategy, capture_dir=...)`` wraps a Flower strategy and writes one
capture per client and round (``eval/capture.py`` format): the parameters the client
received, the delta θ_before − θ_after, the number of examples, and the protocol read from
the fit/train config in any common spelling (``lr``/``learning_rate``, ``epochs``/
``local_epochs``, ``batch_size``/``local_batch_size``, ``shuffle``; see
``capture.protocol_from_config``). When the learning rate or the epochs are missing the
protocol is written as unknown and the audit asks for ``--protocol``. The wrapped strategy
then aggregates as before: the federation is unchanged.

Both Flower APIs are supported, by the same name:

* **Message API** (Flower >= 1.21, ``flwr.serverapp.strategy.FedAvg`` ..., ``flwr run``):
  the wrapper intercepts ``configure_train``/``aggregate_train``; ``strategy.start(grid=...)``
  runs as usual. Parameter names are the ``ArrayRecord`` keys (``ArrayRecord(model.state_dict())``
  keys them by ``named_parameters()`` name); ``param_names`` is needed only for records built
  from a plain list of arrays.
* **legacy** ``flwr.server.strategy.*`` (``start_server``/``Server``): ``configure_fit`` /
  ``aggregate_fit``; ``param_names`` (the model's ``named_parameters()`` names, in order) is
  required since Flower sends bare arrays.

Options: ``schema`` (a tabular schema JSON, ``python -m eval schema export``) is copied into
every capture so the audit knows the encoding; ``truth_for_client(key) -> path | None`` gives
a client's ground truth (its rows, for scoring), copied into the capture; ``key`` is the
client's *partition id* when the client reports it (metric ``partition-id`` in its reply, as
the example does from ``context.node_config``), else Flower's node id / cid.
``loss_reduction`` is the clients' loss reduction (``mean`` unless they sum).

``run_inprocess`` (legacy) and ``InProcessGrid`` (Message API) drive real Flower server loops
with in-process clients, enough for tests and small audits without Ray or sockets.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from flwr.client import NumPyClient
from flwr.common import (Code, EvaluateIns, EvaluateRes, FitIns, FitRes, GetParametersIns, GetParametersRes,
                         GetPropertiesIns, GetPropertiesRes, ReconnectIns, DisconnectRes, Status,
                         parameters_to_ndarrays)
from flwr.server import Server
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from .capture import protocol_from_config, write_capture

try:  # the Message API (Flower >= 1.21)
    from flwr.serverapp import Grid as _Grid
    from flwr.serverapp.strategy import Strategy as _MessageStrategy
except ImportError:  # pragma: no cover - older Flower: legacy API only
    _Grid = _MessageStrategy = object

PARTITION_KEYS = ("partition-id", "partition_id")


def _scalars(cfg) -> dict:
    return {k: v for k, v in dict(cfg).items() if isinstance(v, (int, float, str, bool))}


class _Writer:
    """What both APIs share: one capture per client reply."""

    def __init__(self, *, capture_dir: str | Path, loss_reduction: str, truth_for_client, schema) -> None:
        self.capture_dir = Path(capture_dir)
        self.loss_reduction = loss_reduction
        self.truth_for_client = truth_for_client
        self.schema = str(schema) if schema is not None else None
        if self.schema is not None and not Path(self.schema).is_file():
            raise FileNotFoundError(f"schema file {self.schema!r} does not exist "
                                    f"(python -m eval schema export CASE > schema.json)")

    def write(self, *, server_round: int, client_id: str, names: Sequence[str], before: Sequence[np.ndarray],
              after: Sequence[np.ndarray], num_examples: int, config: dict, metrics: dict) -> Path:
        if len(after) != len(before):
            raise ValueError(f"client {client_id} returned {len(after)} arrays for {len(before)} sent")
        protocol, missing = protocol_from_config(config, num_examples=int(num_examples),
                                                 loss_reduction=self.loss_reduction)
        partition = next((metrics[k] for k in PARTITION_KEYS if k in metrics), None)
        key = str(int(partition)) if isinstance(partition, (int, float)) else client_id
        truth = self.truth_for_client(key) if self.truth_for_client else None
        meta = {"fit_config": _scalars(config), "partition_id": key if partition is not None else None}
        if missing:
            meta["protocol_missing"] = missing
        return write_capture(self.capture_dir, round=server_round, client_id=client_id, kind="delta",
                             before=dict(zip(names, before)),
                             update={n: np.asarray(b) - np.asarray(a) for n, b, a in zip(names, before, after)},
                             num_examples=int(num_examples), protocol=protocol, truth=truth, schema=self.schema,
                             meta=meta)


class CapturingStrategy(Strategy):
    """Wrap a Flower strategy (legacy or Message API) and capture every client update."""

    def __new__(cls, strategy=None, *args, **kwargs):
        if cls is CapturingStrategy and _is_message_strategy(strategy):
            return MessageCapturingStrategy(strategy, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, strategy: Strategy, *, param_names: Sequence[str], capture_dir: str | Path,
                 loss_reduction: str = "mean", truth_for_client: Callable[[str], str | None] | None = None,
                 schema: str | Path | None = None) -> None:
        self.inner = strategy
        self.param_names = list(param_names)
        self.writer = _Writer(capture_dir=capture_dir, loss_reduction=loss_reduction,
                              truth_for_client=truth_for_client, schema=schema)
        self._sent: dict[int, tuple[list[np.ndarray], dict[str, dict]]] = {}

    @property
    def capture_dir(self) -> Path:
        return self.writer.capture_dir

    def initialize_parameters(self, client_manager):
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round, parameters, client_manager):
        pairs = self.inner.configure_fit(server_round, parameters, client_manager)
        self._sent[server_round] = (parameters_to_ndarrays(parameters), {p.cid: dict(ins.config) for p, ins in pairs})
        return pairs

    def aggregate_fit(self, server_round, results, failures):
        before, configs = self._sent.pop(server_round)
        if len(before) != len(self.param_names):
            raise ValueError(f"param_names has {len(self.param_names)} names but Flower sent {len(before)} arrays: "
                             f"pass [n for n, _ in model.named_parameters()] of the model the federation trains")
        for proxy, res in results:
            self.writer.write(server_round=server_round, client_id=proxy.cid, names=self.param_names, before=before,
                              after=parameters_to_ndarrays(res.parameters), num_examples=res.num_examples,
                              config=configs.get(proxy.cid, {}), metrics=dict(res.metrics or {}))
        return self.inner.aggregate_fit(server_round, results, failures)

    def configure_evaluate(self, server_round, parameters, client_manager):
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round, results, failures):
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round, parameters):
        return self.inner.evaluate(server_round, parameters)


# -- Message API (flwr.serverapp.strategy) --------------------------------------------------------
def _is_message_strategy(strategy) -> bool:
    return _MessageStrategy is not object and isinstance(strategy, _MessageStrategy)


def _record(content, kind: type, key: str | None):
    """The record of type ``kind`` in a message's content (``key`` first, else the only one)."""
    if key is not None and key in content and isinstance(content[key], kind):
        return content[key]
    found = [v for v in content.values() if isinstance(v, kind)]
    return found[0] if found else None


class MessageCapturingStrategy(_MessageStrategy):
    """``CapturingStrategy`` for the Message API: wraps ``configure_train``/``aggregate_train``;
    ``start`` is Flower's own (inherited), so the round loop is unchanged."""

    def __init__(self, strategy, *, capture_dir: str | Path, param_names: Sequence[str] | None = None,
                 loss_reduction: str = "mean", truth_for_client: Callable[[str], str | None] | None = None,
                 schema: str | Path | None = None) -> None:
        self.inner = strategy
        self.param_names = list(param_names) if param_names is not None else None
        self.writer = _Writer(capture_dir=capture_dir, loss_reduction=loss_reduction,
                              truth_for_client=truth_for_client, schema=schema)
        self._sent: dict[int, dict] = {}

    def __getattr__(self, name):  # the wrapped strategy's settings (fraction_train, ...)
        if name in ("inner", "writer", "_sent", "param_names"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def capture_dir(self) -> Path:
        return self.writer.capture_dir

    def _names(self, arrays) -> list[str]:
        keys = list(arrays.keys())
        if self.param_names is None:
            return keys
        if len(self.param_names) != len(keys):
            raise ValueError(f"param_names has {len(self.param_names)} names but the ArrayRecord holds "
                             f"{len(keys)} arrays")
        return self.param_names

    def configure_train(self, server_round, arrays, config, grid):
        from flwr.app import ArrayRecord, ConfigRecord

        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        sent = {}
        for m in messages:
            a = _record(m.content, ArrayRecord, getattr(self.inner, "arrayrecord_key", None)) or arrays
            c = _record(m.content, ConfigRecord, getattr(self.inner, "configrecord_key", None)) or config
            sent[m.metadata.dst_node_id] = (self._names(a), list(a.to_numpy_ndarrays()), dict(c))
        self._sent[server_round] = sent
        return messages

    def aggregate_train(self, server_round, replies: Iterable):
        from flwr.app import ArrayRecord, MetricRecord

        replies = list(replies)  # may be a generator: read once here, then handed on
        sent = self._sent.pop(server_round, {})
        weight_key = getattr(self.inner, "weighted_by_key", "num-examples")
        for r in replies:
            node = r.metadata.src_node_id
            if r.has_error() or node not in sent:
                continue
            names, before, config = sent[node]
            a = _record(r.content, ArrayRecord, getattr(self.inner, "arrayrecord_key", None))
            metrics = _record(r.content, MetricRecord, None)
            metrics = dict(metrics) if metrics is not None else {}
            if a is None or weight_key not in metrics:
                continue
            self.writer.write(server_round=server_round, client_id=str(node), names=names, before=before,
                              after=list(a.to_numpy_ndarrays()), num_examples=int(metrics[weight_key]),
                              config=config, metrics=metrics)
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()


class InProcessGrid(_Grid):
    """A Flower ``Grid`` that runs a ``ClientApp`` in this process for ``num_nodes`` nodes
    (node ``i`` has ``node_config`` ``{"partition-id": i, "num-partitions": n}``, as Flower's
    simulation gives it): ``strategy.start(grid=InProcessGrid(app, 2), ...)`` without Ray."""

    def __init__(self, client_app, num_nodes: int, *, run_config: dict | None = None) -> None:
        from flwr.app import Context, RecordDict
        from flwr.supercore.run import Run

        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        self.client_app = client_app
        self._run = Run.create_empty(run_id=1)
        # the identity Flower's runtime gives a ServerApp process (as flwr's legacy start_grid does)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
        self._nodes = {1000 + i: Context(run_id=1, node_id=1000 + i,
                                         node_config={"partition-id": i, "num-partitions": num_nodes},
                                         state=RecordDict(), run_config=dict(run_config or {}))
                       for i in range(num_nodes)}
        self._replies: dict[str, object] = {}

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        from flwr.app import Message

        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self._nodes)

    def push_messages(self, messages):
        from uuid import uuid4

        ids = []
        for m in messages:
            mid = str(uuid4())
            m.metadata.__dict__["_message_id"] = mid
            m.metadata.__dict__["_run_id"] = self._run.run_id
            self._replies[mid] = self.client_app(m, self._nodes[m.metadata.dst_node_id])
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


# -- legacy in-process driver ---------------------------------------------------------------------
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
    """Run Flower's legacy ``Server`` loop with in-process clients (the dict keys are the cids);
    returns Flower's History."""
    manager = SimpleClientManager()
    for cid, client in clients.items():
        manager.register(InProcessClientProxy(cid, client))
    server = Server(client_manager=manager, strategy=strategy)
    history, _ = server.fit(num_rounds=rounds, timeout=None)
    return history
