"""ClientApp: train locally on the client's rows with the server's lr / epochs / batch size."""
from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .task import run_config, client_rows, encode, make_model, train

app = ClientApp()


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    pid, n = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    cfg = run_config(context)
    x, y = encode(client_rows(pid, n, rows_per_client=int(cfg["rows-per-client"])), str(cfg["schema"]))
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    c = msg.content["config"]
    loss = train(model, x, y, lr=float(c["lr"]), epochs=int(c["local_epochs"]), batch_size=int(c["batch_size"]),
                 shuffle=bool(c["shuffle"]), generator=torch.Generator().manual_seed(pid))
    # "partition-id" lets the server-side capture key the client by its partition (truth_for_client)
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(x), "partition-id": pid})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)
