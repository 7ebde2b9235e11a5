"""Records tie to their code: dirty only for package/dependency edits, with a hash of that diff."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from eval.records import code_state


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    if subprocess.run(["git", "--version"], capture_output=True).returncode != 0:
        pytest.skip("git is not installed")
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "a.py").write_text("x = 1\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "d.md").write_text("doc\n")
    (tmp_path / "requirements.txt").write_text("torch==2.9.1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "-c", "user.email=t@t", "-c", "user.name=t", "add", ".")
    _git(tmp_path, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    return tmp_path


def test_clean_and_doc_edits_are_not_dirty(repo: Path):
    commit, dirty, diff = code_state(repo)
    assert commit and dirty is False and diff is None
    (repo / "docs" / "d.md").write_text("changed\n")
    (repo / "results").mkdir()
    (repo / "results" / "r.jsonl").write_text("{}\n")
    assert code_state(repo)[1:] == (False, None)


def test_code_edits_are_dirty_with_a_hash_of_the_diff(repo: Path):
    (repo / "common" / "a.py").write_text("x = 2\n")
    _, dirty, h1 = code_state(repo)
    assert dirty is True and h1.startswith("sha256:")
    (repo / "common" / "a.py").write_text("x = 3\n")
    assert code_state(repo)[2] != h1            # another edit, another hash
    (repo / "common" / "a.py").write_text("x = 2\n")
    assert code_state(repo)[2] == h1            # the same code, the same hash


def test_new_module_and_pin_change_are_dirty(repo: Path):
    (repo / "common" / "new.py").write_text("y = 1\n")
    _, dirty, h1 = code_state(repo)
    assert dirty is True
    (repo / "common" / "new.py").write_text("y = 2\n")
    assert code_state(repo)[2] != h1
    (repo / "common" / "new.py").unlink()
    (repo / "requirements.txt").write_text("torch==2.9.2\n")
    assert code_state(repo)[1] is True


def test_manifest_verifies_a_copy_without_git(repo: Path, tmp_path_factory, monkeypatch):
    """A copy of the tree with no (or stale) git metadata: the manifest written at the commit makes
    its records clean exactly when every code file has the committed bytes, and dirty otherwise."""
    import shutil

    from eval.records import MANIFEST_ENV, write_manifest

    manifest = tmp_path_factory.mktemp("m") / "MANIFEST.json"
    written = write_manifest(repo, manifest)
    commit = code_state(repo)[0]
    assert written["commit"] == commit and set(written["files"]) == {"common/a.py", "requirements.txt"}
    copy = tmp_path_factory.mktemp("copy") / "tree"
    shutil.copytree(repo, copy, ignore=shutil.ignore_patterns(".git"))
    (copy / "common" / "__pycache__").mkdir()
    (copy / "common" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    (copy / "docs" / "d.md").write_text("a doc edit is not code\n")
    monkeypatch.setenv(MANIFEST_ENV, str(manifest))
    assert code_state(copy) == (commit, False, None)
    (copy / "common" / "a.py").write_text("x = 2\n")
    _, dirty, h1 = code_state(copy)
    assert dirty is True and h1.startswith("sha256:")
    (copy / "common" / "a.py").write_text("x = 1\n")
    (copy / "common" / "extra.py").write_text("z = 0\n")   # an untracked module is code too
    assert code_state(copy)[1] is True
