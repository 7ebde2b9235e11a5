"""A case: model, data, FL protocol, threat model and defenses, as pure data."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from .threat import ThreatModel
from .types import FLProtocol


@dataclass(frozen=True)
class Case:
    name: str
    modality: str  # selects the kit: "text" | "tabular" | "speech"
    model: str  # kit-specific model name, HF id or local directory
    data: str  # kit-specific dataset name or path
    protocol: FLProtocol = field(default_factory=FLProtocol)
    threat: ThreatModel = field(default_factory=ThreatModel)
    defenses: tuple[Mapping[str, Any], ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)  # kit options (label column, max length ...)
    description: str = ""

    def with_batch_size(self, b: int) -> "Case":
        return replace(self, protocol=replace(self.protocol, batch_size=b))

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "modality": self.modality,
            "model": self.model,
            "data": self.data,
            "protocol": self.protocol.to_dict(),
            "threat": self.threat.to_dict(),
            "defenses": [dict(d) for d in self.defenses],
            "options": dict(self.options),
        }
