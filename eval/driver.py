"""The driver loop: resolve every spec once, validate inputs, run trials through an executor,
and append one record per trial (the only record writer)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .errors import UserError
from .executors import EXECUTORS
from .pipeline import Prepared, Resources, TrialSpec, load_inputs, make_kit, prepare, resolve_device
from .records import RECORDS_FILE, append_record, canonical_json, completed_ids

USER_INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, LookupError, ImportError,
                     OSError)


def preload(prepared: Sequence[Prepared], *, device: torch.device, resources: Resources,
            progress: bool = False) -> None:
    """Load every distinct data pool and model once, turning input problems into UserErrors (the models that
    exceed ``resources.model_budget_mb`` are dropped again and reloaded by their trial). ``progress``: a bar over the
    trials' inputs (a case whose model is trained on load, e.g. ``speech/ctc-mel/fedsgd-trained``, takes minutes per
    seed here, before the first trial runs)."""
    from tqdm import tqdm

    for p in tqdm(prepared, desc="inputs", unit="trial", disable=not progress or len(prepared) < 2,
                  dynamic_ncols=True, leave=False):
        case = p.case
        kit = make_kit(case.modality)
        try:
            load_inputs(p.spec, case, kit, resources, device=device)
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


def run_many(specs: Sequence[TrialSpec], *, out_dir: str | Path, device: str | torch.device = "cpu",
             resume: bool = False, progress: bool = True, executor: str = "local", workers: int | None = None,
             address: str | None = None) -> list[dict]:
    """Run trials, appending one record each to ``out_dir/records.jsonl``.

    ``executor``: "local" (in this process), "process" (a pool of worker processes) or "ray"
    (one Ray task per trial). Whatever the executor, only this driver writes records, a
    worker that dies becomes a failed record, and ``resume`` skips recorded run ids. A trial
    listed twice (e.g. by suite tiers that repeat a cell with more trials) runs once.
    """
    from tqdm import tqdm

    dev = resolve_device(device)
    out = Path(out_dir)
    path = out / RECORDS_FILE
    done = completed_ids(path) if resume else set()
    # resolve every attack once, up front, so user errors surface before any work
    todo: list[Prepared] = []
    for s in specs:
        p = prepare(s)
        if p.run_id not in done:
            todo.append(p)
            done.add(p.run_id)
    if executor not in EXECUTORS:
        raise UserError(f"unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}")
    resources = Resources()
    preload(todo if executor == "local" else _distinct_inputs(todo), device=dev, resources=resources,
            progress=progress)
    records = []
    bar = tqdm(total=len(todo), desc="trials", unit="trial", disable=not progress, dynamic_ncols=True)
    for p, rec in EXECUTORS[executor](todo, device=dev, out_dir=out, resources=resources, workers=workers,
                                      address=address):
        spec = p.spec
        append_record(path, rec)
        records.append(rec)
        bar.update(1)
        bar.set_postfix_str(f"{spec.case.name} | {spec.attack} | seed {spec.seed} trial {spec.trial}")
        if rec["status"] == "failed":
            bar.write(f"trial failed ({spec.case.name}, {spec.attack}, trial {spec.trial}): {rec['error']}")
    bar.close()
    return records


def _distinct_inputs(prepared: Sequence[Prepared]) -> list[Prepared]:
    """One trial per distinct (data, model, seed): enough to validate inputs in the driver."""
    seen, out = set(), []
    for p in prepared:
        c = p.case
        key = (c.modality, c.model, c.data, canonical_json(dict(c.options)), p.spec.seed)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out
