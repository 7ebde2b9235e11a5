"""Captured client updates on disk: the format ``python -m eval audit`` reads.

One directory per client update::

    CAPTURE_DIR/round-0001/client-<id>/
        header.json          {"format": "gradleak-capture/1", "kind": "delta" | "gradient",
                              "round": 1, "client_id": "<id>", "num_examples": 32,
                              "protocol": {"kind": "fedavg", "batch_size": 32, "local_epochs": 1,
                                           "local_batch_size": 32, "local_lr": 0.01,
                                           "loss_reduction": "mean", "shuffle": true} | null,
                              "labels": [0, 1, ...] | null,         (only if the server knows them)
                              "truth": "truth.csv" | null,          (optional ground truth, for scoring)
                              "before": "before.safetensors", "update": "update.safetensors"}
        before.safetensors   parameters the client received, keyed by parameter name
        update.safetensors   θ_before − θ_after (kind "delta") or the gradient (kind "gradient")

Tensors may also be ``.npz`` files (read with ``allow_pickle=False``). Nothing is ever
unpickled, so captures from untrusted parties are safe to load. The format is plain enough
to write by hand from any FL framework: see ``write_capture``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

FORMAT = "gradleak-capture/1"
PROTOCOL_KEYS = {"kind", "batch_size", "local_epochs", "local_batch_size", "local_lr", "loss_reduction", "shuffle"}


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
        return (self.path / t) if t else None


def _save_tensors(path: Path, tensors: Mapping[str, Any]) -> None:
    from safetensors.torch import save_file

    save_file({k: torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v).detach().cpu().contiguous()
               for k, v in tensors.items()}, str(path))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CaptureError(f"capture tensor file {str(path)!r} is missing")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: torch.from_numpy(np.array(z[k])) for k in z.files}
    raise CaptureError(f"{path.name}: tensors must be .safetensors or .npz")


def write_capture(root: str | Path, *, round: int, client_id: str, kind: str, before: Mapping[str, Any],
                  update: Mapping[str, Any], num_examples: int, protocol: Mapping[str, Any] | None = None,
                  labels: list[int] | None = None, truth: str | None = None, meta: Mapping[str, Any] | None = None) -> Path:
    if kind not in ("delta", "gradient"):
        raise CaptureError("kind must be 'delta' or 'gradient'")
    d = Path(root) / f"round-{round:04d}" / f"client-{client_id}"
    d.mkdir(parents=True, exist_ok=True)
    _save_tensors(d / "before.safetensors", before)
    _save_tensors(d / "update.safetensors", update)
    header = {"format": FORMAT, "kind": kind, "round": round, "client_id": str(client_id),
              "num_examples": int(num_examples), "protocol": dict(protocol) if protocol else None,
              "labels": labels, "truth": truth, "before": "before.safetensors", "update": "update.safetensors",
              "meta": dict(meta or {})}
    (d / "header.json").write_text(json.dumps(header, indent=1, sort_keys=True))
    return d


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
    if header["kind"] not in ("delta", "gradient"):
        raise CaptureError(f"{d}/header.json: kind must be 'delta' or 'gradient'")
    proto = header.get("protocol")
    if proto is not None and set(proto) - PROTOCOL_KEYS:
        raise CaptureError(f"{d}/header.json: unknown protocol fields {sorted(set(proto) - PROTOCOL_KEYS)}")
    before, update = _load_tensors(d / header["before"]), _load_tensors(d / header["update"])
    if set(before) != set(update):
        raise CaptureError(f"{d}: before and update tensors have different names")
    for k in before:
        if before[k].shape != update[k].shape:
            raise CaptureError(f"{d}: tensor {k!r} has shape {tuple(before[k].shape)} before but "
                               f"{tuple(update[k].shape)} in the update")
    return Capture(d, header, before, update)


def find_captures(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise CaptureError(f"capture directory {str(root)!r} does not exist")
    found = sorted(p.parent for p in root.rglob("header.json"))
    if not found:
        raise CaptureError(f"no captures (header.json files) under {root}")
    return found
