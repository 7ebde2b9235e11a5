"""The DAGER package of an earlier commit, importable next to the working tree's (for old/new
comparisons in one process, issue 18).

    from bench.dager_base import load_base
    old = load_base("fdf13c2")   # the module tree of textleak/attacks/dager at that commit
    old.DAGER(...), old.last_token.complete_last(...)

The package is extracted with ``git archive`` into a temporary folder and imported under the name
``dager_base_<commit>`` (its relative imports resolve inside it; its absolute imports, ``common`` and
``textleak.models``, resolve to the working tree)."""
from __future__ import annotations

import importlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from types import ModuleType

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "textleak/attacks/dager"


def resolve(commit: str) -> str:
    return subprocess.run(["git", "rev-parse", commit], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def load_base(commit: str) -> ModuleType:
    """The ``textleak.attacks.dager`` package as of ``commit``, with its submodules imported."""
    full = resolve(commit)
    name = f"dager_base_{full[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    raw = subprocess.run(["git", "archive", full, PKG], cwd=ROOT, capture_output=True, check=True).stdout
    tmp = tempfile.mkdtemp(prefix="dager_base_")
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        tar.extractall(tmp, filter="data")
    os.rename(os.path.join(tmp, PKG), os.path.join(tmp, name))
    sys.path.insert(0, tmp)
    try:
        mod = importlib.import_module(name)
        for sub in ("attack", "last_token", "decoder", "encoder", "beam", "span"):
            setattr(mod, sub, importlib.import_module(f"{name}.{sub}"))
    finally:
        sys.path.remove(tmp)
    mod.commit = full  # type: ignore[attr-defined]
    return mod
