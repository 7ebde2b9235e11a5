"""ServerApp: Flower's FedAvg (Message API), wrapped so that every client update is captured."""
from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from eval.flower import CapturingStrategy

from .task import client_sentences, make_model, run_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = run_config(context)
    capture_dir = Path(str(cfg["capture-dir"]))

    def truth_for_client(partition_id: str) -> str:  # demo only: a real federation leaves this out
        path = capture_dir / "truth" / f"partition-{partition_id}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(client_sentences(int(partition_id))) + "\n")
        return str(path)

    n = int(cfg["num-partitions"])
    strategy = CapturingStrategy(FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n,
                                        min_available_nodes=n),
                                 capture_dir=capture_dir,
                                 truth_for_client=truth_for_client if cfg.get("with-truth", True) else None)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(make_model().state_dict()),
                   num_rounds=int(cfg["num-server-rounds"]),
                   train_config=ConfigRecord({"lr": float(cfg["lr"]), "local_epochs": int(cfg["local-epochs"])}))
