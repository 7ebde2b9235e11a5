"""Suite files (TOML): cases x attacks x batch sizes x defenses x seeds x trials."""
from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path

from common.case import Case

from .catalog import catalog
from .errors import UserError
from .runner import TrialSpec

RUN_KEYS = {"case", "attacks", "batch_sizes", "seeds", "trials", "set", "defenses", "data", "model", "options",
            "protocol", "attack_set"}


def load_suite(path: str | Path) -> list[TrialSpec]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"suite file {str(path)!r} not found; see eval/suites/ for examples")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"suite file {path}: invalid TOML ({e})") from None
    runs = doc.get("run")
    if not isinstance(runs, list) or not runs:
        raise UserError(f"suite file {path}: needs at least one [[run]] table with case and attacks")
    specs: list[TrialSpec] = []
    for i, run in enumerate(runs):
        bad = set(run) - RUN_KEYS
        if bad:
            raise UserError(f"suite file {path}, run {i}: unknown keys {sorted(bad)}; allowed: {sorted(RUN_KEYS)}")
        if "case" not in run or "attacks" not in run:
            raise UserError(f"suite file {path}, run {i}: needs 'case' and 'attacks'")
        try:
            base: Case = catalog().cases.get(run["case"])
        except KeyError as e:
            raise UserError(str(e)) from None
        if "model" in run:
            base = replace(base, model=run["model"])
        if "options" in run:
            base = replace(base, options={**base.options, **run["options"]})
        if "protocol" in run:
            try:
                base = replace(base, protocol=replace(base.protocol, **run["protocol"]))
            except (TypeError, ValueError) as e:
                raise UserError(f"suite file {path}, run {i}: bad protocol ({e})") from None
        sizes = run.get("batch_sizes", [base.protocol.batch_size])
        stacks = run.get("defenses", [list(base.defenses)])
        overrides = {k: _as_str(v) for k, v in run.get("set", {}).items()}
        per_attack = run.get("attack_set", {})
        for b in sizes:
            for stack in stacks:
                case = replace(base.with_batch_size(int(b)), defenses=tuple(dict(d) for d in stack))
                for attack in run["attacks"]:
                    ov = dict(overrides)
                    ov.update({k: _as_str(v) for k, v in per_attack.get(attack, {}).items()})
                    for seed in run.get("seeds", [0]):
                        for trial in range(int(run.get("trials", 1))):
                            specs.append(TrialSpec(case, attack, int(seed), trial, ov, run.get("data")))
    return specs


def _as_str(v) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v))
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)
