"""docs/architecture.md's worked example runs: a plugin attack (one module, one registry line)
resolves, passes the modality and threat checks, runs through the trial pipeline and is scored."""
import json
from pathlib import Path

from eval.__main__ import main
from eval.catalog import catalog

PLUGINS = Path(__file__).parent / "plugins"


def test_the_worked_example_attack_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setenv("GRADLEAK_PLUGINS", "zeros_attack")
    catalog.cache_clear()
    try:
        out = tmp_path / "runs"
        assert main(["run", "--attack", "zeros", "--case", "tabular/adult-fc/fedsgd", "--trials", "1",
                     "--set", "value=0.5", "--out", str(out), "--quiet"]) == 0
        rec = json.loads((out / "records.jsonl").read_text())
        assert rec["status"] == "ok" and rec["attack"]["name"] == "zeros" and rec["attack"]["config"] == {"value": 0.5}
        assert 0.0 <= rec["metrics"]["accuracy"] <= 1.0
        # the modality check applies to it like to any attack: no 'continuous' prior for text cases
        assert main(["run", "--attack", "zeros", "--case", "text/tiny-gpt2/fedsgd", "--out", str(out)]) == 2
        assert "cannot run on case" in capsys.readouterr().err
    finally:
        catalog.cache_clear()
