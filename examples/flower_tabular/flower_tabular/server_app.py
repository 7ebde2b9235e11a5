"""ServerApp: Flower's FedAvg (Message API), wrapped so that every client update is captured."""
from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from eval.flower import CapturingStrategy

from .task import run_config, client_rows, make_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = run_config(context)
    n, rows = int(cfg["num-partitions"]), int(cfg["rows-per-client"])
    capture_dir = Path(str(cfg["capture-dir"]))

    def truth_for_client(partition_id: str) -> str:
        """Ground truth for scoring the audit (a test federation knows its clients' rows; a real
        one passes truth_for_client=None and the audit writes the decoded reconstruction)."""
        path = capture_dir / "truth" / f"partition-{partition_id}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        client_rows(int(partition_id), n, rows_per_client=rows).to_csv(path, index=False)
        return str(path)

    strategy = CapturingStrategy(
        FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n),
        capture_dir=capture_dir, schema=str(cfg["schema"]),
        truth_for_client=truth_for_client if cfg.get("with-truth", True) else None)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(make_model().state_dict()),
                   num_rounds=int(cfg["num-server-rounds"]),
                   train_config=ConfigRecord({"lr": float(cfg["lr"]), "local_epochs": int(cfg["local-epochs"]),
                                              "batch_size": int(cfg["batch-size"]), "shuffle": bool(cfg["shuffle"])}))
