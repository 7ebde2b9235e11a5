"""``python -m eval tables``: every published table regenerated from ``results/``, under the seed policy.

A published table is declared in ``eval/tables.toml`` (name, the suite that produces it, the results
folder its records are in, a title saying what the threat model grants). A table is built only
from records that satisfy the evidence policy:

* every seed is an evaluation seed (>= ``EVAL_SEED_MIN``; seeds below are for development and
  tuning and never published);
* every record is clean (its code matched a commit: see ``eval.records.code_state``) and all records
  of one results folder come from a single commit (a table may join several folders, ``results =
  ["a", "b"]``, e.g. a baseline run later on the same evaluation batches; each folder is checked on
  its own and the table names every folder's commit);
* every record succeeded or was recorded as skipped/failed (failures are counted, never dropped).

Tables are pure functions of records (the leaderboard's aggregation: trials deduplicated by
content, 95 % t-intervals). The numbers quoted in ``README.md`` and ``docs/*.md`` come from the same
aggregation: a block between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` (optionally
``<!-- table:NAME metrics=a,b -->`` to choose the metric columns, ``layout=pivot`` for one row per
attack and one column per batch size) is rewritten with a compact table of NAME (one row per setting
and attack), or with an "awaiting records" line while NAME has no
publishable records. ``--check`` writes nothing and fails when a committed ``docs/tables/*.md`` or a
marked block differs from what the generator produces now, or a marker names an undeclared table.
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from . import leaderboard as lb
from .errors import UserError
from .records import load_records

EVAL_SEED_MIN = 1000
ROOT = Path(__file__).resolve().parent.parent
SPEC_FILE = ROOT / "eval" / "tables.toml"
OUT_DIR = ROOT / "docs" / "tables"
#: Files whose marked blocks the generator fills (relative to the repository root).
MARKED_FILES = ("README.md", "docs/*.md")
MARKER = re.compile(r"(?<!`)<!-- table:(?P<name>[\w.-]+)(?P<opts>(?: +[\w-]+=[^\s>]+)*) -->\n"
                    r"(?P<body>.*?)<!-- /table:(?P=name) -->", re.S)


@dataclass(frozen=True)
class TableSpec:
    name: str
    suite: str
    results: str | tuple[str, ...]  # one results folder, or several joined (each from one commit)
    title: str
    primary: str | None = None
    metrics: tuple[str, ...] = ()  # the columns of the README/docs blocks (default: the primary metric)

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.results,) if isinstance(self.results, str) else tuple(self.results)

    @property
    def source_text(self) -> str:
        return ", ".join(f"`{s}`" for s in self.sources)


def load_specs(path: Path = SPEC_FILE) -> list[TableSpec]:
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    specs = []
    for i, t in enumerate(raw.get("table", [])):
        missing = {"name", "suite", "results", "title"} - set(t)
        if missing:
            raise UserError(f"{path}: table #{i + 1} lacks {', '.join(sorted(missing))}")
        unknown = set(t) - {"name", "suite", "results", "title", "primary", "metrics"}
        if unknown:
            raise UserError(f"{path}: table #{i + 1} has unknown field(s) {', '.join(sorted(unknown))}")
        if not isinstance(t["results"], str):
            if not (isinstance(t["results"], list) and t["results"] and all(isinstance(x, str) for x in t["results"])):
                raise UserError(f"{path}: table #{i + 1}: results must be a folder or a non-empty "
                                "list of folders")
            t = {**t, "results": tuple(t["results"])}
        specs.append(TableSpec(**{k: t[k] for k in ("name", "suite", "results", "title", "primary") if k in t},
                               metrics=tuple(t.get("metrics", ()))))
    return specs


def policy_problems(records: Sequence[dict]) -> list[str]:
    """Why these records may not be published (empty when they may)."""
    if not records:
        return ["no records"]
    out = []
    dev = sorted({r.get("seed") for r in records if not isinstance(r.get("seed"), int) or r["seed"] < EVAL_SEED_MIN},
                 key=str)
    if dev:
        out.append(f"{sum(r.get('seed') in dev for r in records)} record(s) on development seeds {dev[:5]}"
                   f"{'...' if len(dev) > 5 else ''} (published cells use seeds >= {EVAL_SEED_MIN})")
    dirty = sum(r.get("code", {}).get("dirty") is not False for r in records)
    if dirty:
        out.append(f"{dirty} record(s) from a dirty or unknown checkout (run from a clean commit)")
    commits = sorted({str(r.get("code", {}).get("git")) for r in records})
    if len(commits) > 1:
        out.append(f"records from {len(commits)} commits ({', '.join(c[:10] for c in commits[:4])}): "
                   "a table comes from one commit")
    return out


def render(spec: TableSpec, records: Sequence[dict]) -> str:
    rows = lb.aggregate(records)
    seeds = sorted({r["seed"] for r in records})
    head = [f"# {spec.title}", "",
            f"Generated by `python -m eval tables` from {spec.source_text} (suite `{spec.suite}`): "
            f"{len(lb.dedupe(records))} trials, seeds {seeds[0]}..{seeds[-1]}, {commit_text(records, clean=False)}. "
            "Mean ± 95 % t-interval over successful trials.", ""]
    body = lb.render_markdown(rows, spec.primary)
    if body.startswith("# "):  # the leaderboard's own title: this table has its own
        body = body.split("\n", 1)[1].lstrip("\n")
    return "\n".join(head) + body


def _load_one(path: Path) -> list[dict]:
    return load_records([path]) if path.exists() else []


def load(spec: TableSpec, root: Path = ROOT) -> list[dict]:
    return [r for src in spec.sources for r in _load_one(root / src)]


def problems_of(spec: TableSpec, root: Path = ROOT) -> tuple[list[dict], list[str]]:
    """(the table's records, the policy problems that stop it): each results folder is checked on its own."""
    recs, problems = [], []
    for src in spec.sources:
        part = _load_one(root / src)
        bad = policy_problems(part)
        problems += bad if len(spec.sources) == 1 else [f"{src}: {b}" for b in bad]
        recs += part
    return recs, problems


def commit_text(records: Sequence[dict], *, clean: bool = True) -> str:
    """``clean commit `x` `` (every commit, in order, when the table joins several results folders)."""
    commits = list(dict.fromkeys(str(r["code"]["git"]) for r in records))
    word = ("clean " if clean else "") + ("commit " if len(commits) == 1 else "commits ")
    return word + ", ".join(f"`{c}`" for c in commits)


def build(spec: TableSpec, root: Path = ROOT) -> tuple[str | None, list[str]]:
    """(markdown or None, the policy problems that stopped it)."""
    recs, problems = problems_of(spec, root)
    return (None, problems) if problems else (render(spec, recs), [])


#: Column headers of the README/docs blocks where the metric's name alone hides what it measures.
METRIC_LABELS = {"logmel_snr": "SNR dB-mel (dB)", "mel_snr": "SNR power mel (dB)", "snr": "SNR waveform (dB)"}


def _threat(case: dict) -> str:
    """What the threat model grants beyond the update and public facts (labels, sequence lengths)."""
    grants = set(case["threat"]["grants"])
    said = [name for g, name in (("labels", "labels"), ("seq_lens", "lengths")) if g in grants]
    if said:
        return f"{' and '.join(said)} granted"
    return "labels and lengths not granted" if case.get("modality") == "text" else "labels not granted"


def summary(spec: TableSpec, records: Sequence[dict], *, metrics: Sequence[str] | None = None,
            link: str | None = None) -> str:
    """The compact form of a table quoted in the README and docs: one row per (setting, attack) with
    the chosen metrics (default: the table's primary metric), n and seconds per batch."""
    rows = lb.aggregate(records)
    ranked = lb.tables(rows, spec.primary)
    keys = list(metrics or spec.metrics) or [spec.primary or ranked[0][2] or "accuracy"]
    seeds = sorted({r["seed"] for r in records})
    full = f"; full table: [{spec.name}]({link})" if link else ""
    defended = any(case["defenses"] for case, _, _ in ranked)
    out = [f"**{spec.title}.** Generated by `python -m eval tables` from {spec.source_text}: "
           f"{len(lb.dedupe(records))} trials, seeds {seeds[0]}..{seeds[-1]}, {commit_text(records)}; "
           f"mean ± 95 % t-interval over successful trials{full}.", "",
           lb._md_row(["setting", "B", "threat", *(["defense"] if defended else []), "attack", "n ok",
                       "n failed", *(METRIC_LABELS.get(k, k) for k in keys), "s/batch"]),
           "|" + "---|" * (len(keys) + 7 + defended)]
    for case, rs, _ in ranked:
        for r in rs:
            wall = "–" if r.wall_s is None else f"{r.wall_s:.1f}"
            out.append(lb._md_row([case["name"], str(case["protocol"]["batch_size"]), _threat(case),
                                   *([lb._defense_text(case)] if defended else []), r.preset, str(r.n_ok),
                                   str(r.n_failed), *(lb._fmt(r.metrics.get(k)) for k in keys), wall]))
    return "\n".join(out + [""])


def pivot(spec: TableSpec, records: Sequence[dict], *, metric: str | None = None, link: str | None = None) -> str:
    """The README form of a grid table: one row per (threat, defense, attack), and per dataset / model
    when the records hold more than one, one column per batch
    size, each cell the metric's mean ± 95 % t-interval (n per cell said once when it is uniform)."""
    rows = lb.aggregate(records)
    ranked = lb.tables(rows, spec.primary)
    key = metric or spec.primary or "accuracy"
    sizes = sorted({case["protocol"]["batch_size"] for case, _, _ in ranked})
    cells: dict[tuple, dict[int, Any]] = {}
    ns: set[int] = set()
    # a table over several datasets or models keeps them apart (one row each), never one cell for two
    multi = len({(case.get("data"), case.get("model")) for case, _, _ in ranked}) > 1
    for case, rs, _ in ranked:
        for r in rs:
            row = ((f"{case.get('data')} / {case.get('model')}",) if multi else ()) + (
                _threat(case), lb._defense_text(case) if case["defenses"] else "none", r.preset)
            cells.setdefault(row, {})[case["protocol"]["batch_size"]] = r
            ns.add(r.n_ok)
    seeds = sorted({r["seed"] for r in records})
    failed = sum(r.n_failed for c in cells.values() for r in c.values())
    uniform = len(ns) == 1
    each = f"n = {min(ns)} batches per cell" if uniform else "n per cell in brackets"
    full = f"; full table with every metric: [{spec.name}]({link})" if link else ""
    out = [f"**{spec.title}.** {METRIC_LABELS.get(key, key)}, mean ± 95 % t-interval, {each}, {failed} failed; "
           f"generated by `python -m eval tables` from {spec.source_text} ({len(lb.dedupe(records))} trials, seeds "
           f"{seeds[0]}..{seeds[-1]}, {commit_text(records)}){full}.", "",
           lb._md_row([*(["data / model"] if multi else []), "threat", "defense", "attack", *(f"B={b}" for b in sizes)]),
           "|" + "---|" * (3 + multi + len(sizes))]
    for row, by_b in sorted(cells.items()):
        vals = []
        for b in sizes:
            r = by_b.get(b)
            v = "–" if r is None else lb._fmt(r.metrics.get(key))
            vals.append(v if r is None or uniform else f"{v} ({r.n_ok})")
        out.append(lb._md_row([*row, *vals]))
    return "\n".join(out + [""])


def awaiting(spec: TableSpec, problems: Sequence[str]) -> str:
    why = "no records yet" if problems == ["no records"] else "; ".join(problems)
    return (f"*{spec.name}: awaiting evaluation-seed records ({why}): run `{spec.suite}` on seeds >= "
            f"{EVAL_SEED_MIN} from a clean commit into {spec.source_text}, then `python -m eval tables`.*")


def marked_files(root: Path = ROOT) -> list[Path]:
    return sorted({p for pat in MARKED_FILES for p in root.glob(pat) if p.is_file()})


def fill_markers(text: str, blocks) -> tuple[str, list[str]]:
    """``text`` with every marked block replaced by ``blocks(name, opts, old_body)``'s content, and the
    names of markers whose table is not declared (left as they are)."""
    unknown: list[str] = []

    def sub(m: re.Match) -> str:
        opts = dict(o.split("=", 1) for o in m["opts"].split())
        body = blocks(m["name"], opts, m["body"].removesuffix("\n"))
        if body is None:
            unknown.append(m["name"])
            return m[0]
        return f"<!-- table:{m['name']}{m['opts']} -->\n{body}\n<!-- /table:{m['name']} -->"

    return MARKER.sub(sub, text), unknown


def sync_markers(specs: Sequence[TableSpec], files: Sequence[Path], *, check: bool, root: Path = ROOT,
                 out_dir: Path = OUT_DIR, only: set[str] | None = None) -> list[str]:
    """Fill (or, with ``check``, compare) the marked blocks of ``files`` (those of the tables in
    ``only`` when given, the others left as they are); returns what is stale."""
    by_name = {s.name: s for s in specs}
    cache: dict[str, tuple[list[dict], list[str]]] = {}
    stale: list[str] = []
    for path in files:
        text = path.read_text(encoding="utf-8")

        def blocks(name: str, opts: dict, body: str, _path: Path = path) -> str | None:
            spec = by_name.get(name)
            if spec is None:
                return None
            bad = [f"{k}={opts[k]}" for k in sorted(set(opts) - {"metrics", "layout"})] + (
                [f"layout={opts['layout']}"] if opts.get("layout", "pivot") != "pivot" else [])
            if bad:  # left as it is and reported: a misspelt option would silently change the block
                stale.append(f"{_path}: marker table:{name} has unknown option(s) {', '.join(bad)} "
                             f"(options: metrics=a,b and layout=pivot)")
                return body
            if only is not None and name not in only:
                return body
            if name not in cache:
                cache[name] = problems_of(spec, root)
            recs, problems = cache[name]
            if problems:
                return awaiting(spec, problems)
            link = os.path.relpath(out_dir / f"{name}.md", _path.parent).replace(os.sep, "/")
            metrics = [m for m in opts.get("metrics", "").split(",") if m] or None
            if opts.get("layout") == "pivot":
                return pivot(spec, recs, metric=(metrics or [None])[0], link=link)
            return summary(spec, recs, metrics=metrics, link=link)

        new, unknown = fill_markers(text, blocks)
        stale += [f"{path}: marker table:{n} names no table in eval/tables.toml" for n in unknown]
        if len(re.findall(r"(?<!`)<!-- table:", text)) != len(MARKER.findall(text)):  # `quoted` ones are prose
            stale.append(f"{path}: a <!-- table:NAME --> marker has no matching <!-- /table:NAME --> on a later line")
        if new != text:
            if check:
                stale.append(f"{path}: a marked block differs from what the records give (run python -m eval tables)")
            else:
                path.write_text(new, encoding="utf-8")
                print(f"filled the marked blocks of {path}")
    return stale


def cmd_tables(args) -> int:
    specs = load_specs(Path(args.spec) if args.spec else SPEC_FILE)
    if args.only:
        unknown = set(args.only) - {s.name for s in specs}
        if unknown:
            raise UserError(f"tables: no table named {', '.join(sorted(unknown))}; see eval/tables.toml")
    all_specs = specs
    if args.only:
        specs = [s for s in specs if s.name in args.only]
    out_dir = Path(args.out) if args.out else OUT_DIR
    stale, built, refused = [], 0, 0
    for spec in specs:
        md, problems = build(spec)
        target = out_dir / f"{spec.name}.md"
        if md is None:
            refused += 1
            state = "awaiting records" if problems == ["no records"] else f"refused: {'; '.join(problems)}"
            print(f"{spec.name}: not published ({state})")
            if target.exists():
                stale.append(f"{target} exists but its records no longer satisfy the policy")
            continue
        built += 1
        if args.check:
            if not target.exists() or target.read_text(encoding="utf-8") != md:
                stale.append(f"{target} differs from what the records give (run python -m eval tables)")
        else:
            out_dir.mkdir(parents=True, exist_ok=True)
            target.write_text(md, encoding="utf-8")
            print(f"{spec.name}: wrote {target}")
    files = [Path(f) for f in args.docs] if args.docs else marked_files()
    stale += sync_markers(all_specs, files, check=args.check, out_dir=out_dir,
                          only={s.name for s in specs} if args.only else None)
    print(f"{built} table(s) built, {refused} awaiting evaluation-seed records")
    for s in stale:
        print(f"stale: {s}")
    return 1 if stale else 0


def add_parser(sub) -> None:
    p = sub.add_parser("tables", help="regenerate the published tables (docs/tables/) from results/")
    p.add_argument("--only", nargs="+", metavar="NAME", help="these tables only (default: all in eval/tables.toml)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a committed table is stale")
    p.add_argument("--spec", help="table list (default: eval/tables.toml)")
    p.add_argument("--out", help="output folder (default: docs/tables)")
    p.add_argument("--docs", nargs="+", metavar="FILE",
                   help="files whose <!-- table:NAME --> blocks are filled (default: README.md and docs/*.md)")
    p.set_defaults(fn=cmd_tables)
