"""LAMP's memory (issue 18): the sentence pool is held without importing ``datasets`` (~85 MB RSS)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest


def _need_data():
    if importlib.util.find_spec("gensim") is None:
        pytest.skip("gensim wheel (data file) not installed")


def test_pool_loads_without_datasets_and_matches_the_file():
    _need_data()
    code = ("import sys\nfrom textleak.data import load_sentences, rotten_tomatoes_path\n"
            "ds = load_sentences('rotten-tomatoes')\n"
            "assert 'datasets' not in sys.modules and 'pyarrow' not in sys.modules, sorted(sys.modules)\n"
            "lines = [l.strip() for l in rotten_tomatoes_path().read_bytes().decode('cp1252').splitlines() if l.strip()]\n"
            "assert [r['text'] for r in ds] == ds['text'] == [l.partition(' ')[2].strip() for l in lines]\n"
            "assert ds['label'] == [int(l.startswith('__label__pos')) for l in lines]\n"
            "assert len(ds) == 200 and sum(ds['label']) == 100 and ds[5] == {'text': ds['text'][5], 'label': 0}\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_text_file_rows(tmp_path):
    from textleak.data import text_file

    p = tmp_path / "s.txt"
    p.write_text("  first one \n\nsecond\r\nthird\n", encoding="utf-8")
    ds = text_file(p)
    assert ds["text"] == ["first one", "second", "third"] and ds["label"] == [0, 0, 0]
    assert list(ds)[1] == {"text": "second", "label": 0} and len(ds) == 3
    with pytest.raises(KeyError):
        ds["speaker"]
