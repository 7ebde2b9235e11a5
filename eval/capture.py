"""Captured client updates on disk: the format ``python -m eval audit`` reads.

One directory per client update::

    CAPTURE_DIR/round-0001/client-<id>/
        header.json          {"format": "gradleak-capture/1", "kind": "delta" | "gradient",
                              "round": 1, "client_id": "<id>", "num_examples": 32,
                              "protocol": {"kind": "fedavg", "batch_size": 32, "local_epochs": 1,
                                           "local_batch_size": 32, "local_lr": 0.01,
                                           "loss_reduction": "mean", "shuffle": true | null} | null,
                              "labels": [0, 1, ...] | ["<=50K", ...] | null,  (only if the server knows them)
                              "seq_lens": [12, 9, ...] | null,      (text: tokens per example, if known)
                              "truth": "truth.csv" | null,          (optional ground truth, for scoring)
                              "schema": "schema.json" | null,       (tabular: the encoding the client used)
                              "before": "before.safetensors", "update": "update.safetensors"}
        before.safetensors   parameters the client received, keyed by parameter name
        update.safetensors   θ_before − θ_after (kind "delta") or the gradient (kind "gradient")

Tensors may also be ``.npz`` files (read with ``allow_pickle=False``). Nothing is ever
unpickled, so captures from untrusted parties are safe to load. ``before``, ``update`` and
``truth`` name files inside the client's folder (nothing outside it is ever opened); header
fields are type-checked and tensors must be finite before any attack runs. The format is
plain enough to write by hand from any FL framework: see ``write_capture``.

``protocol`` says how the client trained. ``null`` means unknown: a ``delta`` capture without
it is refused by the audit until ``--protocol`` says how the clients trained (a ``gradient``
capture is FedSGD with B = ``num_examples``). ``shuffle: null`` records that the client's
shuffle flag is unknown. ``protocol_from_config`` maps a server's fit config to the protocol
(``lr``/``learning_rate``, ``epochs``/``local_epochs``, ``batch_size``/``local_batch_size`` ...).
Parameter names in ``before``/``update`` are the model's ``named_parameters()`` names
(e.g. ``net.0.weight``, ``net.0.bias``, ... for the tabular cases' FC network).
"""
from __future__ import annotations

import json
import math
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from common.types import first_nonfinite

FORMAT = "gradleak-capture/1"
PROTOCOL_KEYS = {"kind", "batch_size", "local_epochs", "local_batch_size", "local_lr", "loss_reduction", "shuffle"}
_FILE_FIELDS = ("before", "update", "truth", "schema")
#: fit-config spellings -> protocol field (first match wins)
FIT_CONFIG_ALIASES: dict[str, tuple[str, ...]] = {
    "local_lr": ("local_lr", "lr", "learning_rate", "learning-rate", "client_lr", "eta"),
    "local_epochs": ("local_epochs", "epochs", "local-epochs", "num_epochs", "num-epochs", "n_epochs", "E"),
    "local_batch_size": ("local_batch_size", "batch_size", "local-batch-size", "batch-size", "bs", "B"),
    "shuffle": ("shuffle",),
    "loss_reduction": ("loss_reduction", "reduction"),
}


class CaptureError(ValueError):
    pass


@dataclass(frozen=True)
class Capture:
    path: Path
    header: dict[str, Any]
    before: dict[str, torch.Tensor]
    update: dict[str, torch.Tensor]

    @property
    def truth_path(self) -> Path | None:
        t = self.header.get("truth")
        return inside(self.path, t, field="truth") if t else None

    @property
    def schema_path(self) -> Path | None:
        t = self.header.get("schema")
        return inside(self.path, t, field="schema") if t else None


def inside(directory: Path, name: Any, *, field: str) -> Path:
    """``directory / name`` resolved, refused unless it stays inside ``directory``."""
    if not isinstance(name, str) or not name:
        raise CaptureError(f"{directory}/header.json: {field!r} must be a file name, got {name!r}")
    root = Path(directory).resolve()
    path = (root / name).resolve()
    if Path(name).is_absolute() or not path.is_relative_to(root):
        raise CaptureError(f"{directory}/header.json: {field} {name!r} points outside the client's folder; "
                           f"name a file inside {directory}")
    return path


def _save_tensors(path: Path, tensors: Mapping[str, Any]) -> None:
    from safetensors.torch import save_file

    save_file({k: torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v).detach().cpu().contiguous()
               for k, v in tensors.items()}, str(path))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CaptureError(f"capture tensor file {str(path)!r} is missing")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CaptureError(f"{path.name}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if path.suffix == ".npz":
        try:
            z = np.load(path, allow_pickle=False)
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise CaptureError(f"{path.name}: not a readable .npz file of numeric arrays ({e}); "
                               f"save the tensors with numpy.savez or as .safetensors") from None
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise CaptureError(f"{path.name}: holds a single array, not named tensors; save them with numpy.savez")
        out = {}
        with z:
            for k in z.files:
                try:
                    a = np.array(z[k])
                except ValueError:
                    raise CaptureError(f"{path.name}: array {k!r} is a pickled object array, which is never loaded; "
                                       f"save numeric arrays (e.g. numpy.savez with float32 tensors)") from None
                if a.dtype.kind not in "biuf":
                    raise CaptureError(f"{path.name}: array {k!r} has dtype {a.dtype}; save numeric arrays")
                out[k] = torch.from_numpy(a)
        return out
    raise CaptureError(f"{path.name}: tensors must be .safetensors or .npz")


def write_capture(root: str | Path, *, round: int, client_id: str, kind: str, before: Mapping[str, Any],
                  update: Mapping[str, Any], num_examples: int, protocol: Mapping[str, Any] | None = None,
                  labels: list[int] | list[str] | None = None, truth: str | Path | None = None,
                  schema: str | Path | None = None, meta: Mapping[str, Any] | None = None,
                  seq_lens: list[int] | None = None) -> Path:
    """Write one client's capture. ``truth`` (the client's rows, for scoring) and ``schema``
    (the encoding it used) are files anywhere: they are copied into the client's folder and
    named relative to it, so a capture folder is self-contained."""
    if kind not in ("delta", "gradient"):
        raise CaptureError("kind must be 'delta' or 'gradient'")
    d = Path(root) / f"round-{round:04d}" / f"client-{client_id}"
    d.mkdir(parents=True, exist_ok=True)
    _save_tensors(d / "before.safetensors", before)
    _save_tensors(d / "update.safetensors", update)
    truth = _copy_in(d, truth, "truth")
    schema = _copy_in(d, schema, "schema")
    header = {"format": FORMAT, "kind": kind, "round": round, "client_id": str(client_id),
              "num_examples": int(num_examples), "protocol": dict(protocol) if protocol else None,
              "labels": labels, "truth": truth, "before": "before.safetensors", "update": "update.safetensors",
              "meta": dict(meta or {})}
    if schema is not None:
        header["schema"] = schema
    if seq_lens is not None:
        header["seq_lens"] = [int(n) for n in seq_lens]
    (d / "header.json").write_text(json.dumps(header, indent=1, sort_keys=True))
    return d


def _copy_in(d: Path, path: str | Path | None, stem: str) -> str | None:
    """A file for the header: copied into ``d`` unless already there; its name relative to ``d``."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_absolute() and (d / p).is_file():
        p = d / p
    if not p.is_file():
        raise CaptureError(f"{stem} file {str(path)!r} does not exist")
    root = d.resolve()
    if p.resolve().is_relative_to(root):
        return str(p.resolve().relative_to(root))
    name = stem + p.suffix
    shutil.copyfile(p, d / name)
    return name


def protocol_from_config(config: Mapping[str, Any], *, num_examples: int,
                         loss_reduction: str | None = "mean") -> tuple[dict | None, list[str]]:
    """A FedAvg protocol from a server's fit config in any common spelling, and the fields it
    lacks. The learning rate and the local epochs must be known, else ``(None, missing)``: the
    audit then asks for ``--protocol`` rather than assume defaults. A missing batch size means
    one local batch of the whole client data; a missing ``shuffle`` is recorded as ``null``."""
    found: dict[str, Any] = {}
    for field_, names in FIT_CONFIG_ALIASES.items():
        for n in names:
            if n in config and config[n] is not None:
                found[field_] = config[n]
                break
    missing = [f for f in ("local_lr", "local_epochs") if f not in found]
    if missing:
        return None, missing
    shuffle = found.get("shuffle")
    if isinstance(shuffle, str):
        shuffle = {"true": True, "false": False, "1": True, "0": False}.get(shuffle.strip().lower())
    lb = found.get("local_batch_size")
    return {"kind": "fedavg", "batch_size": int(num_examples), "local_epochs": int(found["local_epochs"]),
            "local_batch_size": int(lb) if lb is not None else None, "local_lr": float(found["local_lr"]),
            "loss_reduction": str(found.get("loss_reduction", loss_reduction or "mean")),
            "shuffle": bool(shuffle) if shuffle is not None else None}, []


def read_capture(directory: str | Path) -> Capture:
    d = Path(directory)
    try:
        header = json.loads((d / "header.json").read_text())
    except FileNotFoundError:
        raise CaptureError(f"{d}: no header.json (see eval/capture.py for the format)") from None
    except json.JSONDecodeError as e:
        raise CaptureError(f"{d}/header.json is not valid JSON ({e})") from None
    if header.get("format") != FORMAT:
        raise CaptureError(f"{d}/header.json: format must be {FORMAT!r}, got {header.get('format')!r}")
    for key in ("kind", "num_examples", "before", "update"):
        if key not in header:
            raise CaptureError(f"{d}/header.json: missing field {key!r}")
    check_header(header, where=f"{d}/header.json")
    paths = {f: inside(d, header[f], field=f) for f in _FILE_FIELDS if header.get(f) is not None}
    before, update = _load_tensors(paths["before"]), _load_tensors(paths["update"])
    if set(before) != set(update):
        raise CaptureError(f"{d}: before and update tensors have different names")
    for k in before:
        if before[k].shape != update[k].shape:
            raise CaptureError(f"{d}: tensor {k!r} has shape {tuple(before[k].shape)} before but "
                               f"{tuple(update[k].shape)} in the update")
    for what, tensors in (("update", update), ("before", before)):
        bad = first_nonfinite(tensors)
        if bad is not None:
            raise CaptureError(f"{d}: {what} tensor {bad!r} holds NaN or Inf values; an update that is not finite "
                               f"cannot be attacked or scored (re-capture it)")
    return Capture(d, header, before, update)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_PROTOCOL_TYPES = {
    "kind": (lambda v: v in ("fedsgd", "fedavg"), "'fedsgd' or 'fedavg'"),
    "batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "local_epochs": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "local_batch_size": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1 or null"),
    "local_lr": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
                 "a finite number > 0"),
    "loss_reduction": (lambda v: v in ("mean", "sum"), "'mean' or 'sum'"),
    "shuffle": (lambda v: v is None or isinstance(v, bool), "true, false or null (unknown)"),
}


def check_header(header: dict, *, where: str) -> None:
    """Refuse header fields of the wrong type, naming the field and what it must be."""
    if header["kind"] not in ("delta", "gradient"):
        raise CaptureError(f"{where}: kind must be 'delta' or 'gradient'")
    n = header["num_examples"]
    if not _is_int(n) or n < 1:
        raise CaptureError(f"{where}: num_examples must be an integer >= 1, got {n!r}")
    labels = header.get("labels")
    if labels is not None and (not isinstance(labels, list) or not (all(_is_int(v) and v >= 0 for v in labels)
                                                                     or all(isinstance(v, str) for v in labels))):
        raise CaptureError(f"{where}: labels must be a list of class ids (integers >= 0) or of class names, "
                           f"or null, got {labels!r}")
    lens = header.get("seq_lens")
    if lens is not None and (not isinstance(lens, list) or len(lens) != n or not all(_is_int(v) and v >= 1 for v in lens)):
        raise CaptureError(f"{where}: seq_lens must be num_examples ({n}) token counts (integers >= 1) or null, "
                           f"got {lens!r}")
    for key in ("truth", "schema"):
        if header.get(key) is not None and not isinstance(header[key], str):
            raise CaptureError(f"{where}: {key} must be a file name or null, got {header[key]!r}")
    for key in ("round",):
        if header.get(key) is not None and not _is_int(header[key]):
            raise CaptureError(f"{where}: {key} must be an integer, got {header[key]!r}")
    proto = header.get("protocol")
    if proto is None:
        return
    if not isinstance(proto, dict):
        raise CaptureError(f"{where}: protocol must be an object or null, got {proto!r}")
    if set(proto) - PROTOCOL_KEYS:
        raise CaptureError(f"{where}: unknown protocol fields {sorted(set(proto) - PROTOCOL_KEYS)}")
    for key, value in proto.items():
        ok, what = _PROTOCOL_TYPES[key]
        if not ok(value):
            raise CaptureError(f"{where}: protocol.{key} must be {what}, got {value!r}")


def find_captures(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise CaptureError(f"capture directory {str(root)!r} does not exist")
    found = sorted(p.parent for p in root.rglob("header.json"))
    if not found:
        raise CaptureError(f"no captures (header.json files) under {root}")
    return found
