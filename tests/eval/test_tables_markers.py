"""The README's and docs' published numbers are generated: marked blocks are filled from the same
records as docs/tables/, --check catches a hand edit, and every suite the docs or tables name exists."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from eval.tables import ROOT, TableSpec, load_specs, marked_files, sync_markers
from tests.eval.test_tables import _rec


def _setup(tmp_path: Path, accs=(0.5, 0.7, 0.9)) -> tuple[list[TableSpec], Path]:
    res = tmp_path / "results" / "t"
    res.mkdir(parents=True)
    (res / "records.jsonl").write_text("".join(json.dumps(_rec(1000 + i, acc=a)) + "\n" for i, a in enumerate(accs)))
    specs = [TableSpec("t", "eval/suites/x.toml", "results/t", "Title (labels granted)", "accuracy"),
             TableSpec("waiting", "eval/suites/y.toml", "results/none", "Not run yet", "accuracy")]
    doc = tmp_path / "docs" / "page.md"
    doc.parent.mkdir()
    doc.write_text("intro\n<!-- table:t metrics=accuracy -->\nhand-written 0.99\n<!-- /table:t -->\n"
                   "<!-- table:waiting -->\n<!-- /table:waiting -->\nend\n")
    return specs, doc


def test_marked_blocks_are_filled_from_records_and_check_catches_a_hand_edit(tmp_path):
    specs, doc = _setup(tmp_path)
    kw = dict(root=tmp_path, out_dir=tmp_path / "docs" / "tables")
    assert sync_markers(specs, [doc], check=True, **kw)  # the hand-written number is stale
    assert "hand-written" in doc.read_text()  # --check writes nothing
    assert sync_markers(specs, [doc], check=False, **kw) == []
    text = doc.read_text()
    assert "hand-written" not in text and text.startswith("intro\n") and text.endswith("end\n")
    assert "0.700 ± 0.497" in text  # mean ± t(0.975, 2) * s / sqrt(3) of 0.5, 0.7, 0.9
    assert "| tabular/adult-fc/fedsgd-labels | 8 | labels granted | tableak | 3 | 0 |" in text
    assert "seeds 1000..1002" in text and "[t](tables/t.md)" in text
    assert "waiting: awaiting evaluation-seed records" in text
    assert sync_markers(specs, [doc], check=True, **kw) == []  # now current: idempotent
    doc.write_text(text.replace("0.700 ± 0.497", "0.750 ± 0.497"))
    assert sync_markers(specs, [doc], check=True, **kw)
    # new records change the block: a stale block is caught after a re-run too
    sync_markers(specs, [doc], check=False, **kw)
    (tmp_path / "results" / "t" / "records.jsonl").write_text(json.dumps(_rec(1000, acc=0.1)) + "\n")
    assert sync_markers(specs, [doc], check=True, **kw)


def test_unknown_marker_and_dirty_records_are_reported(tmp_path):
    specs, doc = _setup(tmp_path)
    kw = dict(root=tmp_path, out_dir=tmp_path / "docs" / "tables")
    doc.write_text(doc.read_text() + "<!-- table:nosuch -->\nx\n<!-- /table:nosuch -->\n")
    assert any("table:nosuch names no table" in s for s in sync_markers(specs, [doc], check=False, **kw))
    doc.write_text(doc.read_text().replace("<!-- /table:nosuch -->\n", ""))
    assert any("no matching" in s for s in sync_markers(specs, [doc], check=True, **kw))
    (tmp_path / "results" / "t" / "records.jsonl").write_text(json.dumps(_rec(1000, dirty=True)) + "\n")
    sync_markers(specs, [doc], check=False, **kw)
    assert "t: awaiting evaluation-seed records (1 record(s) from a dirty" in doc.read_text()


def test_the_repository_has_marked_blocks_for_the_published_tables():
    names = {s.name for s in load_specs()}
    blocks = {m for p in marked_files() for m in re.findall(r"(?<!`)<!-- table:([\w.-]+)", p.read_text(encoding="utf-8"))}
    assert blocks <= names
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for n in ("tabular_exact", "tabular_exact_vs_tableak"):
        assert f"<!-- table:{n}" in readme


def test_every_suite_named_in_tables_readme_and_docs_exists():
    for s in load_specs():
        assert (ROOT / s.suite).is_file(), f"eval/tables.toml: {s.name} names missing {s.suite}"
    texts = {p: p.read_text(encoding="utf-8") for p in marked_files()}
    commands = [(p, m) for p, t in texts.items() for m in re.findall(r"eval bench ([\w./-]+\.toml)", t)]
    assert commands, "no bench command found in README/docs"
    for p, suite in commands:  # commands reproducing a removed development suite use a temp file from git show
        assert suite.startswith("/tmp/") or (ROOT / suite).is_file(), f"{p.name}: bench command names missing {suite}"
    for p, t in texts.items():  # any other mention of a suite file, except the git-history ones (REV:path)
        for suite in re.findall(r"(?<![:\w/])eval/suites/[\w-]+\.toml", t):
            assert (ROOT / suite).is_file(), f"{p.name}: names missing suite {suite}"


def test_block_rows_state_the_grants_and_speech_snr_in_three_domains():
    from eval.tables import summary

    recs = []
    for i, (db, power, wave) in enumerate(((36.0, 13.0, -3.0), (38.0, 15.0, -2.0))):
        r = _rec(1000 + i)
        r["case"] = {**r["case"], "name": "speech/kws-mel/fedsgd", "modality": "speech",
                     "threat": {"name": "hbc", "grants": ["gradients", "batch_size"]}}
        r["metrics"] = {"logmel_snr": db, "mel_snr": power, "snr": wave}
        recs.append(r)
    spec = TableSpec("s", "eval/suites/s.toml", "results/s", "Speech", "logmel_snr", ("logmel_snr", "mel_snr", "snr"))
    md = summary(spec, recs)
    assert "| SNR dB-mel (dB) | SNR power mel (dB) | SNR waveform (dB) |" in md
    assert "| labels not granted | tableak | 2 | 0 | 37.000 ± 12.706 | 14.000 ± 12.706 | -2.500 ± 6.353 |" in md
    text = _rec(1000)
    text["case"] = {**text["case"], "modality": "text",
                    "threat": {"name": "hbc+labels+seq_lens", "grants": ["gradients", "labels", "seq_lens"]}}
    assert "| labels and lengths granted |" in summary(spec, [text], metrics=["accuracy"])
    text["case"]["threat"] = {"name": "hbc", "grants": ["gradients"]}
    assert "| labels and lengths not granted |" in summary(spec, [text], metrics=["accuracy"])


def test_every_suite_in_eval_suites_loads():
    from eval.suite import load_suite

    suites = sorted((ROOT / "eval" / "suites").glob("*.toml"))
    assert suites
    for p in suites:
        assert load_suite(p), p.name  # parses, names known cases/attacks, and expands to trials


def test_pivot_layout_has_one_column_per_batch_size(tmp_path):
    """``layout=pivot``: a row per (threat, defense, attack), a column per B, n said once when uniform."""
    specs, doc = _setup(tmp_path)
    big = [{**r, "case": {**r["case"], "protocol": {**r["case"]["protocol"], "batch_size": 32}},
            "run_id": r["run_id"] + "-b32", "metrics": {"accuracy": 0.25}} for r in map(lambda i: _rec(1000 + i), range(3))]
    with open(tmp_path / "results" / "t" / "records.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in big))
    doc.write_text(doc.read_text().replace("<!-- table:t metrics=accuracy -->", "<!-- table:t layout=pivot -->"))
    assert sync_markers(specs, [doc], check=False, root=tmp_path, out_dir=tmp_path / "docs" / "tables") == []
    text = doc.read_text()
    assert "| threat | defense | attack | B=8 | B=32 |" in text
    assert "| labels granted | none | tableak | 0.700 ± 0.497 | 0.250 ± 0.000 |" in text
    assert "n = 3 batches per cell, 0 failed" in text


def test_pivot_keeps_two_datasets_apart(tmp_path):
    """Two datasets at the same B and threat are two rows, not one cell overwritten by the other."""
    specs, doc = _setup(tmp_path)
    other = [{**r, "case": {**r["case"], "data": "german", "name": r["case"]["name"] + "-german"},
              "run_id": r["run_id"] + "-german", "metrics": {"accuracy": 0.25}} for r in map(lambda i: _rec(1000 + i), range(3))]
    with open(tmp_path / "results" / "t" / "records.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in other))
    doc.write_text(doc.read_text().replace("<!-- table:t metrics=accuracy -->", "<!-- table:t layout=pivot -->"))
    assert sync_markers(specs, [doc], check=False, root=tmp_path, out_dir=tmp_path / "docs" / "tables") == []
    text = doc.read_text()
    assert "| data / model | threat | defense | attack | B=8 |" in text
    data = _rec(1000)["case"]["data"]
    assert "| german / " in text and "| 0.250 ± 0.000 |" in text
    assert f"| {data} / " in text and "| 0.700 ± 0.497 |" in text


@pytest.mark.parametrize("opt", ["layout=pivto", "metric=accuracy"])
def test_an_unknown_marker_option_is_reported_not_ignored(tmp_path, opt):
    specs, doc = _setup(tmp_path)
    doc.write_text(doc.read_text().replace("<!-- table:t metrics=accuracy -->", f"<!-- table:t {opt} -->"))
    stale = sync_markers(specs, [doc], check=False, root=tmp_path, out_dir=tmp_path / "docs" / "tables")
    assert any("unknown option" in x and opt in x for x in stale), stale
    assert "hand-written 0.99" in doc.read_text()  # the block was left as it is
