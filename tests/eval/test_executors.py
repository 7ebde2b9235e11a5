"""Distributed suites: a process pool and a real local Ray instance (2 workers).

A plugin attack (tests/eval/plugins/crashy.py) kills its own worker mid-trial once: the
trial must be recorded as failed (never lost, never duplicated), and a rerun with
--resume must complete it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = Path(__file__).parent / "plugins"


def tiny_csv(path: Path) -> Path:
    import random

    rnd = random.Random(1)
    rows = ["age,job,hours,income"] + [f"{rnd.randint(18, 70)},{rnd.choice('abc')},{rnd.randint(10, 60)},"
                                       f"{rnd.choice(['low', 'high'])}" for _ in range(30)]
    path.write_text("\n".join(rows) + "\n")
    return path


def suite(tmp_path: Path, marker: Path, sleep_s: float = 0.0) -> Path:
    data = tiny_csv(tmp_path / "t.csv")
    s = tmp_path / "suite.toml"
    s.write_text(f'''
[[run]]
case = "tabular/adult-fc/fedsgd"
data = "{data}"
options = {{ label = "income" }}
attacks = ["idlg", "crash-once"]
trials = 2
set = {{ iterations = 20 }}
attack_set = {{ crash-once = {{ marker = "{marker}", sleep_s = {sleep_s} }} }}
''')
    return s


def bench(s: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRADLEAK_PLUGINS": "crashy", "PYTHONPATH": f"{PLUGINS}:{ROOT}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "eval", "bench", str(s), "--out", str(out), "--quiet", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]


def check_crash_then_resume(tmp_path: Path, *executor_args: str) -> None:
    marker, out = tmp_path / "crashed", tmp_path / "out"
    s = suite(tmp_path, marker)
    r = bench(s, out, *executor_args)
    assert r.returncode == 1, r.stderr  # a trial failed (its worker died): exit 1 after writing every record
    recs = records(out)
    assert len(recs) == 4 == len({x["run_id"] for x in recs})  # nothing lost, nothing duplicated
    failed = [x for x in recs if x["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["attack"]["preset"] == "crash-once"
    assert marker.exists()
    r = bench(s, out, "--resume", *executor_args)
    assert r.returncode == 0, r.stderr
    recs = records(out)
    latest = {x["run_id"]: x for x in recs}
    assert len(recs) == 5 and len(latest) == 4 and all(x["status"] == "ok" for x in latest.values())


def test_process_pool_crash_becomes_failed_record_and_resume_completes(tmp_path):
    check_crash_then_resume(tmp_path, "--executor", "process", "--workers", "2")


def test_ray_local_instance_crash_becomes_failed_record_and_resume_completes(tmp_path):
    pytest.importorskip("ray")
    check_crash_then_resume(tmp_path, "--executor", "ray", "--workers", "2")


def test_executors_agree_with_local(tmp_path):
    """Same suite, same seeds: process and local executors give identical metrics."""
    marker = tmp_path / "m"
    marker.write_text("x")  # crash-once already 'crashed': it behaves like idlg
    s = suite(tmp_path, marker)
    a, b = tmp_path / "a", tmp_path / "b"
    assert bench(s, a).returncode == 0
    assert bench(s, b, "--executor", "process", "--workers", "2").returncode == 0
    ma = {x["run_id"]: x["metrics"] for x in records(a)}
    mb = {x["run_id"]: x["metrics"] for x in records(b)}
    assert ma == mb and len(ma) == 4



def test_workers_start_with_their_thread_count_in_the_environment(monkeypatch):
    """numpy/scipy read the BLAS thread count when imported, before a worker's own code runs: the pool
    must start each worker with it already set (16 workers x 16 BLAS threads made a device run crawl)."""
    import os
    import subprocess
    import sys

    from eval.executors import thread_env

    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    probe = "import os; print(os.environ.get('OMP_NUM_THREADS'), os.environ.get('OPENBLAS_NUM_THREADS'), os.environ.get('MKL_NUM_THREADS'))"
    with thread_env(1):  # a process started here (spawn or exec) inherits the variables
        seen = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60).stdout.split()
    assert seen == ["1", "1", "1"]
    assert os.environ["OMP_NUM_THREADS"] == "7" and "OPENBLAS_NUM_THREADS" not in os.environ  # restored
