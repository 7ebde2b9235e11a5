"""Suite files (TOML): cases x attacks x batch sizes x defenses x seeds x trials, and the checks
of a case's inputs shared with the command line (options, ``--model``, user data)."""
from __future__ import annotations

import importlib
import sys
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

from common.case import Case

from .catalog import catalog
from .errors import UserError
from .runner import TrialSpec

RUN_KEYS = {"case", "attacks", "batch_sizes", "seeds", "trials", "set", "defenses", "data", "model", "options",
            "protocol", "attack_set"}

#: modality -> (cases module, attribute) declaring the case options its kit reads; the module's
#: ``TAKES_MODEL`` says whether the kit reads ``case.model``. Other (plugin) modalities are not checked.
_DECLARATIONS = {"tabular": ("tableak.cases", "OPTIONS"), "text": ("textleak.cases", "OPTIONS"),
                 "text-lora": ("textleak.cases", "LORA_OPTIONS"), "speech": ("speechleak.cases", "OPTIONS")}


def declared(modality: str) -> tuple[frozenset[str] | None, bool]:
    """(accepted option keys or None when undeclared, whether ``--model`` applies) of a modality."""
    entry = _DECLARATIONS.get(modality)
    if entry is None:
        return None, True
    mod = importlib.import_module(entry[0])
    return frozenset(getattr(mod, entry[1])), bool(getattr(mod, "TAKES_MODEL", True))


def check_options(case: Case, keys: Iterable[str], *, where: str) -> None:
    allowed, _ = declared(case.modality)
    unknown = sorted(set(keys) - allowed) if allowed is not None else []
    if unknown:
        raise UserError(f"{where}: the {case.modality} case {case.name!r} reads no option {', '.join(unknown)} "
                        f"(it would be ignored); accepted options: {', '.join(sorted(allowed))}")


def check_model(case: Case, *, where: str) -> None:
    if not declared(case.modality)[1]:
        raise UserError(f"{where}: the {case.modality} case {case.name!r} builds its own model, so the model "
                        f"would be ignored; drop it (or pick a text case)")


def check_user_data(case: Case, data: str | None, *, batch_size: int) -> None:
    """Data problems that would otherwise surface only inside a trial: a text file without a
    sentence within the case's token limit, speech clips longer than the case's window."""
    if not data:
        return
    try:
        if case.modality == "speech" and Path(data).is_dir():
            from speechleak.data import check_clip_lengths

            warning = check_clip_lengths(data, seconds=float(case.options.get("seconds", 1.0)),
                                         task=str(case.options.get("task", "kws")))
            if warning:
                print(f"warning: --data {data}: {warning}", file=sys.stderr)
        elif case.modality in ("text", "text-lora") and Path(data).is_file():
            from textleak.data import check_usable
            from textleak.models import tokenizer_for

            limit = case.options.get("max_tokens")
            check_usable(data, tokenizer=tokenizer_for(case.model), max_tokens=None if limit is None else int(limit),
                         batch_size=batch_size)
    except (ValueError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"case {case.name!r}: {msg}") from None


def _fail(path: Path, i: int, msg: str) -> UserError:
    return UserError(f"suite file {path}, run {i}: {msg}")


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool))


def _int_list(run: dict, key: str, *, minimum: int, path: Path, i: int) -> list[int] | None:
    if key not in run:
        return None
    v = run[key]
    if not isinstance(v, list) or not v or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise _fail(path, i, f"{key} must be a non-empty list of integers, e.g. {key} = [{max(minimum, 1)}], "
                             f"not {v!r}")
    if min(v) < minimum:
        raise _fail(path, i, f"{key} must be >= {minimum}, got {min(v)}")
    return v


def _overrides(v: Any, what: str, path: Path, i: int) -> dict[str, str]:
    if not isinstance(v, dict):
        raise _fail(path, i, f"{what} must be a table of config values, e.g. {what} = {{ iterations = 100 }}")
    for k, x in v.items():
        if not (_is_scalar(x) or (isinstance(x, list) and all(_is_scalar(y) for y in x))):
            raise _fail(path, i, f"{what}.{k} must be a number, string, boolean or list of them, not {x!r}")
    return {k: _as_str(x) for k, x in v.items()}


def _defense_stacks(v: Any, path: Path, i: int) -> list[tuple[dict, ...]]:
    from common.defenses import build_defense

    example = 'defenses = [[{name = "gaussian", sigma = 0.01}]]'
    if not isinstance(v, list) or not v or not all(isinstance(s, list) for s in v):
        raise _fail(path, i, f"defenses must be a list of defense stacks, e.g. {example}")
    for stack in v:
        for d in stack:
            if not isinstance(d, dict) or not isinstance(d.get("name"), str):
                raise _fail(path, i, f"each defense is a table with a name, e.g. {example}; got {d!r}")
            try:
                build_defense(d)  # constructs the (cheap) defense object: unknown names, bad parameters
            except (KeyError, ValueError, TypeError) as e:
                msg = str(e).strip("'\"")
                raise _fail(path, i, f"defense {d!r}: {msg}") from None
    return [tuple(dict(d) for d in stack) for stack in v]


def _check_types(run: dict, path: Path, i: int) -> None:
    for key in ("case", "data", "model"):
        if key in run and not isinstance(run[key], str):
            raise _fail(path, i, f"{key} must be a string, not {run[key]!r}")
    a = run["attacks"]
    if not isinstance(a, list) or not a or not all(isinstance(x, str) and x for x in a):
        raise _fail(path, i, f'attacks must be a non-empty list of names, e.g. attacks = ["idlg"], not {a!r}')
    t = run.get("trials", 1)
    if not isinstance(t, int) or isinstance(t, bool) or t < 1:
        raise _fail(path, i, f"trials must be an integer >= 1, e.g. trials = 2, not {t!r}")
    for key in ("options", "protocol"):
        if key in run and not isinstance(run[key], dict):
            raise _fail(path, i, f"{key} must be a table, e.g. {key} = {{ ... }}, not {run[key]!r}")
    per = run.get("attack_set", {})
    if not isinstance(per, dict) or not all(isinstance(v, dict) for v in per.values()):
        raise _fail(path, i, 'attack_set must be a table of tables, e.g. attack_set = { idlg = { iterations = 10 } }')
    stray = sorted(set(per) - set(a))
    if stray:
        raise _fail(path, i, f"attack_set names {stray}, which are not in attacks {a}")


def load_suite(path: str | Path) -> list[TrialSpec]:
    """The suite's trials; every structural problem, unknown option or defense is a UserError
    naming the file and run index (attack configs are resolved by the runner before any trial)."""
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
            raise _fail(path, i, f"unknown keys {sorted(bad)}; allowed: {sorted(RUN_KEYS)}")
        if "case" not in run or "attacks" not in run:
            raise _fail(path, i, "needs 'case' and 'attacks'")
        _check_types(run, path, i)
        try:
            base: Case = catalog().cases.get(run["case"])
        except KeyError as e:
            raise _fail(path, i, str(e)) from None
        where = f"suite file {path}, run {i}"
        if "model" in run:
            check_model(base, where=where)
            base = replace(base, model=run["model"])
        if "options" in run:
            check_options(base, run["options"], where=where)
            base = replace(base, options={**base.options, **run["options"]})
        if "protocol" in run:
            try:
                base = replace(base, protocol=replace(base.protocol, **run["protocol"]))
            except (TypeError, ValueError) as e:
                raise _fail(path, i, f"bad protocol ({e})") from None
        sizes = _int_list(run, "batch_sizes", minimum=1, path=path, i=i) or [base.protocol.batch_size]
        seeds = _int_list(run, "seeds", minimum=0, path=path, i=i) or [0]
        stacks = _defense_stacks(run["defenses"], path, i) if "defenses" in run else [tuple(dict(d) for d in base.defenses)]
        overrides = _overrides(run.get("set", {}), "set", path, i)
        per_attack = {a: _overrides(v, f"attack_set.{a}", path, i) for a, v in run.get("attack_set", {}).items()}
        check_user_data(base, run.get("data"), batch_size=max(sizes))
        for b in sizes:
            for stack in stacks:
                case = replace(base.with_batch_size(int(b)), defenses=stack)
                for attack in run["attacks"]:
                    ov = {**overrides, **per_attack.get(attack, {})}
                    for seed in seeds:
                        for trial in range(int(run.get("trials", 1))):
                            specs.append(TrialSpec(case, attack, int(seed), trial, ov, run.get("data")))
    return specs


def _as_str(v) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v))
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)
