"""Run the text federation in this process: python run.py [--capture-dir DIR] (no Ray)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(capture_dir: str, **over) -> None:
    sys.path[:0] = [str(HERE), str(HERE.parents[1])]  # the example's package and this checkout of gradleak
    from flwr.app import Context, RecordDict

    from eval.flower import InProcessGrid
    from flower_text.client_app import app as client_app
    from flower_text.server_app import app as server_app
    from flower_text.task import CONFIG_ENV, run_config

    os.environ[CONFIG_ENV] = json.dumps({"capture-dir": capture_dir, **over})
    cfg = run_config(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    grid = InProcessGrid(client_app, int(cfg["num-partitions"]), run_config=cfg)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--capture-dir", default="captures")
    a = ap.parse_args()
    run(str(Path(a.capture_dir).resolve()))
