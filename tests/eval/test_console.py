"""``pip install .`` gives a ``gradleak`` console command with the subcommands of ``python -m eval``."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_pip_install_gives_a_working_gradleak_command(tmp_path):
    pytest.importorskip("setuptools")
    src, target = tmp_path / "src", tmp_path / "site"  # build from a copy: setuptools writes build/ in place
    for name in ("pyproject.toml", "README.md"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, src / name)
    for pkg in ("common", "eval", "tableak", "textleak", "speechleak"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(target), str(src)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    script = target / "bin" / "gradleak"
    assert script.is_file()
    # the installed copy, not the checkout: run from elsewhere with only the install on the path
    env = {**os.environ, "PYTHONPATH": str(target)}
    for args, needle in ((["--help"], "usage: gradleak"), (["list", "attacks"], "tableak")):
        out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                             timeout=300, cwd=tmp_path, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        assert needle in out.stdout
    bad = subprocess.run([sys.executable, str(script), "run", "--batch-size", "0"], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "gradleak run: error" in bad.stderr
    assert str(target) in subprocess.run(
        [sys.executable, "-c", "import eval, sys; print(eval.__file__)"], capture_output=True, text=True,
        cwd=tmp_path, env=env).stdout
