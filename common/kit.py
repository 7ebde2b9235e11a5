"""What a modality package provides to the runner (a "kit"), and the generic continuous prior.

The contract is explicit: a kit class has every method of ``Kit``, a ``priors`` table
(prior kind -> builder, the kinds it can build for an attack's ``info.prior``) and declares
in ``optional`` which of ``OPTIONAL_PARTS`` it implements. ``check_kit`` enforces this when
the catalog loads the kit; the runner and ``audit`` read ``optional``, never ``hasattr``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Protocol

import torch
from torch import Tensor, nn

from .case import Case
from .fl import LossFn
from .types import Batch, Reconstruction


class Kit(Protocol):
    """A modality's loader, loss, prior builder and scorer.

    Only the trial pipeline (eval/pipeline.py) calls ``sample``/``score`` (they touch ground truth); attacks see the
    prior returned by ``make_prior`` and never the truth.
    """

    modality: str
    #: prior kind -> builder ``(self, case, model, *, device) -> prior``; ``make_prior`` dispatches on it
    priors: ClassVar[Mapping[str, Callable[..., Any]]]
    #: the optional parts (of ``OPTIONAL_PARTS``) this kit implements
    optional: ClassVar[frozenset[str]]

    def load_model(self, case: Case, *, device: torch.device, generator: torch.Generator) -> nn.Module: ...

    def load_pool(self, case: Case, *, data_path: str | None) -> Any: ...  # a table indexed like a datasets.Dataset (rows, columns)

    def sample(self, pool: Any, case: Case, *, model: nn.Module, device: torch.device,
               generator: torch.Generator) -> tuple[Batch, Any]: ...  # (batch, ground truth)

    def loss_fn(self, model: nn.Module, batch: Batch) -> Tensor: ...  # per-example losses

    def make_prior(self, case: Case, model: nn.Module, prior_kind: str, *, device: torch.device) -> Any: ...

    def score(self, reconstruction: Reconstruction, truth: Any, *, case: Case) -> tuple[dict[str, float], str]: ...


#: Optional kit parts and their signatures (a kit lists those it has in ``optional``):
#: ``truth_from_file(case, path, *, model) -> truth`` (ground truth of a capture, for ``eval audit``);
#: ``save_artifacts(rec, truth, *, case, directory) -> {name: path}`` (files next to the record).
OPTIONAL_PARTS = frozenset({"truth_from_file", "save_artifacts"})
REQUIRED_METHODS = ("load_model", "load_pool", "sample", "loss_fn", "make_prior", "score")


def check_kit(cls: type) -> type:
    """Check a kit class against the contract; raise TypeError naming what is wrong."""
    name = getattr(cls, "__qualname__", repr(cls))
    problems = []
    if not isinstance(getattr(cls, "modality", None), str):
        problems.append("no 'modality' string")
    problems += [f"no method {m!r}" for m in REQUIRED_METHODS if not callable(getattr(cls, m, None))]
    priors = getattr(cls, "priors", None)
    if not isinstance(priors, Mapping) or not priors or not all(callable(b) for b in priors.values()):
        problems.append("'priors' must map prior kinds to builder functions")
    optional = getattr(cls, "optional", None)
    if not isinstance(optional, frozenset):
        problems.append("'optional' must be a frozenset of optional part names")
    else:
        problems += [f"declares unknown optional part {o!r} (known: {', '.join(sorted(OPTIONAL_PARTS))})"
                     for o in sorted(optional - OPTIONAL_PARTS)]
        problems += [f"declares {o!r} but does not implement it" for o in sorted(optional & OPTIONAL_PARTS)
                     if not callable(getattr(cls, o, None))]
        problems += [f"implements {o!r} without declaring it in 'optional'" for o in sorted(OPTIONAL_PARTS - optional)
                     if callable(getattr(cls, o, None))]
    if problems:
        raise TypeError(f"kit {name} breaks the kit contract (common/kit.py): {'; '.join(problems)}")
    return cls


def build_prior(kit: Any, case: Case, model: nn.Module, prior_kind: str, *, device: torch.device) -> Any:
    """``make_prior`` through the kit's ``priors`` table (a clear error for a kind it cannot build)."""
    builder = kit.priors.get(prior_kind)
    if builder is None:
        known = ", ".join(sorted(k for k in kit.priors if k))
        raise ValueError(f"the {kit.modality} kit cannot build a {prior_kind!r} prior (it builds {known})")
    return builder(kit, case, model, device=device)


@dataclass(frozen=True)
class ContinuousPrior:
    """Public knowledge for the generic continuous-input baselines (DLG, iDLG, IG).

    ``build_batch(x, y)`` turns dummy inputs ``x [B, *input_shape]`` and labels ``y`` (class
    ids [B] or probabilities [B, C]) into a Batch for ``loss_fn``. ``label_weight`` and
    ``label_bias`` name the last layer's parameters (found by identity by the kit).
    """

    input_shape: tuple[int, ...]
    num_classes: int
    build_batch: Callable[[Tensor, Tensor], Batch]
    loss_fn: LossFn
    label_weight: str | None = None
    label_bias: str | None = None
    lower: Tensor | None = None  # per-feature bounds in input space (broadcast to input_shape)
    upper: Tensor | None = None
    sample_inputs: Callable[[int, torch.Generator], Tensor] | None = None  # public random inputs (label-count estimate)
