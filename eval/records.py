"""Run records: one JSON object per trial, appended to ``records.jsonl``.

Appends are one ``os.write`` of one complete line on an ``O_APPEND`` descriptor followed
by ``fsync``; a reader ignores a torn last line and a writer repairs it before appending,
so killing a run never leaves a broken record and ``--resume`` never duplicates one.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

SCHEMA_VERSION = 1
CODE_VERSION = "0.1.0"
RECORDS_FILE = "records.jsonl"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def run_id(*, case: dict, attack: str, config: dict, seed: int, trial: int) -> str:
    payload = canonical_json({"case": case, "attack": attack, "config": config, "seed": seed, "trial": trial})
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()[:32]


# What counts as code for provenance: the packages and the dependency pins. Edits to results/,
# docs/ or the README do not make a record dirty (they cannot change what a trial computes).
CODE_PATHS = ("common", "eval", "tableak", "textleak", "speechleak", "requirements.txt",
              "requirements-assets.txt", "pyproject.toml")


def _run_git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout


#: A manifest of the code at one commit (``write_manifest``): where a copy of the tree has no
#: trustworthy git metadata (the device machine gets the files with the session's stale ``.git``),
#: ``code_state`` verifies the files' contents against it instead of asking git.
MANIFEST_ENV = "GRADLEAK_CODE_MANIFEST"


def _blob_sha1(data: bytes) -> str:
    """git's blob id of ``data`` (what ``git hash-object`` prints), computed without git."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _code_files(root: Path) -> dict[str, str]:
    """{relative path: blob id} of every file under CODE_PATHS (bytecode and build folders excluded)."""
    out: dict[str, str] = {}
    for top in CODE_PATHS:
        base = root / top
        files = [base] if base.is_file() else sorted(f for f in base.rglob("*") if f.is_file()) if base.is_dir() else []
        for f in files:
            if "__pycache__" in f.parts or f.suffix == ".pyc" or any(x.endswith(".egg-info") for x in f.parts):
                continue
            out[f.relative_to(root).as_posix()] = _blob_sha1(f.read_bytes())
    return out


def write_manifest(root: Path, path: Path) -> dict[str, Any]:
    """Record HEAD's commit and the blob ids of its code files (from git, i.e. the committed bytes)."""
    commit = _run_git(root, "rev-parse", "--short=12", "HEAD").strip()
    listing = _run_git(root, "ls-tree", "-r", "HEAD", "--", *CODE_PATHS)
    files = {}
    for line in listing.splitlines():
        meta, name = line.split("\t", 1)
        files[name] = meta.split()[2]
    manifest = {"commit": commit, "files": files}
    path.write_text(json.dumps(manifest, sort_keys=True, indent=0))
    return manifest


def manifest_state(root: Path, manifest: dict[str, Any]) -> tuple[str | None, bool, str | None]:
    """(commit, dirty, diff hash) from a manifest: clean iff the code files at ``root`` are exactly
    the manifest's (same paths, same bytes); otherwise the hash covers the differing entries."""
    actual = _code_files(root)
    expected = manifest["files"]
    if actual == expected:
        return manifest["commit"], False, None
    diff = sorted((k, expected.get(k), actual.get(k)) for k in set(actual) | set(expected)
                  if expected.get(k) != actual.get(k))
    return manifest["commit"], True, "sha256:" + hashlib.sha256(canonical_json(diff).encode()).hexdigest()[:32]


def code_state(root: Path) -> tuple[str | None, bool | None, str | None]:
    """(commit, dirty, diff hash) of the code at ``root``: dirty only when a package or dependency
    file differs from HEAD (tracked edits or new untracked files there); the hash covers that diff
    and the untracked files' bytes, so two dirty records with the same hash ran the same code.
    With ``$GRADLEAK_CODE_MANIFEST`` set, the files are checked against that manifest instead."""
    manifest = os.environ.get(MANIFEST_ENV)
    if manifest:
        return manifest_state(root, json.loads(Path(manifest).read_text()))
    commit = _run_git(root, "rev-parse", "--short=12", "HEAD").strip() or None
    paths = [p for p in CODE_PATHS if (root / p).exists()]
    status = _run_git(root, "status", "--porcelain", "--untracked-files=all", "--", *paths).strip()
    if not status:
        return commit, False, None
    h = hashlib.sha256(_run_git(root, "diff", "HEAD", "--binary", "--", *paths).encode())
    for line in sorted(status.splitlines()):
        if line.startswith("??"):
            f = root / line[3:].strip()
            if f.is_file() and "__pycache__" not in f.parts:
                h.update(line[3:].encode() + b"\0" + f.read_bytes())
    return commit, True, "sha256:" + h.hexdigest()[:32]


@lru_cache(maxsize=1)
def _git() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        commit, dirty, diff = code_state(root)
    except (OSError, subprocess.SubprocessError):
        commit, dirty, diff = None, None, None
    out: dict[str, Any] = {"version": CODE_VERSION, "git": commit, "dirty": dirty}
    if os.environ.get(MANIFEST_ENV):
        out["verified_by"] = "manifest"
    if diff is not None:
        out["diff_sha256"] = diff
    return out


def provenance(device: str) -> dict[str, Any]:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "device": device}
    tf = sys.modules.get("transformers")
    if tf is None:
        try:
            from importlib.metadata import version

            env["transformers"] = version("transformers")
        except Exception:  # noqa: BLE001 - metadata missing is not an error
            env["transformers"] = None
    else:
        env["transformers"] = tf.__version__
    if device.startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return {"code": _git(), "env": env}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _repair_tail(path: Path) -> None:
    """Drop a torn (unterminated) last line left by a killed writer."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        data = path.read_bytes()
        cut = data.rfind(b"\n") + 1
        f.truncate(cut)


def append_record(path: str | os.PathLike, record: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _repair_tail(path)
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


_WARNED: set[tuple[str, int]] = set()  # (file, line) already reported: one warning per bad line per process


def _warn_bad_line(path: Path, lineno: int) -> None:
    key = (str(path.resolve()), lineno)
    if key not in _WARNED:
        _WARNED.add(key)
        print(f"warning: {path}:{lineno}: not a JSON run record, skipped", file=sys.stderr)


def iter_records(path: str | os.PathLike) -> Iterator[dict]:
    """The records of one file. A torn last line (killed writer) is ignored silently; any other
    line that is not a JSON object is skipped with one warning on stderr naming file and line."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                break  # torn tail from a killed writer
            raw = raw.strip()
            if not raw:
                continue
            try:
                rec = json.loads(raw)
            except ValueError:  # JSONDecodeError and UnicodeDecodeError
                rec = None
            if not isinstance(rec, dict) or "run_id" not in rec:
                _warn_bad_line(path, lineno)
                continue
            yield rec


def load_records(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """Records from record files or directories holding ``records.jsonl`` (recursively)."""
    out: list[dict] = []
    for p in paths:
        p = Path(p)
        files = sorted(p.rglob(RECORDS_FILE)) if p.is_dir() else [p]
        for f in files:
            out.extend(iter_records(f))
    return out


def completed_ids(path: str | os.PathLike, *, include_failed: bool = False) -> set[str]:
    """Run ids already recorded (ok or skipped; failed too when ``include_failed``)."""
    ids = set()
    for r in iter_records(path):
        if include_failed or r.get("status") != "failed":
            ids.add(r["run_id"])
    return ids
