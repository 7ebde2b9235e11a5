"""``Preset``: a named attack configuration. Plain data (no torch), so that the packages' tables
(``ATTACKS``, ``PRESETS``, ``METRICS``) can be read without importing torch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class Preset:
    """A named, frozen configuration of an attack (a paper's flag bundle made explicit)."""

    attack: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
