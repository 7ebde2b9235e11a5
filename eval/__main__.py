"""``python -m eval``: list, run, bench, leaderboard."""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from .errors import UserError


def _catalog():
    from .catalog import catalog

    return catalog()


def cmd_list(args) -> int:
    cat = _catalog()
    what = args.what
    if what == "attacks":
        for name in cat.attacks.names():
            cls = cat.attacks.get(name)
            req = ",".join(sorted(cls.info.requires))
            print(f"{name:24s} {cls.info.modality:11s} requires {req:40s} {cls.info.citation}")
    elif what == "presets":
        for name in cat.presets.names():
            p = cat.presets.get(name)
            print(f"{name:24s} -> {p.attack:22s} {p.description}")
    elif what == "metrics":
        for name in cat.metrics.names():
            m = cat.metrics.get(name)
            arrow = {True: "higher", False: "lower"}.get(m.higher_is_better, "-")
            print(f"{name:18s} {m.modality:8s} {arrow:6s} {','.join(m.outputs):30s} {m.description}")
    elif what == "cases":
        for name in cat.cases.names():
            c = cat.cases.get(name)
            print(f"{name:40s} {c.description}")
    return 0


def _parse_set(items: list[str], flag: str = "--set") -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"{flag} {item!r}: expected key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _case_from_args(args):
    """The named case with the command line's --model / --label / --option applied."""
    try:
        case = _catalog().cases.get(args.case)
    except KeyError as e:
        raise UserError(f"{e}; run `python -m eval list cases`") from None
    if args.model:
        case = replace(case, model=args.model)
    if args.label:
        case = replace(case, options={**case.options, "label": args.label})
    if getattr(args, "option", None):
        case = replace(case, options={**case.options, **_parse_set(args.option, flag="--option")})
    return case


def cmd_run(args) -> int:
    from .runner import TrialSpec, run_many

    case = _case_from_args(args)
    if args.batch_size:
        if args.batch_size < 1:
            raise UserError("--batch-size must be >= 1")
        case = case.with_batch_size(args.batch_size)
    if args.data and not Path(args.data).exists():
        raise UserError(f"--data {args.data!r}: no such file or directory")
    overrides = _parse_set(args.set)
    specs = [TrialSpec(case, args.attack, args.seed, t, overrides, args.data) for t in range(args.trials)]
    records = run_many(specs, out_dir=args.out, device=_device(args.device), resume=args.resume,
                       progress=not args.quiet)
    return _finish(args.out, records)


def _device(name: str) -> str:
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
    elif name != "cpu":
        raise UserError(f"--device {name!r}: use cpu or cuda")
    return name


def _finish(out: str, records: list[dict]) -> int:
    from .leaderboard import aggregate, render_markdown
    from .records import RECORDS_FILE, load_records

    n_fail = sum(r["status"] == "failed" for r in records)
    all_records = load_records([Path(out) / RECORDS_FILE])
    print(render_markdown(aggregate(all_records)))
    print(f"{len(records)} trials run ({n_fail} failed); records in {Path(out) / RECORDS_FILE}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from .runner import run_many
    from .suite import load_suite

    specs = load_suite(args.suite)
    if args.limit:
        specs = specs[: args.limit]
    records = run_many(specs, out_dir=args.out, device=_device(args.device), resume=args.resume,
                       progress=not args.quiet, executor=args.executor, workers=args.workers, address=args.address)
    return _finish(args.out, records)


def cmd_leaderboard(args) -> int:
    from .leaderboard import RENDERERS, aggregate
    from .records import load_records

    for p in args.paths:
        if not Path(p).exists():
            raise UserError(f"{p!r}: no such records file or directory")
    records = load_records(args.paths)
    if not records:
        raise UserError(f"no records found under {', '.join(args.paths)}; run `python -m eval run ... --out DIR` first")
    rows = aggregate(records)
    if args.primary and not any(args.primary in r.metrics for r in rows):
        known = sorted({k for r in rows for k in r.metrics})
        raise UserError(f"unknown metric {args.primary!r} for --primary; these records have: {', '.join(known)}")
    text = RENDERERS[args.format](rows, args.primary)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def cmd_audit(args) -> int:
    from .audit import audit

    case = _case_from_args(args)
    if args.data:
        case = replace(case, data=args.data)
    records = audit(args.captures, attack=args.attack, case=case, out_dir=args.out, overrides=_parse_set(args.set),
                    device=_device(args.device), seed=args.seed, resume=args.resume)
    return _finish(args.out, records)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m eval", description="gradleak: gradient-inversion attacks, runs and leaderboards")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list attacks, presets, metrics or cases")
    p.add_argument("what", choices=["attacks", "presets", "metrics", "cases"])
    p.set_defaults(fn=cmd_list)

    p = sub.add_parser("run", help="run trials of one attack on one case")
    p.add_argument("--attack", required=True, help="preset or attack name (python -m eval list presets)")
    p.add_argument("--case", required=True, help="case name (python -m eval list cases)")
    p.add_argument("--data", help="your own data: text file (one sentence per line), CSV (with --label), or WAV folder")
    p.add_argument("--label", help="label column of a CSV given with --data")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="case option for the kit, e.g. categorical=col1,col2 or max_tokens=32")
    p.add_argument("--model", help="HF model id (cached) or local model directory")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--trials", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an attack config field")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="skip trials whose run id is already recorded")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("bench", help="run a suite (TOML) of cases x attacks x seeds")
    p.add_argument("suite")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--limit", type=int, help="run only the first N trials of the suite")
    p.add_argument("--executor", choices=["local", "process", "ray"], default="local",
                   help="local: in this process; process: a local worker pool; ray: one Ray task per trial")
    p.add_argument("--workers", type=int, help="worker processes (process) or CPUs for a local Ray instance")
    p.add_argument("--address", help="Ray cluster address (e.g. auto); default: start a local instance")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("audit", help="run an attack on captured client updates (eval/capture.py format)")
    p.add_argument("captures", help="capture directory (e.g. written by eval.flower.CapturingStrategy)")
    p.add_argument("--attack", required=True)
    p.add_argument("--case", required=True, help="the case whose model architecture and prior match the capture")
    p.add_argument("--data", help="public data source the kit needs for its prior (schema, tokenizer ...)")
    p.add_argument("--label", help="label column when --data is a CSV")
    p.add_argument("--model", help="HF model id or local directory (architecture; weights come from the capture)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    p.set_defaults(fn=cmd_audit)

    p = sub.add_parser("leaderboard", help="aggregate records into a leaderboard")
    p.add_argument("paths", nargs="+", help="records.jsonl files or directories")
    p.add_argument("--format", choices=["md", "csv", "html"], default="md")
    p.add_argument("--primary", help="metric to rank by (default: rouge2, accuracy, ...)")
    p.add_argument("--output", "-o", help="write to this file instead of stdout")
    p.set_defaults(fn=cmd_leaderboard)
    return ap


def main(argv: list[str] | None = None) -> int:
    import os

    # keep library chatter (dataset progress bars, load reports) out of the CLI's output
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DATASETS_VERBOSITY", "critical")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if "datasets" in sys.modules:  # already imported (e.g. main() called in-process): set it directly
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyError as e:  # unknown registry names
        from common.registry import UnknownName

        if isinstance(e, UnknownName):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
