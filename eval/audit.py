"""``python -m eval audit``: run attacks on captured client updates (e.g. from a Flower federation).

For each capture (``eval/capture.py`` format) the case's kit builds the model architecture,
the captured *before* parameters are loaded into it by name, the update becomes an
``Observation`` through the case's threat model, and the attack runs. With ground truth
(``truth`` in the header and a kit that can read it) the usual metrics are computed;
without it the reconstruction is saved for inspection and the record has no metrics.
"""
from __future__ import annotations

import hashlib
import json
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from common.attack import config_dict
from common.case import Case
from common.grads import delta_to_gradient
from common.observe import observe
from common.seed import derive_seed, make_generator
from common.threat import Capability
from common.types import ClientUpdate, FLProtocol, Observation

from .capture import Capture, CaptureError, find_captures, read_capture
from .errors import UserError
from .pipeline import check_modality, make_kit, resolve_attack, resolve_device, score
from .records import RECORDS_FILE, SCHEMA_VERSION, append_record, completed_ids, now, provenance, run_id


def load_into(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Copy captured parameters into ``model`` by name (all trainable parameters must be present)."""
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in before]
    extra = [n for n in before if n not in params]
    if missing or extra:
        raise UserError(f"capture does not fit the case's model: missing {missing[:3]}, unexpected {extra[:3]} "
                        f"(pick the case whose model produced the capture)")
    with torch.no_grad():
        for n, t in before.items():
            if params[n].shape != t.shape:
                raise UserError(f"capture tensor {n!r} has shape {tuple(t.shape)}, the model expects {tuple(params[n].shape)}")
            params[n].copy_(t.to(params[n].dtype))


def delta_as_gradient(obs: Observation) -> Observation:
    """A FedAvg delta of a single local step is lr · gradient: turn it into that gradient."""
    if obs.kind == "gradient":
        return obs
    p = obs.protocol
    if p is None or p.local_epochs != 1 or p.steps_per_epoch != 1:
        return obs
    return replace(obs, kind="gradient", tensors=delta_to_gradient(obs.tensors, p))


def capture_update(cap: Capture) -> ClientUpdate:
    h = cap.header
    proto = FLProtocol(**h["protocol"]) if h.get("protocol") else None
    labels = torch.tensor(h["labels"]) if h.get("labels") is not None else None
    return ClientUpdate(kind=h["kind"], tensors=cap.update, num_examples=int(h["num_examples"]), labels=labels,
                        protocol=proto or FLProtocol("fedsgd" if h["kind"] == "gradient" else "fedavg",
                                                     batch_size=int(h["num_examples"])))


def _save_reconstruction(rec, directory: Path) -> dict[str, str]:
    import pandas as pd

    directory.mkdir(parents=True, exist_ok=True)
    data = rec.data
    if isinstance(data, pd.DataFrame):
        path = directory / "reconstruction.csv"
        data.to_csv(path, index=False)
    elif isinstance(data, torch.Tensor):
        from safetensors.torch import save_file

        path = directory / "reconstruction.safetensors"
        save_file({"data": data.detach().cpu().contiguous()}, str(path))
    else:
        path = directory / "reconstruction.json"
        path.write_text(json.dumps(data, default=str, indent=1))
    return {"reconstruction": str(path)}


def _read(d: Path) -> Capture:
    try:
        return read_capture(d)
    except CaptureError as e:
        raise UserError(str(e)) from None


def audit(capture_dir: str | Path, *, attack: str, case: Case, out_dir: str | Path, overrides: dict[str, str],
          device: str = "cpu", seed: int = 0, resume: bool = False) -> list[dict]:
    from tqdm import tqdm

    try:
        dirs = find_captures(capture_dir)
    except CaptureError as e:
        raise UserError(str(e)) from None
    preset, atk = resolve_attack(attack, overrides)
    check_modality(case, atk)
    missing = case.threat.missing(atk.info.requires - {Capability.GRADIENTS, Capability.WEIGHT_DELTA})
    if missing:
        raise UserError(f"attack {atk.info.name!r} needs {', '.join(sorted(missing))}, which case {case.name!r} does not grant")
    for d in dirs:  # every capture is checked (paths, header types, finite tensors) before any attack runs
        _read(d)
    kit = make_kit(case.modality)
    dev = resolve_device(device)
    out = Path(out_dir)
    path = out / RECORDS_FILE
    done = completed_ids(path) if resume else set()
    records = []
    for d in tqdm(dirs, desc="captures", unit="update"):
        cap = _read(d)
        digest = hashlib.sha256(json.dumps(cap.header, sort_keys=True).encode()).hexdigest()[:16]
        case_d = {**case.to_dict(), "capture": {"path": str(d), "header_sha256": digest,
                                                "round": cap.header.get("round"), "client_id": cap.header.get("client_id")}}
        rid = run_id(case=case_d, attack=preset, config=config_dict(atk.config), seed=seed, trial=0)
        if rid in done:
            continue
        record: dict[str, Any] = {
            "schema": SCHEMA_VERSION, "run_id": rid, "created": now(), **provenance(str(dev)), "case": case_d,
            "attack": {"name": atk.info.name, "preset": preset, "config": config_dict(atk.config),
                       "citation": atk.info.citation, "requires": sorted(atk.info.requires)},
            "seed": seed, "trial": 0}
        t0 = time.perf_counter()
        try:
            model = kit.load_model(case, device=dev, generator=make_generator(derive_seed(seed, "model")))
            load_into(model, cap.before)
            obs = observe(capture_update(cap), case.threat)
            if Capability.GRADIENTS in atk.info.requires:
                obs = delta_as_gradient(obs)
            prior = kit.make_prior(case, model, atk.info.prior, device=dev)
            rec = atk.reconstruct(obs, model, prior, generator=make_generator(derive_seed(seed, digest, "attack")))
            art_dir = out / "artifacts" / rid.split(":")[1][:16]
            record["artifacts"] = _save_reconstruction(rec, art_dir)
            record["attack_stats"] = {k: float(v) for k, v in rec.stats.items()}
            metrics: dict[str, float] = {}
            truth_path = cap.truth_path
            if truth_path is not None and "truth_from_file" in kit.optional:
                truth = kit.truth_from_file(case, truth_path, model=model)
                metrics, record["alignment"] = score(kit, rec, truth, case=case)
                if "save_artifacts" in kit.optional:
                    record["artifacts"].update(kit.save_artifacts(rec, truth, case=case, directory=art_dir))
            record.update(status="ok", error=None, metrics=metrics, ground_truth=truth_path is not None)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            record.update(status="failed", metrics={}, error=f"{type(e).__name__}: {e}",
                          traceback=traceback.format_exc(limit=20))
        record["cost"] = {"wall_s": time.perf_counter() - t0}
        append_record(path, record)
        records.append(record)
    return records
