"""``flwr run`` (Flower 1.38's CLI) on ``examples/flower_tabular``: a local SuperLink in
simulation mode, the app submitted as a FAB, the ServerApp's wrapped Message-API strategy
capturing both clients on Flower's Ray simulation engine; then the audit recovers the rows.

Everything stays on this machine: the SuperLink listens on 127.0.0.1 (free ports picked here),
``FLWR_HOME`` is the test's folder, and the runtime dependency installation (``uv sync`` of the
app's dependencies from the package index, minutes and gigabytes) is switched off with
``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``: the apps run in this environment, with this
checkout on ``PYTHONPATH``. 2-5 min on 2 shared cores (Ray's start and the audit dominate)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

flwr = pytest.importorskip("flwr")
pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "flower_tabular"
CASE = "tabular/adult-fc/fedsgd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_flwr_run_captures_the_federation_and_the_audit_recovers_the_rows(tmp_path):
    from eval.__main__ import main

    bindir = Path(sys.executable).parent
    if not (bindir / "flwr").exists() or not (bindir / "flower-superlink").exists():
        pytest.skip("flwr / flower-superlink executables not found next to the interpreter")
    app = tmp_path / "app"
    shutil.copytree(EXAMPLE, app, ignore=shutil.ignore_patterns("__pycache__", "captures", "schema.json"))
    schema, caps = tmp_path / "schema.json", tmp_path / "captures"
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(app), os.environ.get("PYTHONPATH", "")]),
           "PATH": os.pathsep.join([str(bindir), os.environ.get("PATH", "")]), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "eval", "schema", "export", CASE], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    schema.write_text(out)
    # the local SuperLink `flwr run` would start detached, started here so the test owns (and stops) it
    (tmp_path / "flwr-home").mkdir()
    link = subprocess.Popen(
        [str(bindir / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
         "--control-api-address", f"127.0.0.1:{env['FLWR_LOCAL_CONTROL_API_PORT']}", "--host", "127.0.0.1",
         "--port", env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"], "--database", str(tmp_path / "flwr-home" / "state.db")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        import httpx

        url = f"http://127.0.0.1:{env['FLWR_LOCAL_SUPERLINK_HTTP_API_PORT']}/health"
        for _ in range(120):
            try:
                if httpx.get(url, timeout=1.0).is_success:
                    break
            except httpx.HTTPError:
                pass
            assert link.poll() is None, "flower-superlink exited"
            time.sleep(0.5)
        run = subprocess.run(
            [str(bindir / "flwr"), "run", str(app), "--stream",
             "--run-config", f"capture-dir='{caps}' schema='{schema}'",
             "--federation-config", "num-supernodes=2 init-args-num-cpus=1 client-resources-num-cpus=1"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    finally:
        link.terminate()
        try:
            link.wait(timeout=20)
        except subprocess.TimeoutExpired:
            link.kill()
    log = run.stdout + run.stderr
    assert run.returncode == 0 and "Received 2 results and 0 failures" in log, log[-3000:]
    headers = sorted(caps.rglob("header.json"))
    assert len(headers) == 2, log[-3000:]
    h = json.loads(headers[0].read_text())
    assert h["protocol"]["kind"] == "fedavg" and h["protocol"]["local_lr"] == 0.01 and h["schema"] == "schema.json"
    audit = tmp_path / "audit"
    sys.path.insert(0, str(app))
    try:
        assert main(["audit", str(caps), "--attack", "tableak", "--case", CASE, "--model",
                     "flower_tabular.task:make_model", "--out", str(audit)]) == 0
    finally:
        sys.path.remove(str(app))
    recs = [json.loads(x) for x in (audit / "records.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(r["status"] == "ok" and r["baseline"]["verdict"] == "leaks" for r in recs)
    assert min(r["metrics"]["accuracy"] for r in recs) > 0.8
