"""ClientApp: fine-tune on the client's sentences with the server's lr / epochs."""
from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .task import client_sentences, make_model, run_config, train

app = ClientApp()


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    run_config(context)
    texts = client_sentences(pid)
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    c = msg.content["config"]
    loss = train(model, texts, lr=float(c["lr"]), epochs=int(c["local_epochs"]))
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(texts), "partition-id": pid})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)
