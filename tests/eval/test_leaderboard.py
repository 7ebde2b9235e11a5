"""Leaderboards are pure functions of records: golden Markdown/CSV, no cross-setting ranking."""
import json
import os
from pathlib import Path

import pytest

from eval.__main__ import main
from eval.leaderboard import aggregate, render_csv, render_html, render_markdown, summarize
from eval.records import append_record

GOLDEN = Path(__file__).parent / "golden"


def case(b, defenses=()):
    return {"name": "tabular/toy", "modality": "tabular", "model": "fc", "data": "toy",
            "protocol": {"kind": "fedsgd", "batch_size": b, "local_epochs": 1, "local_batch_size": None,
                         "local_lr": 0.01, "shuffle": True, "loss_reduction": "mean"},
            "threat": {"name": "hbc", "grants": ["batch_size", "gradients"]}, "defenses": list(defenses),
            "options": {}}


def rec(i, b, preset, acc, status="ok", created="2026-01-01T00:00:00Z", defenses=()):
    return {"schema": 1, "run_id": f"id-{preset}-{b}-{i}-{len(defenses)}", "created": created,
            "case": case(b, defenses), "attack": {"name": preset, "preset": preset, "config": {}},
            "seed": 0, "trial": i, "status": status, "metrics": {} if status != "ok" else {"accuracy": acc},
            "cost": {"wall_s": 2.0}}


def records():
    rs = []
    for b, accs in ((1, {"tableak": [0.9, 1.0, 0.95], "random": [0.4, 0.5, 0.45]}),
                    (8, {"tableak": [0.7, 0.8, 0.75], "random": [0.42, 0.44, 0.46]})):
        for preset, vals in accs.items():
            rs += [rec(i, b, preset, v) for i, v in enumerate(vals)]
    rs.append(rec(9, 8, "random", None, status="failed"))
    # a failed trial re-run with --resume: the later ok record replaces it
    rs.append(rec(7, 1, "tableak", None, status="failed", created="2026-01-01T00:00:00Z"))
    rs.append(rec(7, 1, "tableak", 0.95, created="2026-01-02T00:00:00Z"))
    rs += [rec(i, 8, "tableak", v, defenses=[{"name": "gaussian", "sigma": 0.1}]) for i, v in enumerate([0.5, 0.6])]
    return rs


def test_summary_ci():
    m, ci, s = summarize([1.0, 2.0, 3.0])
    assert m == 2.0 and s == 1.0 and ci == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-5)


def test_markdown_and_csv_golden():
    rows = aggregate(records())
    md, csv = render_markdown(rows), render_csv(rows)
    if os.environ.get("UPDATE_GOLDEN"):
        (GOLDEN / "leaderboard.md").write_text(md)
        (GOLDEN / "leaderboard.csv").write_text(csv)
    assert md == (GOLDEN / "leaderboard.md").read_text()
    assert csv == (GOLDEN / "leaderboard.csv").read_text()


def test_settings_are_never_mixed_and_dedupe_keeps_latest():
    rows = aggregate(records())
    assert len(rows) == 5  # (B=1, B=8, B=8+noise) x presets, noise only for tableak
    t1 = next(r for r in rows if r.preset == "tableak" and r.case["protocol"]["batch_size"] == 1)
    assert t1.n_ok == 4 and t1.n_failed == 0
    r8 = next(r for r in rows if r.preset == "random" and r.case["protocol"]["batch_size"] == 8)
    assert r8.n_failed == 1
    md = render_markdown(rows)
    assert md.count("| 1 | tableak |") == 3  # ranked first within each of its three settings only


def test_html_has_plots_of_metric_vs_batch_size_and_defense():
    html = render_html(aggregate(records()))
    assert html.count("data:image/png;base64,") == 2
    assert "accuracy vs batch size" in html and "accuracy vs defense strength" in html


def test_cli_leaderboard_formats(tmp_path, capsys):
    for r in records():
        append_record(tmp_path / "records.jsonl", r)
    assert main(["leaderboard", str(tmp_path), "--format", "md"]) == 0
    assert capsys.readouterr().out == (GOLDEN / "leaderboard.md").read_text()
    assert main(["leaderboard", str(tmp_path), "--format", "html", "-o", str(tmp_path / "lb.html")]) == 0
    assert (tmp_path / "lb.html").read_text().startswith("<!doctype html>")


def test_unknown_primary_metric_is_a_user_error(tmp_path, capsys):
    for r in records():
        append_record(tmp_path / "records.jsonl", r)
    assert main(["leaderboard", str(tmp_path), "--primary", "nope"]) == 2
    assert "unknown metric 'nope'" in capsys.readouterr().err


def _speech_records(values: dict[str, list[float]], key: str = "mcd") -> list[dict]:
    out = []
    for preset, vals in values.items():
        for i, v in enumerate(vals):
            r = rec(i, 1, preset, None)
            r["case"] = dict(r["case"], name="speech/toy", modality="speech")
            r["metrics"] = {key: v, "stoi": 0.5}
            out.append(r)
    return out


def _ranked(md: str) -> list[str]:
    return [line.split("|")[2].strip() for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]


@pytest.mark.parametrize("key", ["mcd", "nrmse", "feature_mse", "asr_wer"])
def test_primary_lower_is_better_metric_ranks_lowest_first(key, tmp_path, capsys):
    """Without building the catalog (the CLI path): mcd / nrmse used to rank highest first."""
    rs = _speech_records({"worst": [9.0, 11.0], "best": [1.0, 1.5], "middle": [4.0, 5.0]}, key)
    assert _ranked(render_markdown(aggregate(rs), key)) == ["best", "middle", "worst"]
    for r in rs:
        append_record(tmp_path / "records.jsonl", r)
    assert main(["leaderboard", str(tmp_path), "--format", "md", "--primary", key]) == 0
    assert _ranked(capsys.readouterr().out) == ["best", "middle", "worst"]
    # a higher-is-better metric of the same records still ranks highest first
    rs = _speech_records({"low": [0.1], "high": [0.9]}, "stoi")
    assert _ranked(render_markdown(aggregate(rs), "stoi")) == ["high", "low"]


def _well_formed(md: str) -> None:
    tables: list[list[str]] = [[]]
    for line in md.splitlines():
        if line.startswith("|"):
            tables[-1].append(line)
        elif tables[-1]:
            tables.append([])
    tables = [t for t in tables if t]
    assert tables, md
    for t in tables:
        assert all(line.endswith("|") for line in t), t
        widths = {line.count("|") for line in t}
        assert len(widths) == 1, t  # header, separator and every row have the same number of cells
        assert set(t[1].replace("|", "").replace("-", "")) <= {""}, t[1]
        assert all(cell.strip() for line in t for cell in line.strip("|").split("|")), t  # no empty cells


def test_all_failed_table_is_well_formed_markdown(tmp_path, capsys):
    rs = [rec(i, 1, p, None, status="failed") for p in ("tableak", "random") for i in range(2)]
    md = render_markdown(aggregate(rs))
    _well_formed(md)
    assert "| rank | attack | n ok | n failed | s/trial |" in md and "| 0 | 2 | – |" in md
    _well_formed(render_markdown(aggregate(records())))  # the usual table, too
    for r in rs:
        append_record(tmp_path / "records.jsonl", r)
    assert main(["leaderboard", str(tmp_path), "--format", "md"]) == 0
    _well_formed(capsys.readouterr().out)


def test_defense_strength_is_read_from_the_record_as_the_defense_defines_it():
    from common.defenses import build_defense
    from eval.leaderboard import defense_strength

    specs = [{"name": "gaussian", "sigma": 0.01}, {"name": "dpsgd", "clip": 1.0, "noise_multiplier": 0.7,
                                                    "method": "vmap"},
             {"name": "topk", "keep": 0.9}, {"name": "mask", "p": 0.3}, {"name": "quantize", "bits": 4,
                                                                          "stochastic": False}]
    for d in specs:
        assert defense_strength({"defenses": [d]}) == build_defense(d).strength, d
    assert defense_strength({"defenses": specs[:2]}) == 0.01 + 0.7
    assert defense_strength({"defenses": [{"name": "plugin-defense", "flag": True, "level": 3}]}) == 3.0
    assert defense_strength({"defenses": []}) == 0.0


def test_leaderboard_never_imports_torch(tmp_path):
    data = tmp_path / "records.json"
    data.write_text(json.dumps(records() + _speech_records({"a": [1.0, 2.0], "b": [3.0]})))
    code = (
        "import sys, json\n"
        "import eval.leaderboard as L\n"
        f"rows = L.aggregate(json.loads(open({str(data)!r}).read()))\n"
        "for fmt in ('md', 'csv', 'html'):\n"
        "    for primary in (None, 'mcd', 'accuracy'):\n"
        "        assert L.RENDERERS[fmt](rows, primary)\n"
        "assert L.defense_strength({'defenses': [{'name': 'topk', 'keep': 0.5}]}) == 0.5\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    root = Path(__file__).resolve().parents[2]
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(root))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env)


def test_same_batch_with_another_output_option_counts_once():
    """A re-run of one batch that differs only in an output option (save_heatmap) is one trial."""
    from eval.leaderboard import aggregate

    base = {"status": "ok", "case": {"name": "c", "modality": "tabular", "data": "adult"}, "seed": 0,
            "attack": {"preset": "tableak", "name": "tableak", "config": {"iterations": 10}}}
    a = {**base, "trial": 0, "run_id": "sha256:a", "created": "2026-01-01T00:00:00Z", "metrics": {"accuracy": 0.5}}
    b = {**base, "trial": 0, "run_id": "sha256:b", "created": "2026-01-02T00:00:00Z", "metrics": {"accuracy": 0.7},
         "attack": {**base["attack"], "config": {"iterations": 10, "save_heatmap": True}}}
    c = {**base, "trial": 1, "run_id": "sha256:c", "created": "2026-01-01T00:00:00Z", "metrics": {"accuracy": 0.9}}
    d = {**base, "trial": 1, "run_id": "sha256:d", "created": "2026-01-01T00:00:00Z", "metrics": {"accuracy": 0.1},
         "attack": {**base["attack"], "config": {"iterations": 20}}}  # another computation: a second trial
    (row,) = aggregate([a, b, c, d])
    assert row.n_ok == 3
    assert abs(row.metrics["accuracy"][0] - (0.7 + 0.9 + 0.1) / 3) < 1e-12


def test_defense_settings_ordered_by_value_not_text():
    """sigma 1e-6 < 1e-5 < 1e-4 < 1e-3: a string sort puts 0.0001 first and 1e-06 last."""
    from eval.leaderboard import tables

    sigmas = [1e-3, 1e-6, 1e-4, 1e-5]
    rs = [rec(0, 8, "tableak", 0.5, defenses=[{"name": "gaussian", "sigma": s}]) for s in sigmas]
    rs.append(rec(0, 8, "tableak", 0.9))
    order = [[d["sigma"] for d in c["defenses"]] for c, _, _ in tables(aggregate(rs))]
    assert order == [[], [1e-6], [1e-5], [1e-4], [1e-3]]
