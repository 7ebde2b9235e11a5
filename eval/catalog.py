"""The merged catalog: attacks, presets, cases, kits and metrics of every package.

Each package exposes plain tables (no heavy imports): ``ATTACKS`` (name -> "module:Class"),
``PRESETS`` (name -> Preset), ``KITS`` (modality -> "module:Class"), ``CASE_MODULES``
(modules each with ``CASES: dict[str, Case]``) and ``METRICS`` (extra MetricInfo entries).
"""
from __future__ import annotations

import importlib
import os
from functools import lru_cache
from typing import Any

from common.attack import Preset
from common.case import Case
from common.kit import check_kit
from common.metrics import MetricTable, metric_table
from common.registry import Registry

PACKAGES = ("common", "tableak", "textleak", "speechleak")
PLUGIN_ENV = "GRADLEAK_PLUGINS"  # comma-separated extra modules with the same tables (user attacks, cases)


def _packages() -> tuple[str, ...]:
    extra = [m.strip() for m in os.environ.get(PLUGIN_ENV, "").split(",") if m.strip()]
    return PACKAGES + tuple(extra)


class Catalog:
    def __init__(self) -> None:
        self.attacks: Registry[type] = Registry("attack")
        self.presets: Registry[Preset] = Registry("preset")
        self.kits: Registry[type] = Registry("modality kit", check=check_kit)  # the Kit contract, checked on load
        self.cases: Registry[Case] = Registry("case")
        self.metrics: MetricTable = metric_table(_packages())  # pure: built from the packages' METRICS
        for pkg in _packages():
            mod = importlib.import_module(pkg)
            for name, target in getattr(mod, "ATTACKS", {}).items():
                self.attacks.add(name, target)
            for name, preset in getattr(mod, "PRESETS", {}).items():
                self.presets.add(name, preset)
            for modality, target in getattr(mod, "KITS", {}).items():
                self.kits.add(modality, target)
            for case_module in getattr(mod, "CASE_MODULES", ()):
                for name, case in importlib.import_module(case_module).CASES.items():
                    self.cases.add(name, case)

    def resolve(self, name: str) -> tuple[str, type, dict[str, Any]]:
        """An attack or preset name -> (preset name, attack class, overrides)."""
        if name in self.presets:
            p = self.presets.get(name)
            return name, self.attacks.get(p.attack), dict(p.overrides)
        if name in self.attacks:
            return name, self.attacks.get(name), {}
        known = sorted(set(self.presets.names()) | set(self.attacks.names()))
        import difflib

        hint = difflib.get_close_matches(name, known, n=3)
        did = f" (did you mean {', '.join(hint)}?)" if hint else ""
        from common.registry import UnknownName

        raise UnknownName(f"unknown attack {name!r}{did}; run `python -m eval list presets` (known: {', '.join(known)})")


@lru_cache(maxsize=1)
def catalog() -> Catalog:
    return Catalog()
