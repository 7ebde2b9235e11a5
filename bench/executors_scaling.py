"""Benchmark: wall time of one suite with 1 versus 2 workers (process or ray executor).

    .venv/bin/python bench/executors_scaling.py [--executor process|ray] [--trials 8]

Runs the same suite (Inverting Gradients on UCI Adult, FC [100,100,2]) twice into fresh
directories and prints the speed-up ratio 1-worker time / 2-worker time.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--executor", default="process", choices=["process", "ray"])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=400)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        suite = Path(tmp) / "suite.toml"
        suite.write_text(f'[[run]]\ncase = "tabular/adult-fc/fedsgd-labels"\nattacks = ["inverting-gradients"]\n'
                         f'batch_sizes = [8]\ntrials = {args.trials}\nset = {{ iterations = {args.iterations} }}\n')
        times = {}
        for workers in (1, 2):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "eval", "bench", str(suite), "--out", f"{tmp}/w{workers}", "--quiet",
                            "--executor", args.executor, "--workers", str(workers)], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL)
            times[workers] = time.perf_counter() - t
    print(f"{args.executor} executor, {args.trials} trials: 1 worker {times[1]:.1f} s, 2 workers {times[2]:.1f} s, "
          f"speed-up {times[1] / times[2]:.2f}x")


if __name__ == "__main__":
    main()
