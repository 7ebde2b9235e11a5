"""Threat model: which parts of a client's update the server is granted.

Capabilities are data (cf. LeakPro's ``AttackerCapabilities``); attacks declare the set
they require and the runner refuses an attack whose requirements are not granted
*before* any work is done.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Iterable


class Capability(StrEnum):
    GRADIENTS = "gradients"  # FedSGD: dL/dθ of the client batch
    WEIGHT_DELTA = "weight_delta"  # FedAvg: θ_before − θ_after after local training
    BATCH_SIZE = "batch_size"  # number of examples in the update
    LABELS = "labels"  # the client's labels
    SEQUENCE_LENGTHS = "seq_lens"  # text: per-example lengths (LAMP's know_padding)
    LOCAL_HPARAMS = "local_hparams"  # local lr, epochs, local batch size, reduction
    PUBLIC_PRIOR = "public_prior"  # public knowledge: tokenizer + LM, schema, feature extractor


@dataclass(frozen=True)
class ThreatModel:
    """An honest-but-curious server granted ``grants``."""

    name: str = "honest-but-curious"
    grants: frozenset[Capability] = field(
        default_factory=lambda: frozenset(
            {Capability.GRADIENTS, Capability.WEIGHT_DELTA, Capability.BATCH_SIZE,
             Capability.LOCAL_HPARAMS, Capability.PUBLIC_PRIOR}
        )
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "grants", frozenset(Capability(c) for c in self.grants))

    def missing(self, required: Iterable[Capability | str]) -> frozenset[Capability]:
        return frozenset(Capability(c) for c in required) - self.grants

    def grants_(self, capability: Capability | str) -> bool:
        return Capability(capability) in self.grants

    def with_grants(self, *extra: Capability | str, name: str | None = None) -> "ThreatModel":
        return ThreatModel(name or self.name, self.grants | {Capability(c) for c in extra})

    def without(self, *removed: Capability | str, name: str | None = None) -> "ThreatModel":
        return ThreatModel(name or self.name, self.grants - {Capability(c) for c in removed})

    def to_dict(self) -> dict:
        return {"name": self.name, "grants": sorted(str(c) for c in self.grants)}


#: Default server view: update, batch size, local hyper-parameters and public prior, no labels.
HONEST = ThreatModel()
#: The same plus the client's labels (the "known labels" setting of TabLeak and LAMP).
HONEST_WITH_LABELS = HONEST.with_grants(Capability.LABELS, name="honest-but-curious+labels")
