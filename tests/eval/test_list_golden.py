"""Golden output of `python -m eval list ...` (regenerate with UPDATE_GOLDEN=1 after adding entries)."""
import os
from pathlib import Path

import pytest

from eval.__main__ import main

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("what", ["attacks", "presets", "metrics", "cases"])
def test_list_golden(what, capsys):
    assert main(["list", what]) == 0
    out = capsys.readouterr().out
    path = GOLDEN / f"list_{what}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(out)
    assert out == path.read_text()
    assert out.strip(), "the catalog lists nothing"
