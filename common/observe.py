"""The only way to turn a ClientUpdate into an Observation."""
from __future__ import annotations

from dataclasses import replace

from .threat import Capability, ThreatModel
from .types import ClientUpdate, Observation


def observe(update: ClientUpdate, threat: ThreatModel) -> Observation:
    """Drop everything ``threat`` does not grant."""
    needed = Capability.GRADIENTS if update.kind == "gradient" else Capability.WEIGHT_DELTA
    if not threat.grants_(needed):
        raise PermissionError(
            f"threat model {threat.name!r} does not grant {needed.value!r}, which a {update.kind} update needs"
        )
    protocol = None
    if threat.grants_(Capability.LOCAL_HPARAMS):
        # the protocol carries the batch size: withhold it unless BATCH_SIZE is granted too
        protocol = update.protocol if threat.grants_(Capability.BATCH_SIZE) else replace(update.protocol, batch_size=None)
    return Observation(
        kind=update.kind,
        tensors={k: v.detach().clone() for k, v in update.tensors.items()},
        num_examples=update.num_examples if threat.grants_(Capability.BATCH_SIZE) else None,
        labels=update.labels.detach().clone() if (update.labels is not None and threat.grants_(Capability.LABELS)) else None,
        seq_lens=update.seq_lens if threat.grants_(Capability.SEQUENCE_LENGTHS) else None,
        protocol=protocol,
        defenses=update.defenses,
    )
