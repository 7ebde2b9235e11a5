"""The attack contract: one class, one ``reconstruct``, one frozen config of paper defaults."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Protocol, runtime_checkable

import torch
from torch import nn

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


@dataclass(frozen=True)
class Preset:
    """A named, frozen configuration of an attack (a paper's flag bundle made explicit)."""

    attack: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


def _coerce(value: str, typ: Any, key: str) -> Any:
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
                return _coerce(value, a, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"--set {key}={value!r}: " + "; ".join(errors))
    if origin is typing.Literal:
        if value not in [str(a) for a in args]:
            raise ValueError(f"--set {key}={value!r}: must be one of {', '.join(map(str, args))}")
        return next(a for a in args if str(a) == value)
    if typ is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--set {key}={value!r}: expected true or false")
    if typ in (int, float, str):
        try:
            return typ(value)
        except ValueError:
            raise ValueError(f"--set {key}={value!r}: expected {typ.__name__}") from None
    if origin in (tuple, list):
        inner = args[0] if args else str
        return tuple(_coerce(v.strip(), inner, key) for v in value.split(",") if v.strip())
    raise ValueError(f"--set {key}: cannot set a field of type {typ}")


def apply_overrides(config: Any, overrides: Mapping[str, Any]) -> Any:
    """``dataclasses.replace`` with type coercion of string values and a clear error on bad keys."""
    if not overrides:
        return config
    hints = typing.get_type_hints(type(config))
    names = {f.name for f in dataclasses.fields(config)}
    clean = {}
    for key, value in overrides.items():
        if key not in names:
            raise ValueError(
                f"unknown config key {key!r} for {type(config).__name__}; valid keys: {', '.join(sorted(names))}"
            )
        clean[key] = _coerce(value, hints[key], key) if isinstance(value, str) and hints[key] is not str else value
    return dataclasses.replace(config, **clean)


def config_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
