"""What ``python -m eval audit`` needs besides the tensors: the clients' protocol, the
encoding (tabular schema), the labels, the ground truth, and optionally the user's own model.

Every check here runs before any attack and fails with one line (``UserError``) naming the
problem and the fix: an unknown protocol asks for ``--protocol`` rather than assuming the
case's defaults; a capture whose encoding differs from the audit's is refused; a model that
lacks what the tabular attacks need (a first ``nn.Linear`` reading the encoded row, a last
``nn.Linear`` giving the class logits) is refused.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from common.case import Case
from common.types import ClientUpdate, FLProtocol

from .capture import FIT_CONFIG_ALIASES, Capture
from .errors import UserError

PROTOCOL_HELP = "--protocol 'fedavg lr=0.01 epochs=1 batch_size=32' (or --protocol fedsgd for gradients)"


# -- protocol -------------------------------------------------------------------------------------
def parse_protocol(text: str) -> dict:
    """``fedsgd`` | ``fedsgd lr=0.1`` | ``fedavg lr=0.01 epochs=1 batch_size=32 [shuffle=false]``
    (commas or spaces; keys in any spelling of ``FIT_CONFIG_ALIASES``) -> header protocol fields.
    A FedSGD client that returns weights (a delta) took one full-batch step of ``lr``."""
    tokens = [t for t in re.split(r"[\s,]+", text.strip()) if t]
    if not tokens or tokens[0] not in ("fedsgd", "fedavg"):
        raise UserError(f"--protocol {text!r}: start with fedsgd or fedavg, e.g. {PROTOCOL_HELP}")
    kind, out = tokens[0], {}
    alias = {n: f for f, names in FIT_CONFIG_ALIASES.items() for n in names}
    for t in tokens[1:]:
        k, eq, v = t.partition("=")
        if not eq or k not in alias:
            raise UserError(f"--protocol {text!r}: {t!r} is not KEY=VALUE with KEY one of lr, epochs, batch_size, "
                            f"shuffle, loss_reduction")
        f = alias[k]
        try:
            out[f] = {"local_lr": float, "local_epochs": int, "local_batch_size": int,
                      "shuffle": lambda s: {"true": True, "false": False}[s.lower()], "loss_reduction": str}[f](v)
        except (ValueError, KeyError):
            raise UserError(f"--protocol {text!r}: bad value {v!r} for {k}") from None
    if kind == "fedsgd":
        if "local_epochs" in out or "local_batch_size" in out:
            raise UserError(f"--protocol {text!r}: fedsgd takes only lr (one full-batch step); use fedavg for "
                            f"epochs/batch_size")
        return {"kind": "fedsgd", **out}
    missing = [k for k, f in (("lr", "local_lr"), ("epochs", "local_epochs")) if f not in out]
    if missing:
        raise UserError(f"--protocol {text!r}: fedavg needs {' and '.join(missing)}, e.g. {PROTOCOL_HELP}")
    return {"kind": "fedavg", **out}


def capture_protocol(cap: Capture, given: dict | None) -> tuple[FLProtocol, str]:
    """The protocol of one capture and where it came from (``capture`` | ``--protocol``)."""
    h = cap.header
    n = int(h["num_examples"])
    proto = h.get("protocol")
    source = "capture"
    if h["kind"] == "gradient":
        proto = {**(proto or {}), "kind": "fedsgd", "batch_size": n}
        source = "capture" if h.get("protocol") else "capture (gradient: FedSGD, B = num_examples)"
    elif not proto:
        if given is None:
            missing = (h.get("meta") or {}).get("protocol_missing")
            why = f" (its fit config lacks {', '.join(missing)})" if missing else ""
            raise UserError(f"{cap.path}: how the client trained is unknown{why}; the audit does not assume the "
                            f"case's defaults: pass {PROTOCOL_HELP}")
        proto, source = dict(given), "--protocol"
        if proto["kind"] == "fedsgd":  # weights after one full-batch step of lr
            if "local_lr" not in proto:
                raise UserError(f"{cap.path}: a delta needs the learning rate: --protocol 'fedsgd lr=...'")
            proto = {**proto, "kind": "fedavg", "local_epochs": 1, "local_batch_size": None}
    proto = {**proto, "batch_size": n}
    return FLProtocol(**{k: v for k, v in proto.items() if v is not None}), source


def shuffle_known(cap: Capture) -> bool | None:
    p = cap.header.get("protocol") or {}
    return p.get("shuffle") if "shuffle" in p else None


def client_update(cap: Capture, protocol: FLProtocol, *, classes: tuple[str, ...] | None) -> ClientUpdate:
    h = cap.header
    labels = h.get("labels")
    if labels is not None and labels and isinstance(labels[0], str):
        if not classes:
            raise UserError(f"{cap.path}: labels must be class ids for this case (it has no class names)")
        unknown = sorted(set(labels) - set(classes))
        if unknown:
            raise UserError(f"{cap.path}: labels must be class ids or the schema's class names {list(classes)}; "
                            f"{unknown[:3]} are neither")
        labels = [classes.index(v) for v in labels]
    lens = h.get("seq_lens")
    return ClientUpdate(kind=h["kind"], tensors=cap.update, num_examples=int(h["num_examples"]),
                        labels=torch.tensor(labels) if labels is not None else None, protocol=protocol,
                        seq_lens=tuple(int(n) for n in lens) if lens else None)


# -- encoding (tabular) ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Encoding:
    source: str  # "given" (--schema) | "declared" (the capture's schema.json) | "assumed" (the case's)
    fingerprint: str
    warning: str | None = None


def resolve_encoding(case: Case, caps: list[Capture]) -> tuple[Case, Encoding | None]:
    """The tabular encoding (or speech front end) to audit with. ``--schema`` wins; else the
    one the captures declare; else the case's own, with a warning that it is assumed."""
    if case.modality == "speech":
        return _resolve_frontend(case, caps)
    if case.modality != "tabular":
        return case, None
    from tableak.schema import load_schema, schema_fingerprint

    from .schema_cli import case_schema

    def fp(path) -> str:
        try:
            return schema_fingerprint(load_schema(path))
        except ValueError as e:
            raise UserError(str(e)) from None

    def assumed() -> Encoding:
        schema = case_schema(case)
        return Encoding("assumed", schema_fingerprint(schema), (
            f"the captures declare no encoding; the case's encoding (width {schema.dim}: column order, sorted "
            f"categories, whole-table standardisation) is assumed. If the federation encoded its rows otherwise "
            f"the results are meaningless: encode with `python -m eval schema export {case.name}` and pass "
            f"--schema (or CapturingStrategy(schema=...))"))

    return _resolve(case, caps, option="schema", what="encoding", fingerprint=fp, assumed=assumed)


def _resolve_frontend(case: Case, caps: list[Capture]) -> tuple[Case, Encoding]:
    """``resolve_encoding`` for speech: the front end (option ``frontend``, a JSON file)."""
    from speechleak.frontend import load_frontend

    from .schema_cli import case_frontend, frontend_fingerprint

    def fp(path) -> str:
        try:
            return frontend_fingerprint(load_frontend(path))
        except ValueError as e:
            raise UserError(f"{path}: {str(e).strip().splitlines()[0]}") from None

    def assumed() -> Encoding:
        fe = case_frontend(case)
        return Encoding("assumed", frontend_fingerprint(fe), (
            f"the captures declare no speech front end; the case's ({fe.kind}, {fe.sample_rate} Hz, n_fft {fe.n_fft}, "
            f"hop {fe.hop}, {fe.n_mels} mel bins {fe.f_min:g}-{fe.f_max:g} Hz, natural-log scaling) is assumed. If the "
            f"federation computed its features otherwise the results are meaningless: export it with `python -m eval "
            f"schema export {case.name}`, edit it to the federation's, and pass --schema"))

    return _resolve(case, caps, option="frontend", what="speech front end", fingerprint=fp, assumed=assumed)


def _resolve(case: Case, caps: list[Capture], *, option: str, what: str, fingerprint, assumed) -> tuple[Case, Encoding]:
    """given (``case.options[option]``, from --schema) > declared by the captures (all the same) >
    ``assumed()`` (the case's own, with its warning)."""
    declared = {c.path: (c.schema_path, fingerprint(c.schema_path)) for c in caps if c.schema_path is not None}
    if case.options.get(option):
        given = fingerprint(case.options[option])
        bad = [p for p, (_, f) in declared.items() if f != given]
        if bad:
            raise UserError(f"{bad[0]}: the capture declares another {what} than --schema ({declared[bad[0]][1]} "
                            f"vs {given}); audit with --schema {declared[bad[0]][0]}")
        return case, Encoding("given", given)
    if declared:
        if len({f for _, f in declared.values()}) > 1:
            raise UserError(f"the captures declare different {what}s; audit each group of clients separately "
                            f"with its --schema")
        path, f = next(iter(declared.values()))
        return replace(case, options={**case.options, option: str(path)}), Encoding("declared", f)
    return case, assumed()


def check_truth(case: Case, cap: Capture) -> None:
    """A tabular ground-truth CSV must hold the schema's columns and label (before any attack)."""
    if case.modality != "tabular" or cap.truth_path is None:
        return
    import pandas as pd

    from eval.schema_cli import case_schema
    from tableak.schema import frame_for_schema

    schema = case_schema(case)
    try:
        df = pd.read_csv(cap.truth_path)
        rows = frame_for_schema(df, schema, source=f"ground truth {cap.truth_path}")
    except (ValueError, OSError, pd.errors.ParserError) as e:
        raise UserError(f"{str(e).strip().splitlines()[0]}; the truth file holds the client's rows in the schema's "
                        f"columns, label {schema.label!r} as a class name or id") from None
    if len(rows) != len(df):
        raise UserError(f"ground truth {cap.truth_path}: {len(df) - len(rows)} rows have empty cells")


def normalised_truth(case: Case, path: Path, directory: Path) -> Path:
    """The truth rows as the kit reads them: schema columns, label as class names."""
    import pandas as pd

    from eval.schema_cli import case_schema
    from tableak.schema import frame_for_schema

    directory.mkdir(parents=True, exist_ok=True)
    out = directory / "truth.csv"
    frame_for_schema(pd.read_csv(path), case_schema(case)).to_csv(out, index=False)
    return out


# -- the user's own model -------------------------------------------------------------------------
def is_factory(spec: str | None) -> bool:
    return bool(spec) and ":" in spec and not Path(spec).exists() and "/" not in spec.split(":")[0]


def load_factory(spec: str) -> Callable[[], nn.Module]:
    mod, _, name = spec.partition(":")
    try:
        obj: Any = importlib.import_module(mod)
    except ImportError as e:
        raise UserError(f"--model {spec!r}: cannot import {mod!r} ({e}); run from the folder that holds it or put it "
                        f"on PYTHONPATH") from None
    for part in name.split("."):
        if not hasattr(obj, part):
            raise UserError(f"--model {spec!r}: {mod!r} has no attribute {name!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"--model {spec!r}: {name!r} is not callable; give a function or class returning an nn.Module")
    return obj


def user_tabular_model(spec: str, *, dim: int, num_classes: int) -> nn.Module:
    """``package.module:factory()`` as a model the tabular attacks can use: its first layer must
    be an ``nn.Linear`` reading the ``dim`` encoded columns (what the tabular attacks invert) and
    its last an ``nn.Linear`` giving the ``num_classes`` logits (label recovery reads its
    gradient). The module gets ``last`` and ``penultimate`` (the last layer's input) as the
    suite's own ``FullyConnected`` has them; its parameter names are kept."""
    model = load_factory(spec)()
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {spec!r}: the factory returned {type(model).__name__}, not a torch nn.Module")
    layers = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]
    if not layers or not isinstance(layers[0], nn.Linear) or layers[0].in_features != dim:
        first = type(layers[0]).__name__ if layers else "no layer"
        raise UserError(f"--model {spec!r}: the tabular attacks need a first nn.Linear layer reading the {dim} encoded "
                        f"columns; the model's first layer is {first}"
                        + (f" with {layers[0].in_features} inputs" if layers and isinstance(layers[0], nn.Linear) else ""))
    last = layers[-1]
    if not isinstance(last, nn.Linear) or last.out_features != num_classes or last.bias is None:
        raise UserError(f"--model {spec!r}: the tabular attacks need a last nn.Linear layer (with bias) giving the "
                        f"{num_classes} class logits; the model's last layer is {type(last).__name__}")

    def penultimate(x: torch.Tensor) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        h = last.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
        try:
            model(x)
        finally:
            h.remove()
        return seen[0]

    object.__setattr__(model, "last", last)  # plain attributes: not registered, names unchanged
    object.__setattr__(model, "penultimate", penultimate)
    return model.eval()


def load_into(model: nn.Module, capture):
    """Copy captured parameters into ``model`` by name (all trainable parameters must be present).

    ``capture`` is a ``Capture`` or a plain ``{name: tensor}`` of the parameters before. Entries
    of the model's ``state_dict()`` that are not parameters (buffers such as BatchNorm statistics,
    tied copies such as GPT-2's ``lm_head.weight``; Flower's ``ArrayRecord(model.state_dict())``
    sends them) are loaded (buffers) or skipped (tied copies) and left out of the returned
    capture, whose tensors are then keyed exactly by ``named_parameters()``."""
    from .capture import Capture

    before = capture.before if isinstance(capture, Capture) else capture
    params = dict(model.named_parameters())
    state = model.state_dict()
    side = [n for n in before if n not in params and n in state]
    if side:
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for n in side:
                if n in buffers and buffers[n].shape == before[n].shape:
                    buffers[n].copy_(before[n].to(buffers[n].dtype))
        before = {k: v for k, v in before.items() if k not in side}
    missing = [n for n, p in params.items() if p.requires_grad and n not in before]
    extra = [n for n in before if n not in params]
    if missing or extra:
        def show(names: list[str]) -> str:
            return ", ".join(names) if len(names) <= 12 else f"{', '.join(names[:6])} ... ({len(names)} names)"

        raise UserError(f"capture does not fit the model: the model's parameters missing from the capture: "
                        f"[{show(missing)}]; capture tensors the model lacks: [{show(extra)}] (capture names must be "
                        f"the model's named_parameters(): pass param_names=[n for n, _ in model.named_parameters()] "
                        f"to CapturingStrategy, and audit with the case (or --model) that built the model)")
    with torch.no_grad():
        for n, t in before.items():
            if params[n].shape != t.shape:
                hint = ""
                if t.dim() == 2 and params[n].dim() == 2 and t.shape[0] == params[n].shape[0]:
                    hint = (f"; the input width differs ({t.shape[1]} vs {params[n].shape[1]}): the federation "
                            f"encoded its inputs otherwise (tabular encoding, speech front end), pass its --schema")
                raise UserError(f"capture tensor {n!r} has shape {tuple(t.shape)}, the model expects "
                                f"{tuple(params[n].shape)}{hint}")
            params[n].copy_(t.to(params[n].dtype))
    if isinstance(capture, Capture) and side:
        from dataclasses import replace as _replace

        return _replace(capture, before=before, update={k: v for k, v in capture.update.items() if k not in side})
    return capture
