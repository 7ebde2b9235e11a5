"""A small explicit registry: name -> object or lazy ``"module:attr"`` target (no eval)."""
from __future__ import annotations

import difflib
import importlib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownName(KeyError):
    """Raised for a name that is not registered; ``str()`` is a one-line user message."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want plain text
        return str(self.args[0])


class Registry(Generic[T]):
    """``check`` (optional) validates each entry: at ``add`` for objects, when first loaded
    for lazy ``"module:attr"`` targets (so registering stays import-free)."""

    def __init__(self, kind: str, *, check: Callable[[T], object] | None = None) -> None:
        self.kind = kind
        self.check = check
        self._entries: dict[str, T | str] = {}

    def add(self, name: str, target: T | str, *, force: bool = False) -> None:
        if name in self._entries and not force:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if self.check is not None and not isinstance(target, str):
            self.check(target)
        self._entries[name] = target

    def get(self, name: str) -> T:
        try:
            target = self._entries[name]
        except KeyError:
            hint = difflib.get_close_matches(name, list(self._entries), n=3)
            did = f" (did you mean {', '.join(hint)}?)" if hint else ""
            raise UnknownName(
                f"unknown {self.kind} {name!r}{did}; known: {', '.join(self.names())}"
            ) from None
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module), attr)
            if self.check is not None:
                self.check(target)
            self._entries[name] = target
        return target  # type: ignore[return-value]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
