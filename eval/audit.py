"""``python -m eval audit``: run attacks on captured client updates (e.g. from a Flower federation).

For each capture (``eval/capture.py`` format) the case's kit builds the model architecture
(or the user's own: ``--model package.module:factory``, for text also a local Hugging Face
directory with ``--tokenizer``, checked against the attack's requirements before any attack:
``audit_models``), the captured *before* parameters are
loaded into it by name, the update becomes an ``Observation`` through the case's threat model,
and the attack runs. The protocol (FedSGD/FedAvg, B, E, lr) comes from the capture (or
``--protocol``), never from the case; a delta whose protocol is unknown is refused.

Honest output:

* every audit also runs the modality's random/prior baseline (``BASELINES``) on the same
  capture; with ground truth both are scored and a plain warning says when the attack is not
  better than the baseline (``audit_report.MARGIN``), recorded as ``baseline.verdict``;
* a tabular (speech) capture that declares no encoding (front end) is audited with the case's,
  with a warning that it is assumed (``encoding.source`` = assumed | declared | given);
* without ground truth the reconstruction is written decoded next to the raw tensors
  (``reconstruction.decoded.csv`` rows for tabular, ``reconstruction.txt`` lines for text,
  ``reconstruction_<k>.wav`` for speech).
"""
from __future__ import annotations

import hashlib
import json
import sys
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
from common.types import Observation

from .audit_inputs import (capture_protocol, check_truth, client_update, is_factory, load_into, normalised_truth,
                           resolve_encoding, shuffle_known, user_tabular_model)
from .audit_report import verdict
from .capture import Capture, CaptureError, find_captures, read_capture
from .errors import UserError
from .pipeline import check_modality, make_kit, resolve_attack, resolve_device, score
from .records import RECORDS_FILE, SCHEMA_VERSION, append_record, completed_ids, now, provenance, run_id

#: modality -> (baseline preset, the metric compared); the baseline's metrics are the mean of
#: ``BASELINE_DRAWS`` independent draws (a single draw on one row is too noisy to compare with).
#: Speech has none: a speech capture has no ground truth to score one with (no ``truth_from_file``).
BASELINES = {"tabular": ("tableak-random", "accuracy"), "text": ("text-prior", "rouge1"),
             "text-lora": ("text-prior", "rouge1")}
BASELINE_DRAWS = 8

__all__ = ["audit", "load_into", "delta_as_gradient", "BASELINES"]


def delta_as_gradient(obs: Observation) -> Observation:
    """A FedAvg delta of a single local step is lr · gradient: turn it into that gradient."""
    if obs.kind == "gradient":
        return obs
    p = obs.protocol
    if p is None or p.local_epochs != 1 or p.steps_per_epoch != 1:
        return obs
    return replace(obs, kind="gradient", tensors=delta_to_gradient(obs.tensors, p))


def _save_reconstruction(rec, directory: Path, *, schema=None) -> dict[str, str]:
    import pandas as pd

    directory.mkdir(parents=True, exist_ok=True)
    data = rec.data
    out = {}
    if isinstance(data, pd.DataFrame):
        path = directory / "reconstruction.csv"
        data.to_csv(path, index=False)
    elif isinstance(data, torch.Tensor):
        from safetensors.torch import save_file

        path = directory / "reconstruction.safetensors"
        save_file({"data": data.detach().cpu().contiguous()}, str(path))
        if schema is not None and data.dim() == 2 and data.shape[1] == schema.dim:
            frame = schema.decode(data)
            for f, _ in schema.continuous:
                if f.integer:
                    frame[f.name] = frame[f.name].round().astype("Int64")
            if rec.labels is not None and len(rec.labels) == len(frame):
                frame[schema.label] = [schema.classes[int(i)] if 0 <= int(i) < len(schema.classes) else None
                                       for i in rec.labels.tolist()]
            out["decoded"] = str(directory / "reconstruction.decoded.csv")
            frame.to_csv(out["decoded"], index=False)
    elif isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        from safetensors.torch import save_file

        path = directory / "reconstruction.safetensors"  # e.g. speech: features and waves
        save_file({k: v.detach().cpu().float().contiguous() for k, v in data.items()}, str(path))
        waves = data.get("waves")
        if waves is not None and waves.dim() == 2:
            from speechleak.data import write_wav

            files = [directory / f"reconstruction_{k}.wav" for k in range(waves.shape[0])]
            for f, w in zip(files, waves):
                write_wav(f, w.detach().cpu().float())
            out["decoded"] = str(files[0]) if len(files) == 1 else str(directory / "reconstruction_*.wav")
    else:
        path = directory / "reconstruction.json"
        path.write_text(json.dumps(data, default=str, indent=1))
        if isinstance(data, (list, tuple)) and all(isinstance(s, str) for s in data):
            out["decoded"] = str(directory / "reconstruction.txt")
            Path(out["decoded"]).write_text("".join(s.replace("\n", " ") + "\n" for s in data), encoding="utf-8")
    return {"reconstruction": str(path), **out}


def _read(d: Path) -> Capture:
    try:
        return read_capture(d)
    except CaptureError as e:
        raise UserError(str(e)) from None


def _schema(kit, case: Case):
    return kit.load_pool(case, data_path=None).schema if case.modality == "tabular" else None


def _user_model(case: Case, kit, model: str | None, *, tokenizer: str | None, attack: str):
    """The user's text or speech model (or a kit text model with another ``--tokenizer``), built
    and checked against the attack's requirements once, before any attack (``audit_models``)."""
    from . import audit_models as um

    if case.modality == "speech" and model is not None:
        if not um.is_factory(model):
            raise UserError(f"--model {model!r}: speech audits take your model as package.module:factory")
        from speechleak.kit import frontend_for, num_samples

        fe = frontend_for(case).config
        return um.user_speech_model(model, input_shape=(fe.n_features, fe.n_frames(num_samples(case))))
    if case.modality != "text" or (model is None and tokenizer is None):
        return None
    if model is not None:
        net = um.user_text_model(model, tokenizer=tokenizer)
    else:  # the case's own model read with the federation's tokenizer
        from textleak.models import attach, info_of

        net = kit.load_model(case, device=torch.device("cpu"), generator=make_generator(0))
        net = attach(net, replace(info_of(net), tokenizer=um.load_tokenizer(tokenizer)))
    um.check_text_model(net, attack, spec=model or case.model)
    return net


def audit(capture_dir: str | Path, *, attack: str, case: Case, out_dir: str | Path, overrides: dict[str, str],
          device: str = "cpu", seed: int = 0, resume: bool = False, protocol: dict | None = None,
          model: str | None = None, tokenizer: str | None = None, baseline: bool = True) -> list[dict]:
    """Audit every capture under ``capture_dir``; ``protocol`` (parsed ``--protocol``) fills in
    captures that do not say how the client trained; ``model`` is the user's own architecture
    (``package.module:factory``; for text also a local Hugging Face directory) and ``tokenizer``
    the text tokenizer (``--tokenizer``; default: the model's)."""
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
    if model is not None and case.modality not in ("tabular", "text", "speech"):
        raise UserError(f"--model: case {case.name!r} is {case.modality}; your own model is audited with tabular, "
                        f"text and speech cases")
    if model is not None and case.modality == "tabular" and not is_factory(model):
        raise UserError(f"--model {model!r}: tabular audits take your model as package.module:factory")
    if tokenizer is not None and case.modality != "text":
        raise UserError(f"--tokenizer is for text cases; case {case.name!r} is {case.modality}: drop it")
    # every capture is checked (paths, header types, finite tensors, protocol, encoding, truth) before any attack
    caps = [_read(d) for d in dirs]
    if Capability.SEQUENCE_LENGTHS in atk.info.requires:
        lacking = [c.path for c in caps if not c.header.get("seq_lens")]
        if lacking:
            raise UserError(f"{lacking[0]}: attack {atk.info.name!r} needs each example's token count, which the capture "
                            f"does not record: add \"seq_lens\": [n1, n2, ...] to its header.json (write_capture("
                            f"seq_lens=...)), or use dager, which needs none")
    protocols = [capture_protocol(c, protocol) for c in caps]
    case, encoding = resolve_encoding(case, caps)
    kit = make_kit(case.modality)
    try:
        schema = _schema(kit, case)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"case {case.name!r}: {str(e).strip().splitlines()[0]}") from None
    for c, (proto, _) in zip(caps, protocols):
        client_update(c, proto, classes=None if schema is None else schema.classes)  # labels map to classes
        check_truth(case, c)
    template = _user_model(case, kit, model, tokenizer=tokenizer, attack=atk.info.name)
    if encoding is not None and encoding.warning:
        print(f"warning: {encoding.warning}", file=sys.stderr)
    base = None
    if baseline and case.modality in BASELINES and BASELINES[case.modality][0] != preset:
        base = (*resolve_attack(BASELINES[case.modality][0], {}), BASELINES[case.modality][1])
    dev = resolve_device(device)
    out = Path(out_dir)
    path = out / RECORDS_FILE
    done = completed_ids(path) if resume else set()
    records = []
    for cap, (proto, proto_source) in tqdm(list(zip(caps, protocols)), desc="captures", unit="update"):
        d = cap.path
        digest = hashlib.sha256(json.dumps(cap.header, sort_keys=True).encode()).hexdigest()[:16]
        meta = cap.header.get("meta") or {}
        case_d = {**case.to_dict(), "protocol": proto.to_dict(),  # the capture's protocol, never the case's
                  "capture": {"path": str(d), "header_sha256": digest, "round": cap.header.get("round"),
                              "client_id": cap.header.get("client_id"), "partition_id": meta.get("partition_id")}}
        if model is not None:
            case_d["model"] = model
        if tokenizer is not None:
            case_d["tokenizer"] = tokenizer
        rid = run_id(case=case_d, attack=preset, config=config_dict(atk.config), seed=seed, trial=0)
        if rid in done:
            continue
        record: dict[str, Any] = {
            "schema": SCHEMA_VERSION, "run_id": rid, "created": now(), **provenance(str(dev)), "case": case_d,
            "attack": {"name": atk.info.name, "preset": preset, "config": config_dict(atk.config),
                       "citation": atk.info.citation, "requires": sorted(atk.info.requires)},
            "seed": seed, "trial": 0, "protocol_source": proto_source, "shuffle": shuffle_known(cap),
            "encoding": None if encoding is None else {"source": encoding.source, "fingerprint": encoding.fingerprint}}
        t0 = time.perf_counter()
        try:
            if template is not None:
                net = template.to(dev)  # every trainable parameter is overwritten by the capture's
            elif model is not None:
                net = user_tabular_model(model, dim=schema.dim, num_classes=len(schema.classes)).to(dev)
            else:
                net = kit.load_model(case, device=dev, generator=make_generator(derive_seed(seed, "model")))
            cap = load_into(net, cap)  # state_dict-only entries (buffers, tied copies) loaded, then set aside
            update = client_update(cap, proto, classes=None if schema is None else schema.classes)
            obs = observe(update, case.threat)
            runs = [(atk, obs, "attack")]
            if base is not None:
                runs.append((base[1], obs, "baseline"))
            art_dir = out / "artifacts" / rid.split(":")[1][:16]
            truth = None
            if cap.truth_path is not None and "truth_from_file" in kit.optional:
                tpath = normalised_truth(case, cap.truth_path, art_dir) if schema is not None else cap.truth_path
                truth = kit.truth_from_file(case, tpath, model=net)
            results = {}
            for a, o, role in runs:
                if Capability.GRADIENTS in a.info.requires:
                    o = delta_as_gradient(o)
                prior = kit.make_prior(case, net, a.info.prior, device=dev)
                draws = []
                for k in range(1 if role == "attack" or truth is None else BASELINE_DRAWS):
                    g = make_generator(derive_seed(seed, digest, role, *([k] if k else [])))
                    rec = a.reconstruct(o, net, prior, generator=g)
                    draws.append((rec, *(score(kit, rec, truth, case=case) if truth is not None else ({}, None))))
                m = {key: sum(d[1][key] for d in draws) / len(draws) for key in draws[0][1]}
                results[role] = (draws[0][0], m, draws[0][2])
            rec, metrics, alignment = results["attack"]
            record["artifacts"] = _save_reconstruction(rec, art_dir, schema=schema)
            record["attack_stats"] = {k: float(v) for k, v in rec.stats.items()}
            if truth is not None:
                record["alignment"] = alignment
                if "save_artifacts" in kit.optional:
                    record["artifacts"].update(kit.save_artifacts(rec, truth, case=case, directory=art_dir))
            if base is not None:
                key = base[2]
                bm = results["baseline"][1]
                record["baseline"] = {"preset": base[0], "metric": key, "metrics": bm, "value": bm.get(key),
                                      "verdict": verdict(metrics.get(key), bm.get(key)) if truth is not None
                                      else "no ground truth"}
            else:
                record["baseline"] = None
            record.update(status="ok", error=None, metrics=metrics, ground_truth=truth is not None)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            record.update(status="failed", metrics={}, error=f"{type(e).__name__}: {e}",
                          traceback=traceback.format_exc(limit=20))
        record["cost"] = {"wall_s": time.perf_counter() - t0}
        append_record(path, record)
        records.append(record)
    _warn(records)
    return records


def _warn(records: list[dict]) -> None:
    """One plain line per capture where the attack is not better than the baseline, and a summary."""
    bad = [r for r in records if (r.get("baseline") or {}).get("verdict") == "NOT better than baseline"]
    for r in bad:
        b, c = r["baseline"], r["case"]["capture"]
        print(f"warning: round {c['round']} client {c['client_id']}: {r['attack']['preset']} {b['metric']} "
              f"{r['metrics'].get(b['metric']):.3f} is not better than the {b['preset']} baseline "
              f"{b['value']:.3f} on the same capture", file=sys.stderr)
    pairs = [(r["metrics"].get(r["baseline"]["metric"]), r["baseline"]["value"]) for r in records
             if (r.get("baseline") or {}).get("verdict") in ("leaks", "NOT better than baseline")]
    if not pairs:
        return
    a, b = (sum(p[i] for p in pairs) / len(pairs) for i in (0, 1))
    if verdict(a, b) != "leaks":
        print(f"warning: over {len(pairs)} captures the attack ({a:.3f}) is NOT better than the random baseline "
              f"({b:.3f}): this audit shows nothing about leakage, not that the federation is safe. Check the "
              f"encoding (--schema), the protocol (--protocol) and the model before concluding anything",
              file=sys.stderr)
    elif bad:
        print(f"warning: on {len(bad)} of {len(records)} captures the attack is not better than the baseline "
              f"(over all captures: {a:.3f} vs {b:.3f})", file=sys.stderr)
