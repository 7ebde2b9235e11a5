"""End-to-end CLI tests: run, resume after a kill, errors, golden list/leaderboard output."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eval.__main__ import main
from eval.records import append_record, iter_records

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"


def tiny_csv(path: Path, n: int = 40) -> Path:
    import random

    rnd = random.Random(0)
    rows = ["age,job,hours,city,income"]
    for _ in range(n):
        rows.append(f"{rnd.randint(18, 70)},{rnd.choice(['a', 'b', 'c'])},{rnd.randint(10, 60)},"
                    f"{rnd.choice(['x', 'y'])},{rnd.choice(['low', 'high'])}")
    path.write_text("\n".join(rows) + "\n")
    return path


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "eval", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_run_end_to_end_on_user_csv(tmp_path):
    data = tiny_csv(tmp_path / "t.csv")
    out = tmp_path / "runs"
    r = cli("run", "--attack", "idlg", "--case", "tabular/adult-fc/fedsgd", "--data", data, "--label", "income",
            "--trials", 2, "--seed", 3, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    recs = list(iter_records(out / "records.jsonl"))
    assert len(recs) == 2 and all(x["status"] == "ok" for x in recs)
    rec = recs[0]
    for key in ("schema", "run_id", "code", "env", "case", "attack", "metrics", "cost", "seed", "trial", "alignment"):
        assert key in rec
    assert rec["case"]["data"] == str(data) and rec["attack"]["config"]["labels"] == "idlg"
    assert rec["metrics"]["accuracy"] > 0.9  # B = 1 on an FC net: iDLG recovers the row
    assert "| idlg |" in r.stdout
    # resume: nothing new to do, no duplicates
    r2 = cli("run", "--attack", "idlg", "--case", "tabular/adult-fc/fedsgd", "--data", data, "--label", "income",
             "--trials", 3, "--seed", 3, "--out", out, "--quiet", "--resume")
    assert r2.returncode == 0, r2.stderr
    ids = [x["run_id"] for x in iter_records(out / "records.jsonl")]
    assert len(ids) == 3 == len(set(ids))


def test_resume_after_kill(tmp_path):
    data = tiny_csv(tmp_path / "t.csv")
    out = tmp_path / "runs"
    args = [sys.executable, "-m", "eval", "run", "--attack", "inverting-gradients", "--case", "tabular/adult-fc/fedsgd",
            "--data", str(data), "--label", "income", "--trials", 6, "--set", "iterations=300", "--out", str(out),
            "--quiet"]
    args = [str(a) for a in args]
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    path = out / "records.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not path.exists() or len(list(iter_records(path))) < 1):
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    first = [x["run_id"] for x in iter_records(path)]
    assert 1 <= len(first) < 6
    # simulate a torn line from a writer killed mid-write: it must be ignored and repaired
    with open(path, "ab") as f:
        f.write(b'{"run_id": "torn')
    r = subprocess.run(args + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    ids = [x["run_id"] for x in iter_records(path)]
    assert len(ids) == 6 == len(set(ids)) and ids[: len(first)] == first
    assert all(line.endswith("}") for line in path.read_text().splitlines())


@pytest.mark.parametrize("argv,needle", [
    (["run", "--attack", "nope", "--case", "tabular/adult-fc/fedsgd", "--out", "X"], "unknown attack 'nope'"),
    (["run", "--attack", "idlg", "--case", "nope", "--out", "X"], "unknown case 'nope'"),
    (["run", "--attack", "idlg", "--case", "tabular/adult-fc/fedsgd", "--set", "bogus=1", "--out", "X"], "unknown config key 'bogus'"),
    (["run", "--attack", "idlg", "--case", "tabular/adult-fc/fedsgd", "--set", "lr=fast", "--out", "X"], "expected float"),
    (["run", "--attack", "idlg", "--case", "tabular/adult-fc/fedsgd", "--data", "/no/such.csv", "--out", "X"], "no such file"),
    (["run", "--attack", "idlg", "--case", "tabular/adult-fc/fedsgd", "--device", "tpu", "--out", "X"], "use cpu or cuda"),
    (["leaderboard", "/no/such/dir"], "no such records"),
    (["bench", "/no/such.toml", "--out", "X"], "not found"),
])
def test_user_errors_are_one_line_exit_2(argv, needle, capsys, tmp_path):
    argv = [a if a != "X" else str(tmp_path / "o") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_malformed_csv_and_bad_label(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n3\n\"unclosed,4\n")
    data = tiny_csv(tmp_path / "t.csv")
    for argv, needle in (
        (["--data", str(bad), "--label", "b"], "case 'tabular/adult-fc/fedsgd'"),
        (["--data", str(data), "--label", "zzz"], "label column 'zzz' not in"),
        (["--data", str(data), "--label", "age"], "must be binary"),
    ):
        code = main(["run", "--attack", "idlg", "--case", "tabular/adult-fc/fedsgd", *argv, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and needle in err and len(err.splitlines()) == 1, err


def test_threat_model_refusal_before_work(tmp_path, capsys):
    from dataclasses import replace

    from eval.catalog import catalog
    from eval.errors import UserError
    from eval.runner import TrialSpec, run_many
    from common.threat import Capability

    case = catalog().cases.get("tabular/adult-fc/fedsgd")
    case = replace(case, threat=case.threat.without(Capability.BATCH_SIZE))
    with pytest.raises(UserError, match="needs batch_size"):
        run_many([TrialSpec(case, "idlg")], out_dir=tmp_path)
    assert not (tmp_path / "records.jsonl").exists()


def test_failed_trial_is_recorded_not_fatal(tmp_path, monkeypatch):
    from eval.catalog import catalog
    from eval.runner import TrialSpec, run_many

    case = catalog().cases.get("tabular/adult-fc/fedsgd")
    # an attack that raises inside reconstruct -> recorded as failed, the next trial still runs
    _, ig_cls, _ = catalog().resolve("inverting-gradients")

    def boom(self, obs, model, prior, *, generator):
        raise FloatingPointError("optimiser diverged")

    monkeypatch.setattr(ig_cls, "reconstruct", boom)
    data = tiny_csv(tmp_path / "t.csv")
    from dataclasses import replace

    case = replace(case, options={"label": "income"})
    recs = run_many([TrialSpec(case, "inverting-gradients", 0, 0, {"iterations": "3"}, str(data)),
                     TrialSpec(case, "idlg", 0, 0, {"iterations": "5"}, str(data))], out_dir=tmp_path, progress=False)
    assert [r["status"] for r in recs] == ["failed", "ok"]
    assert "optimiser diverged" in recs[0]["error"] and "traceback" in recs[0]


def test_append_record_repairs_torn_tail(tmp_path):
    p = tmp_path / "records.jsonl"
    append_record(p, {"run_id": "a"})
    with open(p, "ab") as f:
        f.write(b'{"run_id": "b", "x": ')
    assert [r["run_id"] for r in iter_records(p)] == ["a"]
    append_record(p, {"run_id": "c"})
    assert [json.loads(line)["run_id"] for line in p.read_text().splitlines()] == ["a", "c"]


def test_suite_tiers_repeating_a_cell_run_each_trial_once(tmp_path):
    data = tiny_csv(tmp_path / "t.csv")
    suite = tmp_path / "tiers.toml"
    block = ('[[run]]\ncase = "tabular/adult-fc/fedsgd"\nattacks = ["idlg"]\ndata = "{d}"\noptions = {{ label = "income" }}\n'
             'trials = {n}\n')
    suite.write_text(block.format(d=data, n=1) + "\n" + block.format(d=data, n=2))
    out = tmp_path / "runs"
    r = cli("bench", suite, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    ids = [x["run_id"] for x in iter_records(out / "records.jsonl")]
    assert len(ids) == 2 == len(set(ids))
