"""Bad input is refused before any work (exit 2, one line naming the problem and the fix, no
traceback); a failed trial gives exit 1; garbage record lines are skipped with a warning."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eval.__main__ import build_parser, main
from eval.records import append_record, completed_ids, iter_records, load_records

ROOT = Path(__file__).resolve().parents[2]
TAB = ["--attack", "idlg", "--case", "tabular/adult-fc/fedsgd"]


def tiny_csv(path: Path, n: int = 40, *, blanks: int = 0) -> Path:
    rows = ["age,job,hours,city,income"]
    for i in range(n):
        age = "" if i < blanks else str(18 + (7 * i) % 50)
        rows.append(f"{age},{'abc'[i % 3]},{10 + (3 * i) % 50},{'xy'[i % 2]},{['low', 'high'][(i // 2) % 2]}")
    path.write_text("\n".join(rows) + "\n")
    return path


def write_wav(path: Path, seconds: float) -> Path:
    import soundfile as sf

    t = np.arange(int(seconds * 16000)) / 16000
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), 0.3 * np.sin(2 * np.pi * 220 * t), 16000, subtype="PCM_16")
    return path


def suite(tmp: Path, body: str, data: Path | None = None) -> Path:
    ok = ('[[run]]\ncase = "tabular/adult-fc/fedsgd"\nattacks = ["idlg"]\n' +
          (f'data = "{data}"\noptions = {{ label = "income" }}\n' if data else ""))
    p = tmp / "s.toml"
    p.write_text(ok + "\n[[run]]\n" + body + "\n")  # the bad run is run 1
    return p


def check_one_line(code: int, err: str, needle: str, expected: int = 2) -> None:
    err = err.strip()
    assert code == expected, err
    assert needle in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err


@pytest.fixture
def files(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    return {"OUT": str(tmp_path / "o"), "FILE": str(f), "UNDER": str(f / "sub"), "CSV": str(tiny_csv(tmp_path / "t.csv"))}


@pytest.mark.parametrize("argv,needle", [
    # numbers out of range
    (["run", *TAB, "--batch-size", "0", "--out", "OUT"], "--batch-size 0: must be >= 1"),
    (["run", *TAB, "--batch-size", "-3", "--out", "OUT"], "--batch-size -3: must be >= 1"),
    (["run", *TAB, "--trials", "0", "--out", "OUT"], "--trials 0: must be >= 1"),
    (["run", *TAB, "--trials", "-2", "--out", "OUT"], "--trials -2: must be >= 1"),
    (["run", *TAB, "--seed", "-1", "--out", "OUT"], "--seed -1: must be >= 0"),
    (["bench", "no.toml", "--limit", "0", "--out", "OUT"], "--limit 0: must be >= 1"),
    (["bench", "no.toml", "--limit", "-1", "--out", "OUT"], "--limit -1: must be >= 1"),
    (["bench", "no.toml", "--workers", "0", "--out", "OUT"], "--workers 0: must be >= 1"),
    (["audit", "nocap", *TAB, "--seed", "-4", "--out", "OUT"], "--seed -4: must be >= 0"),
    (["run", *TAB, "--set", "iterations=-5", "--out", "OUT"], "iterations=-5 is out of range"),
    (["run", "--attack", "dager", "--case", "text/tiny-gpt2/dager", "--set", "budget_clock=foo", "--out", "OUT"],
     "budget_clock='foo': must be one of wall, cpu"),
    (["run", "--attack", "speech-ctc-tts", "--case", "speech/ctc-mel/fedsgd", "--set", "init_tts_voice=foo",
      "--out", "OUT"], "init_tts_voice 'foo': use comma-separated 'engine:name' voices"),
    # settings the case cannot serve (the attack's check_case), refused before any work instead of a failed trial
    (["run", "--attack", "speech-ctc-tts", "--case", "speech/kws-mel/fedsgd", "--out", "OUT"],
     "init_tts_voice renders a granted transcript: it needs a CTC case"),
    (["run", "--attack", "speech-lbfgs", "--case", "speech/kws-mel/fedsgd", "--set", "refine_first_layer_steps=3",
      "--out", "OUT"], "refine_first_layer_steps needs a CTC case"),
    (["run", "--attack", "speech-lbfgs", "--case", "speech/kws-mel/fedsgd", "--set", "domain=waveform",
      "--set", "output_time_blur=2", "--out", "OUT"], "output_time_blur blurs recovered features: it needs domain=features"),
    (["run", "--attack", "speech-ctc-tts-avg", "--case", "speech/ctc-mel/fedsgd", "--set", "output_time_blur=-1",
      "--out", "OUT"], "output_time_blur=-1.0 is out of range"),
    (["run", "--attack", "speech-lbfgs", "--case", "speech/kws-mel/fedsgd", "--set", "domain=waveform",
      "--set", "coarse_time_factor=4", "--set", "coarse_iterations=10", "--out", "OUT"],
     "coarse_iterations optimises a temporally downsampled residual of the features: it needs domain=features"),
    (["run", "--attack", "speech-ctc-tts-c2f", "--case", "speech/ctc-mel/fedsgd", "--set", "coarse_time_factor=0",
      "--out", "OUT"], "coarse_time_factor=0 is out of range"),
    (["run", "--attack", "speech-ctc-tts-c2f", "--case", "speech/ctc-mel/fedsgd", "--set", "search_threads=0",
      "--out", "OUT"], "search_threads=0 is out of range"),
    (["run", "--attack", "lamp-cos", "--case", "text/tiny-gpt2/fedsgd", "--set", "ghost_lowrank=2", "--out", "OUT"],
     "ghost_lowrank=2.0 is out of range"),
    (["run", "--attack", "lamp-cos", "--case", "text/tiny-gpt2/fedsgd", "--set", "lm_screen=0", "--out", "OUT"],
     "lm_screen=0.0 is out of range"),
    # an optional float given a word: the --set prefix once, then what it expects
    (["run", "--attack", "lamp-cos", "--case", "text/tiny-gpt2/fedsgd", "--set", "ghost_lowrank=foo", "--out", "OUT"],
     "error: --set ghost_lowrank='foo': expected float; or none"),
    # flags the case's kit would ignore
    (["run", *TAB, "--model", "gpt2", "--out", "OUT"], "builds its own model"),
    (["run", "--attack", "speech-li23", "--case", "speech/kws-mel/fedsgd", "--model", "x", "--out", "OUT"],
     "builds its own model"),
    (["run", *TAB, "--label", "income", "--out", "OUT"], "--label names the label column of a CSV given with --data"),
    (["audit", "nocap", *TAB, "--label", "income", "--out", "OUT"], "pass --data FILE.csv too"),
    (["run", *TAB, "--option", "bogus=1", "--out", "OUT"], "reads no option bogus"),
    (["run", "--attack", "tag", "--case", "text/tiny-gpt2/fedsgd", "--data", "CSV", "--label", "income", "--out", "OUT"],
     "reads no option label"),
    (["run", "--attack", "speech-li23", "--case", "speech/kws-mel/fedsgd", "--option", "max_tokens=3", "--out", "OUT"],
     "reads no option max_tokens"),
    # --out
    (["run", *TAB, "--out", "FILE"], "is an existing file"),
    (["run", *TAB, "--out", "UNDER"], "lies under the file"),
    (["bench", "no.toml", "--out", "FILE"], "is an existing file"),
    (["audit", "nocap", *TAB, "--out", "UNDER"], "lies under the file"),
    # report / tables / utility / bench --seed-offset
    (["report", "OUT", "-o", "OUT/r.html"], "does not exist"),
    (["tables", "--only", "no_such_table", "--out", "OUT"], "no table named no_such_table"),
    (["utility", "no.toml", "--rounds", "0", "--out", "OUT"], "--rounds and --clients must be >= 1"),
    (["bench", "no.toml", "--seed-offset", "-1", "--out", "OUT"], "--seed-offset -1"),
])
def test_refused_up_front(argv, needle, files, capsys):
    argv = [files.get(a, a) for a in argv]
    code = main(argv)
    check_one_line(code, capsys.readouterr().err, needle)
    assert not Path(files["OUT"]).exists()  # nothing ran, nothing written


def test_out_not_writable(files, capsys, monkeypatch):
    import eval.__main__ as m

    monkeypatch.setattr(m.os, "access", lambda *a, **k: False)  # the tests run as root: chmod would not bite
    check_one_line(main(["run", *TAB, "--out", files["OUT"]]), capsys.readouterr().err, "is not writable")


@pytest.mark.parametrize("body,needle", [
    ('case = "tabular/adult-fc/fedsgd"\nattacks = "idlg"', "attacks must be a non-empty list of names"),
    ('case = "tabular/adult-fc/fedsgd"\nattacks = []', "attacks must be a non-empty list of names"),
    ('case = "tabular/adult-fc/fedsgd"\nattacks = ["idlg"]\ntrials = "two"', "trials must be an integer >= 1"),
    ('case = "tabular/adult-fc/fedsgd"\nattacks = ["idlg"]\ntrials = 0', "trials must be an integer >= 1"),
    ('case = "tabular/adult-fc/fedsgd"\nattacks = ["idlg"]\nbatch_sizes = [0]', "batch_sizes must be >= 1"),
    ('case = "tabular/adult-fc/fedsgd"\nattacks = ["idlg"]\nbatch_sizes = 4', "batch_sizes must be a non-empty list"),
    ('case = "tabular/adult-fc/fedsgd"\nattacks = ["idlg"]\nseeds = ["a"]', "seeds must be a non-empty list of integers"),
    ('case = "tabular/adult-fc/fedsgd"\nattacks = ["idlg"]\nseeds = [1.5]', "seeds must be a non-empty list of integers"),
    ('case = "tabular/adult-fc/fedsgd"\nattacks = ["idlg"]\nseeds = [-1]', "seeds must be >= 0"),
    ('case = "tabular/adult-fc/fedsgd"\nattacks = ["idlg"]\ndefenses = [[{name = "nope"}]]', "unknown defense 'nope'"),
    ('case = "tabular/adult-fc/fedsgd"\nattacks = ["idlg"]\ndefenses = [[{name = "gaussian", sigma = -1.0}]]',
     "sigma must be >= 0"),
    ('case = "tabular/adult-fc/fedsgd"\nattacks = ["idlg"]\ndefenses = [[{name = "gaussian", sgma = 1.0}]]',
     "bad parameters for defense 'gaussian'"),
    ('case = "tabular/adult-fc/fedsgd"\nattacks = ["idlg"]\ndefenses = [{name = "gaussian", sigma = 1.0}]',
     "defenses must be a list of defense stacks"),
    ('case = "tabular/adult-fc/fedsgd"\nattacks = ["idlg"]\nset = { iterations = { a = 1 } }',
     "set.iterations must be a number, string, boolean or list"),
    ('case = "tabular/adult-fc/fedsgd"\nattacks = ["idlg"]\nset = 3', "set must be a table"),
    ('case = "tabular/adult-fc/fedsgd"\nattacks = ["idlg"]\nattack_set = { dlg = { iterations = 3 } }',
     "attack_set names ['dlg'], which are not in attacks"),
    ('case = "tabular/adult-fc/fedsgd"\nattacks = ["idlg"]\noptions = { bogus = 1 }', "reads no option bogus"),
    ('case = "tabular/adult-fc/fedsgd"\nattacks = ["idlg"]\nmodel = "gpt2"', "builds its own model"),
    ('case = 3\nattacks = ["idlg"]', "case must be a string"),
    ('case = "tabular/adult-fc/fedsgd"\nattacks = ["idlg"]\nset = { iterations = -5 }',
     "iterations=-5 is out of range"),
])
def test_suite_refused_with_file_and_run_index(body, needle, tmp_path, capsys):
    s = suite(tmp_path, body, tiny_csv(tmp_path / "t.csv"))
    code = main(["bench", str(s), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    check_one_line(code, err, needle)
    if "out of range" not in needle:  # attack configs are resolved by the runner, without the file name
        assert f"suite file {s}, run 1" in err
    assert not (tmp_path / "o").exists()


# -- data files --------------------------------------------------------------------------------
def _tab(tmp_path, text: str | bytes, *extra: str) -> list[str]:
    p = tmp_path / "d.csv"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return ["run", *TAB, "--data", str(p), "--label", "income", *extra, "--out", str(tmp_path / "o")]


@pytest.mark.parametrize("content,extra,needle", [
    ("age,job,income\n30,a,low\n", (), "only 1 row"),
    ("age,job,income\n", (), "only 0 rows"),
    ("age,job,income\n,a,low\n31,,high\n32,,low\n40,,high\n,b,high\n", (), "every row of d.csv has an empty cell"),
    ("age,job,income\n30,caf\xe9,low\n40,b,high\n".encode("latin-1"), (), "save it as UTF-8"),
    ("age,name,income\n" + "".join(f"{20 + i},n{i},{'low' if i % 2 else 'high'}\n" for i in range(70)), (),
     "has 70 categories (> 64): drop it with --option drop=name"),
    ("age,name,income\n30,a,low\n40,b,high\n", ("--option", "drop=zzz"), "--option drop: no column 'zzz'"),
])
def test_tabular_data_refused(content, extra, needle, tmp_path, capsys):
    check_one_line(main(_tab(tmp_path, content, *extra)), capsys.readouterr().err, needle)


def test_tabular_drop_option_and_dropped_rows_warning(tmp_path, capsys):
    from tableak.data import read_csv_table

    rows = "age,name,hours,income\n" + "".join(f"{20 + i},n{i},{i % 7},{'low' if i % 2 else 'high'}\n"
                                              for i in range(70))
    p = tmp_path / "d.csv"
    p.write_text(rows)
    df, schema = read_csv_table(p, label="income", drop=["name"])
    assert [f.name for f in schema.features] == ["age", "hours"] and len(df) == 70
    capsys.readouterr()
    df, _ = read_csv_table(tiny_csv(tmp_path / "b.csv", blanks=3), label="income")
    err = capsys.readouterr().err.strip()
    assert len(df) == 37 and err == "warning: b.csv: dropped 3 of 40 rows with empty cells (37 rows left)"


def test_text_file_without_usable_sentence_is_exit_2(tmp_path, capsys):
    p = tmp_path / "long.txt"
    p.write_text(" ".join(["word"] * 5000) + "\n")
    code = main(["run", "--attack", "tag", "--case", "text/tiny-gpt2/fedsgd", "--data", str(p),
                 "--out", str(tmp_path / "o")])
    check_one_line(code, capsys.readouterr().err, "max_tokens=32")
    assert not (tmp_path / "o").exists()


def test_uncached_hub_model_says_so(tmp_path, capsys):
    code = main(["run", "--attack", "tag", "--case", "text/tiny-gpt2/fedsgd", "--model", "nobody/not-cached-model-x",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    check_one_line(code, err, "nor in the local Hugging Face cache")
    assert "--model DIR" in err and "couldn't connect" not in err.lower()


def test_ctc_clip_longer_than_window_is_refused(tmp_path, capsys):
    d = tmp_path / "wavs"
    write_wav(d / "a.wav", 6.0)
    (d / "a.txt").write_text("a long transcript")
    code = main(["run", "--attack", "speech-li23", "--case", "speech/ctc-mel/fedsgd", "--data", str(d),
                 "--out", str(tmp_path / "o")])
    check_one_line(code, capsys.readouterr().err, "longer than the case's 4 s window")


def test_keyword_clip_longer_than_window_is_reported(tmp_path):
    from speechleak.data import check_clip_lengths

    write_wav(tmp_path / "yes" / "a.wav", 0.5)
    write_wav(tmp_path / "no" / "b.wav", 2.5)
    msg = check_clip_lengths(tmp_path, seconds=1.0, task="kws")
    assert msg.startswith("1 of 2 clips are longer than the case's 1 s window and are centre-cropped") and "b.wav" in msg
    assert check_clip_lengths(tmp_path, seconds=3.0, task="ctc") is None


# -- records -----------------------------------------------------------------------------------
def _rec(i, status="ok"):
    case = {"name": "tabular/toy", "modality": "tabular", "model": "fc", "data": "toy",
            "protocol": {"kind": "fedsgd", "batch_size": 1, "local_epochs": 1, "local_batch_size": None,
                         "local_lr": 0.01, "shuffle": True, "loss_reduction": "mean"},
            "threat": {"name": "hbc", "grants": ["batch_size", "gradients"]}, "defenses": [], "options": {}}
    return {"schema": 1, "run_id": f"id-{i}", "created": "2026-01-01T00:00:00Z", "case": case,
            "attack": {"name": "idlg", "preset": "idlg", "config": {}}, "seed": 0, "trial": i, "status": status,
            "metrics": {"accuracy": 0.5} if status == "ok" else {}, "cost": {"wall_s": 1.0}}


def test_garbage_line_is_skipped_with_one_warning(tmp_path, capsys):
    p = tmp_path / "records.jsonl"
    append_record(p, _rec(0))
    with open(p, "ab") as f:
        f.write(b"this is not json\n[1, 2]\n\xff\xfe\n")
    append_record(p, _rec(1))
    assert [r["run_id"] for r in iter_records(p)] == ["id-0", "id-1"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {p}:{n}: not a JSON run record, skipped" for n in (2, 3, 4)]
    assert completed_ids(p) == {"id-0", "id-1"} and len(load_records([tmp_path])) == 2
    capsys.readouterr()
    assert main(["leaderboard", str(tmp_path), "-o", str(tmp_path / "new" / "dir" / "lb.md")]) == 0
    assert "| idlg |" in (tmp_path / "new" / "dir" / "lb.md").read_text()


PLUGIN = '''
from common.baselines import IDLG

class AlwaysFails(IDLG):
    info = IDLG.info.__class__("always-fails", "continuous", IDLG.info.requires, "test plugin", prior="continuous")

    def reconstruct(self, obs, model, prior, *, generator):
        raise RuntimeError("this attack always fails")

ATTACKS = {"always-fails": "failplug:AlwaysFails"}
'''


def test_exit_1_when_a_trial_failed_and_resume_over_a_garbage_line(tmp_path):
    (tmp_path / "failplug.py").write_text(PLUGIN)
    data = tiny_csv(tmp_path / "t.csv")
    s = tmp_path / "s.toml"
    s.write_text(f'[[run]]\ncase = "tabular/adult-fc/fedsgd"\nattacks = ["idlg", "always-fails"]\ndata = "{data}"\n'
                 f'options = {{ label = "income" }}\nset = {{ iterations = 5 }}\n')
    out = tmp_path / "o"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADLEAK_PLUGINS": "failplug",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}

    def bench(*extra):
        return subprocess.run([sys.executable, "-m", "eval", "bench", str(s), "--out", str(out), "--quiet", *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)

    r = bench()
    assert r.returncode == 1, r.stderr
    assert "error: 1 of 2 trials failed" in r.stderr and "Traceback" not in r.stderr
    path = out / "records.jsonl"
    assert sorted(x["status"] for x in iter_records(path)) == ["failed", "ok"]
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{garbage", *lines[1:]]) + "\n")
    r = bench("--resume")  # the failed trial is re-run (and fails again); the ok one is kept
    assert r.returncode == 1, r.stderr
    assert f"warning: {path}:2: not a JSON run record, skipped" in r.stderr and "Traceback" not in r.stderr
    assert sorted(x["status"] for x in iter_records(path)) == ["failed", "failed", "ok"]


# -- help --------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["run", "bench", "leaderboard", "audit"])
def test_every_option_states_its_default(command):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if action.dest == "help":
            continue
        text = (action.help or "") % {"default": action.default, "prog": "p"}
        assert "default" in text or "required" in text, (command, action.option_strings or action.dest, text)
