"""A user's --data never leaves copies outside the input and --out (no Hugging Face datasets cache)."""
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def files_containing(root: Path, marker: bytes) -> list[Path]:
    if not root.exists():
        return []
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and marker in p.read_bytes()]


def csv_with(marker: str, path: Path) -> Path:
    rows = ["age,job,hours,note,income"]
    for i in range(40):
        rows.append(f"{20 + (7 * i) % 45},{'abc'[i % 3]},{10 + i},{marker if i % 2 else 'plain'},"
                    f"{['low', 'high'][(i // 2) % 2]}")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("kind", ["csv", "text"])
def test_user_data_is_not_copied_into_the_hf_cache(kind, tmp_path):
    marker = f"zq{uuid.uuid4().hex}zq"
    hf = tmp_path / "hf_home"
    cache = tmp_path / "hf_datasets_cache"
    out = tmp_path / "out"
    if kind == "csv":
        data = csv_with(marker, tmp_path / "private.csv")
        argv = ["--attack", "idlg", "--case", "tabular/adult-fc/fedsgd", "--data", str(data), "--label", "income",
                "--set", "iterations=5"]
    else:
        data = tmp_path / "private.txt"
        data.write_text(f"the cat sat on the {marker} mat\nhello there my friend\n")
        argv = ["--attack", "dager", "--case", "text/tiny-gpt2/dager", "--data", str(data)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(hf), "HF_DATASETS_CACHE": str(cache)}
    r = subprocess.run([sys.executable, "-m", "eval", "run", *argv, "--out", str(out), "--quiet"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert (out / "records.jsonl").is_file()
    m = marker.encode()
    assert data in files_containing(data.parent, m)  # the search finds the marker where it is
    assert files_containing(hf, m) == [] and files_containing(cache, m) == []
    home_cache = Path.home() / ".cache" / "huggingface"
    assert files_containing(home_cache, m) == []
