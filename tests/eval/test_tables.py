"""Published tables: built only from clean evaluation-seed records of one commit, and the committed
docs/tables match what the generator produces."""
from __future__ import annotations

from pathlib import Path

from eval.__main__ import main
from eval.tables import (EVAL_SEED_MIN, SPEC_FILE, TableSpec, build, load_specs, pivot, policy_problems, problems_of,
                         render)


def _rec(seed: int, *, dirty=False, git="abc123", acc=0.5, trial=0) -> dict:
    return {"run_id": f"sha256:{seed}-{trial}-{git}", "status": "ok", "seed": seed, "trial": trial,
            "created": "2026-11-26T00:00:00Z", "code": {"git": git, "dirty": dirty},
            "case": {"name": "tabular/adult-fc/fedsgd-labels", "modality": "tabular", "data": "adult",
                     "model": "fc", "options": {}, "defenses": [],
                     "protocol": {"kind": "fedsgd", "batch_size": 8, "local_epochs": 1, "local_batch_size": None,
                                  "local_lr": 0.01, "loss_reduction": "mean", "shuffle": True},
                     "threat": {"name": "hbc+labels", "grants": ["gradients", "labels"]}},
            "attack": {"preset": "tableak", "name": "tableak", "config": {}}, "metrics": {"accuracy": acc},
            "cost": {"wall_s": 1.0}}


def test_policy_refuses_development_seeds_dirty_code_and_mixed_commits():
    good = [_rec(EVAL_SEED_MIN + i) for i in range(3)]
    assert policy_problems(good) == []
    assert "development seeds" in policy_problems(good + [_rec(7)])[0]
    assert any("dirty" in p for p in policy_problems(good + [_rec(1005, dirty=True)]))
    assert any("dirty" in p for p in policy_problems([{**_rec(1001), "code": {"git": "abc123"}}]))
    assert any("2 commits" in p for p in policy_problems(good + [_rec(1009, git="def456")]))
    assert policy_problems([]) == ["no records"]


def test_render_is_a_pure_function_of_records_with_intervals():
    recs = [_rec(1000 + i, acc=a) for i, a in enumerate((0.5, 0.7, 0.9))]
    spec = TableSpec("t", "eval/suites/x.toml", "results/x", "Title (labels granted)", "accuracy")
    md = render(spec, recs)
    assert md == render(spec, list(reversed(recs)))
    assert md.startswith("# Title (labels granted)") and "seeds 1000..1002" in md and "3 trials" in md
    assert "0.700 ± 0.497" in md  # mean ± t(0.975, 2) * s / sqrt(3)


def test_a_joined_table_checks_each_folder_on_its_own_and_names_every_commit(tmp_path):
    import json

    def write(folder: str, recs: list[dict]) -> None:
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))

    write("results/a", [_rec(1000 + i, git="aaa111", acc=0.9) for i in range(3)])
    ig = [{**_rec(1000 + i, git="bbb222", acc=0.6), "attack": {"preset": "tableak-ig", "name": "tableak", "config": {}}}
          for i in range(3)]
    write("results/b", ig)
    spec = TableSpec("j", "eval/suites/x.toml", ("results/a", "results/b"), "Joined", "accuracy")
    recs, problems = problems_of(spec, tmp_path)
    assert problems == [] and len(recs) == 6
    md, _ = build(spec, tmp_path)
    assert "`results/a`, `results/b`" in md and "commits `aaa111`, `bbb222`" in md
    assert "tableak-ig" in md and "0.600" in md and "0.900" in md
    out = pivot(spec, recs)
    assert "clean commits `aaa111`, `bbb222`" in out and "| tableak-ig | 0.600" in out
    # a folder mixing commits is refused, and the message names the folder
    write("results/c", [_rec(1001, git="ccc333"), _rec(1002, git="ddd444")])
    _, problems = problems_of(TableSpec("k", "x", ("results/a", "results/c"), "K"), tmp_path)
    assert len(problems) == 1 and problems[0].startswith("results/c: records from 2 commits")
    # a single folder that mixes commits is still refused as before
    _, problems = problems_of(TableSpec("m", "x", "results/c", "M"), tmp_path)
    assert problems and "2 commits" in problems[0] and not problems[0].startswith("results/c")


def test_tables_toml_results_must_be_a_folder_or_a_list_of_folders(tmp_path):
    import pytest

    from eval.errors import UserError

    spec = tmp_path / "t.toml"
    spec.write_text('[[table]]\nname = "j"\nsuite = "s"\nresults = ["results/a", "results/b"]\ntitle = "T"\n')
    assert load_specs(spec)[0].sources == ("results/a", "results/b")
    spec.write_text('[[table]]\nname = "j"\nsuite = "s"\nresults = []\ntitle = "T"\n')
    with pytest.raises(UserError, match="results must be a folder"):
        load_specs(spec)


def test_every_declared_table_has_a_suite_and_the_committed_tables_are_current(capsys):
    root = Path(SPEC_FILE).parent.parent
    specs = load_specs()
    assert len({s.name for s in specs}) == len(specs)
    for s in specs:
        assert (root / s.suite).is_file(), s.suite
        assert all(r.startswith("results/") for r in s.sources), s.results
    assert main(["tables", "--check"]) == 0, capsys.readouterr().out


def test_bench_seed_offset_runs_the_suite_on_evaluation_seeds(tmp_path):
    import json

    suite = tmp_path / "s.toml"
    suite.write_text('[[run]]\ncase = "tabular/adult-fc/fedsgd-labels"\nattacks = ["tableak-random"]\n'
                     'batch_sizes = [2]\nseeds = [0, 3]\n')
    out = tmp_path / "out"
    assert main(["bench", str(suite), "--out", str(out), "--seed-offset", "1000", "--quiet"]) == 0
    seeds = sorted(json.loads(ln)["seed"] for ln in (out / "records.jsonl").read_text().splitlines())
    assert seeds == [1000, 1003]
    assert main(["bench", str(suite), "--out", str(tmp_path / "o2"), "--seed-offset", "-5"]) == 2
