"""Run the federation in this process, without `flwr run` (python run.py [--ray]).

Default: Flower's ServerApp/ClientApp with ``eval.flower.InProcessGrid`` (no Ray). ``--ray``:
Flower's simulation engine (``flwr.simulation.run_simulation``, Ray backend)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def config(capture_dir: str, schema: str, **over) -> dict:
    import tomllib

    cfg = tomllib.loads((HERE / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return {**cfg, "capture-dir": capture_dir, "schema": schema, **over}


def run(capture_dir: str, schema: str, *, ray: bool = False, **over) -> None:
    sys.path[:0] = [str(HERE), str(HERE.parents[1])]  # the example's package and this checkout of gradleak
    from flwr.app import Context, RecordDict

    from flower_tabular.client_app import app as client_app
    from flower_tabular.server_app import app as server_app
    from flower_tabular.task import CONFIG_ENV

    cfg = config(capture_dir, schema, **over)
    n = int(cfg["num-partitions"])
    os.environ[CONFIG_ENV] = json.dumps(cfg)  # read by flower_tabular.task.run_config in every app
    if ray:  # Ray's workers import the apps: they need the same paths
        os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")])
        from flwr.simulation import run_simulation

        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": 1, "include_dashboard": False}})
        return
    from eval.flower import InProcessGrid

    grid = InProcessGrid(client_app, n, run_config=cfg)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--capture-dir", default="captures")
    ap.add_argument("--schema", default="schema.json")
    ap.add_argument("--ray", action="store_true")
    a = ap.parse_args()
    run(str(Path(a.capture_dir).resolve()), str(Path(a.schema).resolve()), ray=a.ray)
