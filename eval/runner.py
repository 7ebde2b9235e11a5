"""The trial runner: the only place that holds ground truth and the observation together."""
from __future__ import annotations

import resource
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from common.attack import apply_overrides, config_dict
from common.case import Case
from common.defenses import build_defense
from common.fl import client_update
from common.observe import observe
from common.seed import derive_seed, make_generator

from .catalog import catalog
from .errors import UserError
from .records import RECORDS_FILE, SCHEMA_VERSION, append_record, canonical_json, completed_ids, now, provenance, run_id


@dataclass(frozen=True)
class TrialSpec:
    case: Case
    attack: str  # preset or attack name
    seed: int = 0
    trial: int = 0
    overrides: Mapping[str, Any] = field(default_factory=dict)
    data_path: str | None = None


@dataclass
class _Resources:
    """Per-process caches: models and data pools are loaded once per (case, seed)."""

    models: dict = field(default_factory=dict)
    pools: dict = field(default_factory=dict)


def effective_case(spec: TrialSpec) -> Case:
    """The case as the trial runs it: a user's ``--data`` replaces the case's data source."""
    return replace(spec.case, data=str(spec.data_path)) if spec.data_path else spec.case


def build_attack(name: str, overrides: Mapping[str, Any]):
    preset, cls, preset_overrides = catalog().resolve(name)
    try:
        config = apply_overrides(cls.default_config() if hasattr(cls, "default_config") else cls.Config(),
                                 preset_overrides)
        config = apply_overrides(config, overrides)
    except ValueError as e:
        raise UserError(str(e)) from None
    return preset, cls(config)


def check_threat(case: Case, attack) -> None:
    missing = case.threat.missing(attack.info.requires)
    if missing:
        raise UserError(
            f"attack {attack.info.name!r} needs {', '.join(sorted(missing))}, which the threat model "
            f"{case.threat.name!r} of case {case.name!r} does not grant; pick a case that grants it"
        )
    kind_needed = "gradients" if case.protocol.kind == "fedsgd" else "weight_delta"
    if kind_needed not in case.threat.grants:
        raise UserError(f"case {case.name!r} sends {kind_needed} but its threat model does not grant it")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def prepare(spec: TrialSpec, *, device: str) -> tuple[str, Any, dict, str]:
    """Resolve the attack and check the threat model; returns (preset, attack, case dict, run id)."""
    preset, attack = build_attack(spec.attack, spec.overrides)
    check_threat(spec.case, attack)
    case_d = effective_case(spec).to_dict()
    rid = run_id(case=case_d, attack=preset, config=config_dict(attack.config), seed=spec.seed, trial=spec.trial)
    return preset, attack, case_d, rid


def record_header(spec: TrialSpec, *, device: str) -> tuple[dict[str, Any], Any]:
    """The parts of a trial's record known before it runs (identity, provenance, config)."""
    preset, attack, case_d, rid = prepare(spec, device=device)
    record: dict[str, Any] = {
        "schema": SCHEMA_VERSION, "run_id": rid, "created": now(), **provenance(device),
        "case": case_d,
        "attack": {"name": attack.info.name, "preset": preset, "config": config_dict(attack.config),
                   "citation": attack.info.citation, "requires": sorted(attack.info.requires)},
        "seed": spec.seed, "trial": spec.trial,
    }
    return record, attack


def failure_record(spec: TrialSpec, *, device: str, error: str, wall_s: float = 0.0) -> dict[str, Any]:
    """A failed record for a trial whose worker died (crash, kill) before reporting."""
    record, _ = record_header(spec, device=device)
    record.update(status="failed", metrics={}, error=error, cost={"wall_s": wall_s})
    return record


def _load_inputs(spec: TrialSpec, case: Case, kit: Any, resources: _Resources, *, device: str) -> tuple[Any, Any]:
    """The trial's model and data pool, each loaded once per process (cached in ``resources``)."""
    options = canonical_json(dict(case.options))
    pkey = (case.modality, case.data, spec.data_path, options)
    mkey = (case.modality, case.model, case.data, options, spec.seed, device)
    if pkey not in resources.pools:
        resources.pools[pkey] = kit.load_pool(case, data_path=spec.data_path)
    if mkey not in resources.models:
        resources.models[mkey] = kit.load_model(case, device=torch.device(device),
                                                generator=make_generator(derive_seed(spec.seed, "model")))
    return resources.models[mkey], resources.pools[pkey]


def run_trial(spec: TrialSpec, *, device: str = "cpu", out_dir: str | Path | None = None,
              resources: _Resources | None = None) -> dict:
    """Run one trial and return its record (status ok or failed; never raises for attack errors)."""
    resources = resources or _Resources()
    record, attack = record_header(spec, device=device)
    case = effective_case(spec)
    dev = torch.device(device)
    t0 = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        kit = catalog().kits.get(case.modality)()
        model, pool = _load_inputs(spec, case, kit, resources, device=device)
        g_data = make_generator(derive_seed(spec.seed, spec.trial, "data"))
        batch, truth = kit.sample(pool, case, model=model, device=dev, generator=g_data)
        defenses = [build_defense(d) for d in case.defenses]
        update = client_update(model, batch, kit.loss_fn, case.protocol, defenses=defenses,
                               generator=make_generator(derive_seed(spec.seed, spec.trial, "client")))
        obs = observe(update, case.threat)
        del update, batch  # the attack below sees only the observation
        prior = kit.make_prior(case, model, attack.info.prior, device=dev)
        t_attack = time.perf_counter()
        rec = attack.reconstruct(obs, model, prior, generator=make_generator(derive_seed(spec.seed, spec.trial, "attack")))
        attack_s = time.perf_counter() - t_attack
        metrics, alignment = kit.score(rec, truth, case=case)
        record.update(status="ok", error=None, metrics={k: float(v) for k, v in metrics.items()},
                      alignment=alignment, attack_stats={k: float(v) for k, v in rec.stats.items()})
        if out_dir is not None and hasattr(kit, "save_artifacts"):
            art_dir = Path(out_dir) / "artifacts" / record["run_id"].split(":")[1][:16]
            record["artifacts"] = kit.save_artifacts(rec, truth, case=case, directory=art_dir)
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


USER_INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, LookupError, ImportError,
                     OSError)


def preload(specs: Sequence[TrialSpec], *, device: str, resources: _Resources) -> None:
    """Load every distinct data pool and model once, turning input problems into UserErrors."""
    for spec in specs:
        case = effective_case(spec)
        try:
            kit = catalog().kits.get(case.modality)()
        except KeyError as e:
            raise UserError(str(e)) from None
        try:
            _load_inputs(spec, case, kit, resources, device=device)
        except Exception as e:  # noqa: BLE001 - classify: user input problems become one-line errors
            if not (isinstance(e, USER_INPUT_ERRORS) or type(e).__module__.split(".")[0] in ("datasets", "pandas")):
                raise
            cause = e.__cause__ or e.__context__ or e
            if type(e).__module__.startswith("datasets") and cause is not e:
                msg = f"could not read the data file ({type(cause).__name__}: {cause})"
            else:
                msg = str(e)
            msg = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
            raise UserError(f"case {case.name!r}: {msg}") from None


def run_many(specs: Sequence[TrialSpec], *, out_dir: str | Path, device: str = "cpu", resume: bool = False,
             progress: bool = True, executor: str = "local", workers: int | None = None,
             address: str | None = None) -> list[dict]:
    """Run trials, appending one record each to ``out_dir/records.jsonl``.

    ``executor``: "local" (in this process), "process" (a pool of worker processes) or "ray"
    (one Ray task per trial). Whatever the executor, only this driver writes records, a
    worker that dies becomes a failed record, and ``resume`` skips recorded run ids. A trial
    listed twice (e.g. by suite tiers that repeat a cell with more trials) runs once.
    """
    from tqdm import tqdm

    from .executors import EXECUTORS

    out = Path(out_dir)
    path = out / RECORDS_FILE
    done = completed_ids(path) if resume else set()
    # resolve everything up front so user errors surface before any work
    prepared = [(s, prepare(s, device=device)[3]) for s in specs]
    todo = []
    for s, rid in prepared:
        if rid not in done:
            todo.append(s)
            done.add(rid)
    if executor not in EXECUTORS:
        raise UserError(f"unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}")
    resources = _Resources()
    preload(todo if executor == "local" else _distinct_inputs(todo), device=device, resources=resources)
    records = []
    bar = tqdm(total=len(todo), desc="trials", unit="trial", disable=not progress, dynamic_ncols=True)
    for spec, rec in EXECUTORS[executor](todo, device=device, out_dir=out, resources=resources, workers=workers,
                                         address=address):
        append_record(path, rec)
        records.append(rec)
        bar.update(1)
        bar.set_postfix_str(f"{spec.case.name} | {spec.attack} | seed {spec.seed} trial {spec.trial}")
        if rec["status"] == "failed":
            bar.write(f"trial failed ({spec.case.name}, {spec.attack}, trial {spec.trial}): {rec['error']}")
    bar.close()
    return records


def _distinct_inputs(specs: Sequence[TrialSpec]) -> list[TrialSpec]:
    """One spec per distinct (data, model, seed): enough to validate inputs in the driver."""
    seen, out = set(), []
    for s in specs:
        c = effective_case(s)
        key = (c.modality, c.model, c.data, canonical_json(dict(c.options)), s.seed)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out
