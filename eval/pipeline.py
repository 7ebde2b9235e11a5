"""The trial pipeline: the one place that turns a trial spec into what the attacker gets
(observation, model, prior) and what the scorer gets (ground truth), and scores the result.

    prepare(spec)                -> Prepared   attack resolved once, modality + threat checked, run id
    load_inputs(...)             -> (model, pool), cached per process in ``Resources`` (models within a budget)
    simulate(case, kit, ...)     -> Trial      sample, client update, finite check, observe, prior
    score(kit, rec, truth, ...)  -> (metrics, alignment)
    run_trial(prepared, ...)     -> record     all of the above, failures recorded

``eval.driver`` (run_many), ``eval.audit``, the benchmarks and the tests build trials with
these functions; nothing else holds the batch and the observation at the same time.
"""
from __future__ import annotations

import hashlib
import resource
import time
import traceback
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from common.attack import apply_overrides, config_dict
from common.case import Case
from common.defenses import build_defense
from common.fl import client_update
from common.kit import Kit
from common.observe import observe
from common.seed import derive_seed, make_generator
from common.threat import ThreatModel
from common.types import Batch, Observation, Reconstruction, first_nonfinite

from .catalog import catalog
from .errors import UserError
from .records import SCHEMA_VERSION, canonical_json, now, provenance, run_id


@dataclass(frozen=True)
class TrialSpec:
    case: Case
    attack: str  # preset or attack name
    seed: int = 0
    trial: int = 0
    overrides: Mapping[str, Any] = field(default_factory=dict)
    data_path: str | None = None


@dataclass
class Resources:
    """Per-process caches: data pools are loaded once per case; models once per (case, seed) while they fit.

    ``models`` is least-recently-used first and holds models of at most ``model_budget_mb`` in all, always the one
    just used: a suite of one seed per run (``textleak_lamp_paper``: 20 seeds) otherwise kept every seed's model for
    the whole process, ~87 MB each for MiniLM once a trial has touched its pages (issue 18). With the default
    128 MB a MiniLM-sized or larger model is kept while consecutive trials use it; tiny, tabular and speech models
    all stay. A model evicted and needed again is loaded again (MiniLM: ~0.03 CPU s after the first load, its
    weights mapped from the file), the same model
    (``kit.load_model`` is deterministic in the seed's generator)."""

    models: dict = field(default_factory=dict)
    pools: dict = field(default_factory=dict)
    model_budget_mb: float = 128.0

    def model(self, key: Any, load: Callable[[], nn.Module]) -> nn.Module:
        """The cached model under ``key`` (loaded by ``load()`` on a miss); then evicts the least recently used
        others while the cache holds more than ``model_budget_mb``."""
        model = self.models.pop(key) if key in self.models else load()
        self.models[key] = model  # most recently used last
        while len(self.models) > 1 and sum(map(model_mb, self.models.values())) > self.model_budget_mb:
            del self.models[next(iter(self.models))]
        return model


def model_mb(model: Any) -> float:
    """Megabytes of a model's parameters and buffers (each storage once); 0 for a non-module."""
    if not isinstance(model, nn.Module):
        return 0.0
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        try:
            st = t.untyped_storage()
            seen[(st.device, st.data_ptr())] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # no plain storage (sparse, tensor subclasses): its elements
            seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values()) / 2**20


class NonFiniteUpdate(ValueError):
    """A client update (or captured parameters) holding NaN or Inf: never attacked, never scored."""


# -- resolution (once per spec, before any work) -----------------------------------------------
def resolve_device(device: str | torch.device) -> torch.device:
    """The one conversion of a device name into a ``torch.device``."""
    if isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"device {device!r}: use cpu or cuda") from None


def effective_case(spec: TrialSpec) -> Case:
    """The case as the trial runs it: a user's ``--data`` replaces the case's data source."""
    return replace(spec.case, data=str(spec.data_path)) if spec.data_path else spec.case


def resolve_attack(name: str, overrides: Mapping[str, Any]) -> tuple[str, Any]:
    """An attack or preset name plus ``--set`` overrides -> (preset name, attack instance)."""
    preset, cls, preset_overrides = catalog().resolve(name)
    try:
        config = apply_overrides(apply_overrides(cls.default_config(), preset_overrides), overrides)
    except ValueError as e:
        raise UserError(str(e)) from None
    return preset, cls(config)


def kit_class(modality: str) -> type:
    try:
        return catalog().kits.get(modality)
    except KeyError as e:
        raise UserError(str(e)) from None


def make_kit(modality: str) -> Kit:
    return kit_class(modality)()


def check_modality(case: Case, attack: Any) -> None:
    """The case's kit must build the prior the attack consumes (e.g. no DAGER on a table), and the
    attack's own ``check_case(case)`` (when it has one) must accept the case's settings."""
    kit = kit_class(case.modality)
    info = attack.info
    if info.prior not in kit.priors:
        raise UserError(
            f"attack {info.name!r} ({info.modality}) cannot run on case {case.name!r} ({case.modality}): it needs a "
            f"{info.prior!r} prior and the {case.modality} kit builds {', '.join(sorted(k for k in kit.priors if k))}; "
            f"pick a {info.modality} case (python -m eval list cases)")
    check = getattr(attack, "check_case", None)  # settings this case cannot serve, refused before any work
    if check is not None:
        try:
            check(case)
        except ValueError as e:
            raise UserError(f"attack {info.name!r} on case {case.name!r}: {e}") from None


def check_threat(case: Case, attack: Any) -> None:
    missing = case.threat.missing(attack.info.requires)
    if missing:
        raise UserError(
            f"attack {attack.info.name!r} needs {', '.join(sorted(missing))}, which the threat model "
            f"{case.threat.name!r} of case {case.name!r} does not grant; pick a case that grants it"
        )
    kind_needed = "gradients" if case.protocol.kind == "fedsgd" else "weight_delta"
    if kind_needed not in case.threat.grants:
        raise UserError(f"case {case.name!r} sends {kind_needed} but its threat model does not grant it")


def data_digest(path: str | Path) -> str | None:
    """SHA-256 of a data file's contents, or of every file under a folder (relative paths in
    sorted order, each with its contents' digest); None when ``path`` is not a local file or folder.

    A file is read once per process for each (path, size, mtime): a suite's trials on the same
    data hash it once, and an edited file is hashed again."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return _file_digest(str(p.resolve()), st.st_size, st.st_mtime_ns)
    if not p.is_dir():
        return None
    files = sorted((f.relative_to(p).as_posix(), f) for f in p.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for rel, f in files:
        h.update(rel.encode() + b"\0" + (data_digest(f) or "").encode() + b"\n")
    return h.hexdigest()


@lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Prepared:
    """A spec with its attack resolved and checked: everything known before the trial runs."""

    spec: TrialSpec
    preset: str
    attack: Any
    case: Case  # the effective case (``--data`` applied)
    case_dict: dict  # as recorded
    run_id: str
    data_source: dict | None = None  # a user's --data: {"path", "sha256"}


def prepare(spec: TrialSpec) -> Prepared:
    """Resolve the attack once, check modality and threat model, compute the run id.

    With a user's ``--data`` the run id hashes the SHA-256 of its contents instead of the path
    string (the record keeps the path in ``case.data`` and both in ``data_source``), so editing
    the file changes the run id and ``x.csv`` / ``./x.csv`` give the same one; built-in data
    keeps its name (and its published run ids).
    """
    preset, attack = resolve_attack(spec.attack, spec.overrides)
    check_modality(spec.case, attack)
    check_threat(spec.case, attack)
    case = effective_case(spec)
    case_d = case.to_dict()
    source, id_case = None, case_d
    if spec.data_path:
        digest = data_digest(spec.data_path)
        if digest is not None:
            source = {"path": str(Path(spec.data_path).resolve()), "sha256": digest}
            id_case = {**case_d, "data": f"sha256:{digest}"}
    rid = run_id(case=id_case, attack=preset, config=config_dict(attack.config), seed=spec.seed, trial=spec.trial)
    return Prepared(spec, preset, attack, case, case_d, rid, source)


# -- the trial ---------------------------------------------------------------------------------
@dataclass
class AttackerView:
    """What the attacker gets: the server's observation, the model and the public prior."""

    observation: Observation
    model: nn.Module
    prior: Any


@dataclass
class Trial:
    attacker: AttackerView
    truth: Any  # for the scorer only
    batch: Batch | None = None  # the client's batch, only with ``keep_batch`` (oracle tests, benchmarks)


def check_finite(tensors: Mapping[str, Tensor], *, what: str) -> None:
    """Raise ``NonFiniteUpdate`` naming the first tensor holding NaN or Inf."""
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise NonFiniteUpdate(f"{what} tensor {bad!r} holds NaN or Inf values: not attacked, not scored")


def load_inputs(spec: TrialSpec, case: Case, kit: Kit, resources: Resources, *,
                device: torch.device) -> tuple[nn.Module, Any]:
    """The trial's model and data pool, cached in ``resources`` (models within its budget)."""
    options = canonical_json(dict(case.options))
    pkey = (case.modality, case.data, spec.data_path, options)
    mkey = (case.modality, case.model, case.data, options, spec.seed, str(device))
    if pkey not in resources.pools:
        resources.pools[pkey] = kit.load_pool(case, data_path=spec.data_path)
    model = resources.model(mkey, lambda: kit.load_model(case, device=device,
                                                         generator=make_generator(derive_seed(spec.seed, "model"))))
    return model, resources.pools[pkey]


def simulate(case: Case, kit: Kit, *, model: nn.Module, pool: Any, prior_kind: str, device: torch.device,
             data_generator: torch.Generator, client_generator: torch.Generator,
             threat: ThreatModel | None = None, keep_batch: bool = False) -> Trial:
    """Sample a client batch, compute its (defended) update, check it is finite, hand the
    server's view (``threat``, default the case's) to the attacker and the truth to the scorer.
    ``keep_batch`` also returns the batch (for oracle tests; the runner never asks for it)."""
    batch, truth = kit.sample(pool, case, model=model, device=device, generator=data_generator)
    defenses = [build_defense(d) for d in case.defenses]
    update = client_update(model, batch, kit.loss_fn, case.protocol, defenses=defenses, generator=client_generator)
    check_finite(update.tensors, what="client update")
    obs = observe(update, threat or case.threat)
    del update  # the attacker sees only the observation
    prior = kit.make_prior(case, model, prior_kind, device=device)
    return Trial(AttackerView(obs, model, prior), truth, batch if keep_batch else None)


def score(kit: Kit, reconstruction: Reconstruction, truth: Any, *, case: Case) -> tuple[dict[str, float], str]:
    """The one scoring step: the kit's metrics as plain floats, and the alignment rule."""
    metrics, alignment = kit.score(reconstruction, truth, case=case)
    return {k: float(v) for k, v in metrics.items()}, alignment


def prepare_trial(p: Prepared, kit: Kit, resources: Resources, *, device: torch.device) -> Trial:
    """A prepared spec -> its trial, with the runner's seeds (model, data, client)."""
    model, pool = load_inputs(p.spec, p.case, kit, resources, device=device)
    s = p.spec
    return simulate(p.case, kit, model=model, pool=pool, prior_kind=p.attack.info.prior, device=device,
                    data_generator=make_generator(derive_seed(s.seed, s.trial, "data")),
                    client_generator=make_generator(derive_seed(s.seed, s.trial, "client")))


# -- records -----------------------------------------------------------------------------------
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def record_header(p: Prepared, *, device: torch.device) -> dict[str, Any]:
    """The parts of a trial's record known before it runs (identity, provenance, config)."""
    info = p.attack.info
    return {
        "schema": SCHEMA_VERSION, "run_id": p.run_id, "created": now(), **provenance(str(device)),
        "case": p.case_dict,
        "attack": {"name": info.name, "preset": p.preset, "config": config_dict(p.attack.config),
                   "citation": info.citation, "requires": sorted(info.requires)},
        "seed": p.spec.seed, "trial": p.spec.trial,
        **({"data_source": p.data_source} if p.data_source else {}),
    }


def failure_record(p: Prepared, *, device: torch.device, error: str, wall_s: float = 0.0) -> dict[str, Any]:
    """A failed record for a trial whose worker died (crash, kill) before reporting."""
    record = record_header(p, device=device)
    record.update(status="failed", metrics={}, error=error, cost={"wall_s": wall_s})
    return record


def run_trial(trial: Prepared | TrialSpec, *, device: str | torch.device = "cpu", out_dir: str | Path | None = None,
              resources: Resources | None = None) -> dict:
    """Run one trial and return its record (status ok or failed; never raises for attack errors)."""
    p = trial if isinstance(trial, Prepared) else prepare(trial)
    dev = resolve_device(device)
    resources = resources or Resources()
    record = record_header(p, device=dev)
    t0 = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        kit = make_kit(p.case.modality)
        t = prepare_trial(p, kit, resources, device=dev)
        a = t.attacker
        s = p.spec
        t_attack = time.perf_counter()
        rec = p.attack.reconstruct(a.observation, a.model, a.prior,
                                   generator=make_generator(derive_seed(s.seed, s.trial, "attack")))
        attack_s = time.perf_counter() - t_attack
        metrics, alignment = score(kit, rec, t.truth, case=p.case)
        record.update(status="ok", error=None, metrics=metrics, alignment=alignment,
                      attack_stats={k: float(v) for k, v in rec.stats.items()})
        if out_dir is not None and "save_artifacts" in kit.optional:
            art_dir = Path(out_dir) / "artifacts" / p.run_id.split(":")[1][:16]
            record["artifacts"] = kit.save_artifacts(rec, t.truth, case=p.case, directory=art_dir)
        record["cost"] = {"wall_s": time.perf_counter() - t0, "attack_s": attack_s}
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the runner is the one place that records failures
        record.update(status="failed", metrics={}, error=f"{type(e).__name__}: {e}",
                      traceback=traceback.format_exc(limit=20))
        record["cost"] = {"wall_s": time.perf_counter() - t0}
    record["cost"]["peak_rss_mb"] = _peak_rss_mb()
    if dev.type == "cuda":
        record["cost"]["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return record
