"""``python -m eval``: list, run, bench, leaderboard."""
from __future__ import annotations

import argparse
import os
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
    """The named case with the command line's --model / --label / --option applied; a flag the
    case's kit would ignore is refused."""
    from .suite import check_model, check_options

    try:
        case = _catalog().cases.get(args.case)
    except KeyError as e:
        raise UserError(f"{e}; run `python -m eval list cases`") from None
    if args.model:
        check_model(case, where="--model")
        case = replace(case, model=args.model)
    if args.label and not args.data:
        raise UserError("--label names the label column of a CSV given with --data; pass --data FILE.csv too, "
                        "or drop --label")
    options = _parse_set(getattr(args, "option", None) or [], flag="--option")
    if args.label:
        options = {"label": args.label, **options}
    check_options(case, options, where="--option" if set(options) - {"label"} else "--label")
    if options:
        case = replace(case, options={**case.options, **options})
    return case


def _check_counts(args) -> None:
    """Numbers that must be positive (or non-negative) are refused before any work."""
    for flag, attr, low in (("--batch-size", "batch_size", 1), ("--trials", "trials", 1), ("--seed", "seed", 0),
                            ("--limit", "limit", 1), ("--workers", "workers", 1)):
        v = getattr(args, attr, None)
        if v is not None and v < low:
            raise UserError(f"{flag} {v}: must be >= {low}" + ("; leave it out to use the case's own batch size"
                                                                if attr == "batch_size" else ""))


def _check_out(out: str) -> None:
    """``--out`` must be (or become) a writable directory; refused before any trial runs."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise UserError(f"--out {out!r} is an existing file; give a directory (created if missing)")
    anc = p
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise UserError(f"--out {out!r} lies under the file {str(anc)!r}; give a directory path")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UserError(f"--out {out!r}: {str(anc)!r} is not writable; give a directory you can write to")
    rec = p / "records.jsonl"
    if rec.exists() and (rec.is_dir() or not os.access(rec, os.W_OK)):
        raise UserError(f"--out {out!r}: {str(rec)!r} is not a writable file; give another --out directory")


def cmd_run(args) -> int:
    from .runner import TrialSpec, run_many
    from .suite import check_user_data

    _check_counts(args)
    _schema_option(args)
    case = _case_from_args(args)
    if args.batch_size is not None:
        case = case.with_batch_size(args.batch_size)
    if args.data and not Path(args.data).exists():
        raise UserError(f"--data {args.data!r}: no such file or directory")
    _check_out(args.out)
    device = _device(args.device)
    check_user_data(case, args.data, batch_size=case.protocol.batch_size)
    overrides = _parse_set(args.set)
    specs = [TrialSpec(case, args.attack, args.seed, t, overrides, args.data) for t in range(args.trials)]
    records = run_many(specs, out_dir=args.out, device=device, resume=args.resume, progress=not args.quiet)
    return _finish(args.out, records)


def _device(name: str) -> str:
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
    elif name != "cpu":
        raise UserError(f"--device {name!r}: use cpu or cuda")
    return name


def _finish(out: str, records: list[dict], *, audit: bool = False) -> int:
    """Print the leaderboard of ``out``; exit 0 when every trial of this invocation is ok, else 1."""
    from .leaderboard import aggregate, render_markdown
    from .records import RECORDS_FILE, load_records

    n_fail = sum(r["status"] == "failed" for r in records)
    all_records = load_records([Path(out) / RECORDS_FILE])
    if all_records and audit:
        from .audit_report import render

        print(render(all_records))
    elif all_records:
        print(render_markdown(aggregate(all_records)))
    print(f"{len(records)} trials run ({n_fail} failed); records in {Path(out) / RECORDS_FILE}", file=sys.stderr)
    if n_fail:
        print(f"error: {n_fail} of {len(records)} trials failed (status 'failed' in the records, with the error); "
              f"exit code 1", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args) -> int:
    from .runner import run_many
    from .suite import load_suite

    _check_counts(args)
    _check_out(args.out)
    device = _device(args.device)
    if args.seed_offset < 0:
        raise UserError(f"--seed-offset {args.seed_offset}: give an offset >= 0 (evaluation runs use 1000)")
    specs = load_suite(args.suite)
    if args.seed_offset:
        specs = [replace(s, seed=s.seed + args.seed_offset) for s in specs]
    if args.limit is not None:
        specs = specs[: args.limit]
    records = run_many(specs, out_dir=args.out, device=device, resume=args.resume, progress=not args.quiet,
                       executor=args.executor, workers=args.workers, address=args.address)
    return _finish(args.out, records)


def cmd_leaderboard(args) -> int:
    from .leaderboard import RENDERERS, aggregate
    from .records import load_records

    for p in args.paths:
        if not Path(p).exists():
            raise UserError(f"{p!r}: no such records file or directory")
    if args.output and Path(args.output).is_dir():
        raise UserError(f"-o {args.output!r} is a directory; give a file name")
    records = load_records(args.paths)
    if not records:
        raise UserError(f"no records found under {', '.join(args.paths)}; run `python -m eval run ... --out DIR` first")
    rows = aggregate(records)
    if args.primary and not any(args.primary in r.metrics for r in rows):
        known = sorted({k for r in rows for k in r.metrics})
        raise UserError(f"unknown metric {args.primary!r} for --primary; these records have: {', '.join(known)}")
    if args.format == "md" and not args.primary and all("capture" in r["case"] for r in records):
        from .audit_report import render  # audit records: one table per (round, case), a client column

        text = render(records)
    else:
        text = RENDERERS[args.format](rows, args.primary)
    if args.output:
        out = Path(args.output)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
        except OSError as e:
            raise UserError(f"-o {args.output!r}: cannot write ({e.strerror or e}); give a writable file path") from None
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def cmd_audit(args) -> int:
    from .audit import audit
    from .audit_inputs import is_factory, parse_protocol

    _check_counts(args)
    factory = None
    if is_factory(args.model) or (args.model and Path(args.model).is_dir()):
        # the user's own model: package.module:factory or a local HF directory (architecture only)
        factory, args.model = args.model, None
    _schema_option(args)
    case = _case_from_args(args)
    if args.model and case.modality == "text":  # a kit name or a cached HF id: refused up front when unknown
        from .audit_models import load_tokenizer

        load_tokenizer(args.model, flag="--model")
    if args.data:
        case = replace(case, data=args.data)
    _check_out(args.out)
    protocol = parse_protocol(args.protocol) if args.protocol else None
    records = audit(args.captures, attack=args.attack, case=case, out_dir=args.out, overrides=_parse_set(args.set),
                    device=_device(args.device), seed=args.seed, resume=args.resume, protocol=protocol,
                    model=factory, tokenizer=args.tokenizer)
    return _finish(args.out, records, audit=True)


def cmd_schema(args) -> int:
    from .schema_cli import export

    case = _case_from_args(args)
    if args.data:
        case = replace(case, data=args.data)
    export(case)
    return 0


def _schema_option(args) -> None:
    """``--schema FILE`` becomes a case option (``schema_cli.schema_option``)."""
    if getattr(args, "schema", None):
        from .schema_cli import schema_option

        cases = _catalog().cases
        modality = getattr(cases.get(args.case), "modality", None) if args.case in cases.names() else None
        args.option = [*(args.option or []), schema_option(modality, args.schema, case=args.case)]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=_prog(), description="gradleak: gradient-inversion attacks, runs and "
                                 "leaderboards. Exit codes: 0 all trials ok, 1 some trial failed, 2 bad input.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list attacks, presets, metrics or cases")
    p.add_argument("what", choices=["attacks", "presets", "metrics", "cases"])
    p.set_defaults(fn=cmd_list)

    p = sub.add_parser("run", help="run trials of one attack on one case")
    p.add_argument("--attack", required=True, help="preset or attack name (python -m eval list presets); required")
    p.add_argument("--case", required=True, help="case name (python -m eval list cases); required")
    p.add_argument("--data", help="your own data: a text file (one sentence per line), a CSV (with --label) or a "
                   "folder of WAV files (DIR/<keyword>/*.wav for keyword cases, x.wav + x.txt for CTC cases); "
                   "default: the case's bundled data")
    p.add_argument("--label", help="label column of a CSV given with --data (default: none; required for a CSV)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="case option for the kit, repeatable, e.g. categorical=col1,col2, drop=col or max_tokens=32 "
                   "(default: the case's options)")
    p.add_argument("--model", help="text cases: kit model name, HF model id (cached) or local model directory "
                   "(default: the case's model)")
    p.add_argument("--schema", help="tabular cases: the encoding as JSON (python -m eval schema export CASE); "
                   "fixes columns, categories and scaling whatever --data holds (default: inferred from the data)")
    p.add_argument("--batch-size", type=int, help="client batch size, >= 1 (default: the case's batch size)")
    p.add_argument("--trials", type=int, default=1, help="trials per seed, >= 1 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed, >= 0 (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override an attack config field, repeatable (default: the preset's config)")
    p.add_argument("--out", required=True, help="output directory for records.jsonl and artifacts; required")
    p.add_argument("--resume", action="store_true",
                   help="skip trials whose run id is already recorded (default: off)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: off)")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("bench", help="run a suite (TOML) of cases x attacks x seeds")
    p.add_argument("suite", help="suite file (eval/suites/*.toml); required")
    p.add_argument("--out", required=True, help="output directory for records.jsonl and artifacts; required")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="skip trials whose run id is already recorded (default: off)")
    p.add_argument("--limit", type=int, help="run only the first N >= 1 trials of the suite (default: all)")
    p.add_argument("--seed-offset", type=int, default=0,
                   help="add this to every seed of the suite; published tables use 1000 (evaluation seeds, see "
                   "python -m eval tables) (default: %(default)s)")
    p.add_argument("--executor", choices=["local", "process", "ray"], default="local",
                   help="local: in this process; process: a local worker pool; ray: one Ray task per trial "
                   "(default: %(default)s)")
    p.add_argument("--workers", type=int, help="worker processes (process) or CPUs for a local Ray instance, >= 1 "
                   "(default: the number of CPUs)")
    p.add_argument("--address", help="Ray cluster address, e.g. auto (default: start a local instance)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: off)")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("audit", help="run an attack on captured client updates (eval/capture.py format)")
    p.add_argument("captures", help="capture directory (e.g. written by eval.flower.CapturingStrategy); required")
    p.add_argument("--attack", required=True, help="preset or attack name; required")
    p.add_argument("--case", required=True,
                   help="the case whose model architecture and prior match the capture; required")
    p.add_argument("--data", help="public data source the kit needs for its prior (schema, tokenizer ...) "
                   "(default: the case's data)")
    p.add_argument("--label", help="label column when --data is a CSV (default: none)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="case option for the kit, repeatable (default: the case's options)")
    p.add_argument("--model", help="your own model (architecture only, weights come from the capture): "
                   "package.module:factory (a callable returning an nn.Module; tabular, text, speech) or, for text, "
                   "a local Hugging Face model directory (save_pretrained) (default: the case's model)")
    p.add_argument("--tokenizer", help="text cases: the federation's tokenizer, a directory (save_pretrained) or a "
                   "kit name such as gpt2 (default: the --model directory's, else the case's)")
    p.add_argument("--schema", help="tabular cases: the encoding, speech cases: the front end the federation used, "
                   "as JSON (python -m eval schema export CASE) (default: the case's, assumed with a warning)")
    p.add_argument("--protocol", help="how clients trained, when the capture does not say: fedsgd, or e.g. "
                   "'fedavg lr=0.01 epochs=1 batch_size=32' (default: the capture's header)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override an attack config field, repeatable (default: the preset's config)")
    p.add_argument("--seed", type=int, default=0, help="seed, >= 0 (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--out", required=True, help="output directory for records.jsonl; required")
    p.add_argument("--resume", action="store_true",
                   help="skip clients whose run id is already recorded (default: off)")
    p.set_defaults(fn=cmd_audit)

    p = sub.add_parser("schema", help="export a tabular case's encoding (columns, categories, scaling) or a speech "
                       "case's front end (sample rate, STFT, mel bins, log scaling) as JSON")
    p.add_argument("action", choices=["export"])
    p.add_argument("case", help="tabular or speech case name (python -m eval list cases); required")
    p.add_argument("--data", help="CSV or table the schema is built from (default: the case's data)")
    p.add_argument("--label", help="label column when --data is a CSV (default: none)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="case option, repeatable, e.g. categorical=col1,col2 (default: the case's options)")
    p.set_defaults(fn=cmd_schema, model=None)

    p = sub.add_parser("leaderboard", help="aggregate records into a leaderboard")
    p.add_argument("paths", nargs="+", help="records.jsonl files or directories (searched recursively); required")
    p.add_argument("--format", choices=["md", "csv", "html"], default="md", help="output format (default: %(default)s)")
    p.add_argument("--primary", help="metric to rank by (default: rouge2, accuracy, ... whichever the records have)")
    p.add_argument("--output", "-o", help="write to this file, creating its folder (default: stdout)")
    p.set_defaults(fn=cmd_leaderboard)

    from .report import add_parser as add_report
    from .tables import add_parser as add_tables
    from .utility import add_parser as add_utility

    add_report(sub)
    add_tables(sub)
    add_utility(sub)
    return ap


def _prog() -> str:
    """``gradleak`` when started as the installed console command, else ``python -m eval``."""
    return "gradleak" if Path(sys.argv[0]).name == "gradleak" else "python -m eval"


def console() -> None:
    """Entry point of the ``gradleak`` console command (``pip install .``)."""
    sys.exit(main())


def main(argv: list[str] | None = None) -> int:
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
