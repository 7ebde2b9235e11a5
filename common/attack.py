"""The attack contract: one class, one ``reconstruct``, one frozen config of paper defaults."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Protocol, runtime_checkable

import torch
from torch import nn

from .preset import Preset  # noqa: F401 - re-exported; plain data, importable without torch
from .threat import Capability
from .types import Observation, Reconstruction


@dataclass(frozen=True)
class AttackInfo:
    name: str
    modality: str  # "text" | "tabular" | "speech" | "continuous" (generic baselines)
    requires: frozenset[Capability]
    citation: str
    prior: str = ""  # kind of public prior the attack consumes (kits build it)


@runtime_checkable
class Attack(Protocol):
    info: ClassVar[AttackInfo]
    config: Any

    def reconstruct(self, obs: Observation, model: nn.Module, prior: Any, *,
                    generator: torch.Generator) -> Reconstruction: ...


def _coerce(value: str, typ: Any, key: str) -> Any:
    """``value`` (a --set string) as a ``typ``; a ValueError names ``--set key=value`` once."""
    try:
        return _parse(value, typ)
    except ValueError as e:
        raise ValueError(f"--set {key}={value!r}: {e}") from None


def _parse(value: str, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _parse(value, a)
            except ValueError as e:
                errors.append(str(e))
        if type(None) in args:
            errors.append("or none")
        raise ValueError("; ".join(errors))
    if origin is typing.Literal:
        if value not in [str(a) for a in args]:
            raise ValueError(f"must be one of {', '.join(map(str, args))}")
        return next(a for a in args if str(a) == value)
    if typ is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if typ in (int, float, str):
        try:
            return typ(value)
        except ValueError:
            raise ValueError(f"expected {typ.__name__}") from None
    if origin in (tuple, list):
        inner = args[0] if args else str
        return tuple(_parse(v.strip(), inner) for v in value.split(",") if v.strip())
    raise ValueError(f"cannot set a field of type {typ}")


def _in_range(v: float, spec: str) -> bool:
    """``spec``: ``">0"``, ``">=1"``, ``"<=1"`` or an interval ``"[0,1]"``, ``"(0,1]"``."""
    spec = spec.replace(" ", "")
    if spec[0] in "[(":
        lo, hi = (float(x) for x in spec[1:-1].split(","))
        return (v >= lo if spec[0] == "[" else v > lo) and (v <= hi if spec[-1] == "]" else v < hi)
    op, bound = (spec[:2], spec[2:]) if spec[1] == "=" else (spec[:1], spec[1:])
    b = float(bound)
    return {">": v > b, ">=": v >= b, "<": v < b, "<=": v <= b}[op]


def validate_config(config: Any) -> Any:
    """Check every numeric field of a config against its declared range; return the config.

    A config class declares ranges in ``RANGES: ClassVar[dict[str, str]]`` (``">0"``, ``">=1"``,
    ``"[0,1]"``, ``"(0,1]"`` ...). Numeric fields without a declared range must be finite and
    non-negative (``">=0"``): no knob of any attack here takes a negative or NaN value.
    """
    ranges = getattr(type(config), "RANGES", {})
    unknown = set(ranges) - {f.name for f in dataclasses.fields(config)}
    if unknown:
        raise TypeError(f"{type(config).__name__}.RANGES names unknown fields {sorted(unknown)}")
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        spec = ranges.get(f.name, ">=0")
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"config {f.name}={v}: must be a finite number (set it with --set {f.name}=...)")
        if not _in_range(v, spec):
            raise ValueError(f"config {f.name}={v} is out of range: must be {spec} (set it with --set {f.name}=...)")
    return config


def apply_overrides(config: Any, overrides: Mapping[str, Any]) -> Any:
    """``dataclasses.replace`` with type coercion of string values, a clear error on bad keys and
    a range check of the result (``validate_config``)."""
    if not overrides:
        return validate_config(config)
    hints = typing.get_type_hints(type(config))
    names = {f.name for f in dataclasses.fields(config)}
    clean = {}
    for key, value in overrides.items():
        if key not in names:
            raise ValueError(
                f"unknown config key {key!r} for {type(config).__name__}; valid keys: {', '.join(sorted(names))}"
            )
        clean[key] = _coerce(value, hints[key], key) if isinstance(value, str) and hints[key] is not str else value
    return validate_config(dataclasses.replace(config, **clean))


def config_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
