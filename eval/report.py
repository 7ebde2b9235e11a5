"""``python -m eval report RUNS... -o report.html``: the auditor's report, one self-contained page.

It opens with what leaked, in plain words, per modality; then, per setting, the leaderboard table
(n, 95 % t-intervals, cost) and the reconstructions beside the originals (text with the differing
words marked, the tabular batch with wrong cells marked and per-feature accuracy, speech as audio
players and spectrograms); plots of each attack's primary metric against batch size and defense
strength, bounded metrics on their full range, with what was held fixed in the title. The page is
a pure function of the records and the artifacts the runs wrote (``--out`` folders).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from . import leaderboard as lb
from . import report_parts as rp
from .errors import UserError
from .records import RECORDS_FILE, iter_records

MAX_EXAMPLES = 2  # trials shown per (setting, attack)
MODALITIES = ("text", "tabular", "speech")


@dataclass
class Trial:
    record: dict
    artifacts: dict[str, Path] = field(default_factory=dict)


def load_runs(paths: Sequence[str | Path]) -> list[Trial]:
    """Every record under the given run folders / record files, with its artifact files resolved."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.rglob(RECORDS_FILE))
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"report: {p} does not exist; give run folders written by 'python -m eval run/bench --out'")
    if not files:
        raise UserError(f"report: no {RECORDS_FILE} under {', '.join(map(str, paths))}; run 'python -m eval bench SUITE --out DIR' first")
    trials = []
    for f in files:
        for r in iter_records(f):
            arts = {k: q for k, v in (r.get("artifacts") or {}).items()
                    if isinstance(v, str) and (q := rp.resolve_artifact(v, f)) is not None}
            trials.append(Trial(r, arts))
    keep = {id(r) for r in lb.dedupe(t.record for t in trials)}
    return [t for t in trials if id(t.record) in keep]


def ok_trials(trials: Sequence[Trial], row: lb.Row) -> list[Trial]:
    """The successful trials behind one leaderboard row (same setting, same preset)."""
    return [t for t in trials if t.record["status"] == "ok" and t.record["attack"]["preset"] == row.preset
            and lb.setting_key(t.record["case"]) == row.setting]


def _bsz(case: dict) -> int:
    return int(case["protocol"]["batch_size"])


def _mean(row: lb.Row, key: str) -> float | None:
    v = row.metrics.get(key)
    return None if v is None or v[0] != v[0] else v[0]


def summary_lines(rows: Sequence[lb.Row], trials: Sequence[Trial]) -> dict[str, list[str]]:
    """Plain sentences per modality: for each setting, the best attack by its primary metric."""
    out: dict[str, list[str]] = {}
    for case, rs, primary in lb.tables(rows):
        if not rs or primary is None or _mean(rs[0], primary) is None:
            continue
        best, mod, b = rs[0], case["modality"], _bsz(case)
        mine = ok_trials(trials, best)
        where = lb.title(case)
        if mod == "text":
            sents = [s for t in mine if "sentences" in t.artifacts for s in rp.load_json(t.artifacts["sentences"])]
            if sents:
                k, n = rp.count_exact_sentences(sents)
                line = f"{best.preset} recovered {k} of {n} sentences exactly at B={b}"
            else:
                line = f"{best.preset} reached exact-match {_mean(best, 'exact_match') or 0:.2f} at B={b}"
            r1 = _mean(best, "rouge1")
            line += f" (ROUGE-1 {r1:.2f}" if r1 is not None else " ("
            line += f", {best.n_ok} batches) on {where}"
        elif mod == "tabular":
            acc, ex = _mean(best, "accuracy"), _mean(best, "exact_row")
            line = f"{best.preset} recovered {100 * (acc or 0):.0f} % of cells"
            if ex is not None:
                n_rows = best.n_ok * b
                line += f" and {round(ex * n_rows)} of {n_rows} rows entirely"
            line += f" at B={b} ({best.n_ok} batches) on {where}"
        else:
            names = {"pesq_wb": "PESQ-wb", "stoi": "STOI", "mel_cosine": "mel cosine", "feature_cosine": "feature cosine"}
            parts = [f"{label} {_mean(best, k):.2f}" for k, label in names.items() if _mean(best, k) is not None]
            line = f"{best.preset}: reconstructed clips reach {', '.join(parts) or f'{primary} {_mean(best, primary):.2f}'}" \
                   f" at B={b} ({best.n_ok} trials) on {where}"
        out.setdefault(mod, []).append(line)
    return out


def _examples(case: dict, trials: Sequence[Trial]) -> str:
    parts = []
    for t in trials[:MAX_EXAMPLES]:
        a = t.artifacts
        if case["modality"] == "text" and "sentences" in a:
            parts.append(rp.text_examples(rp.load_json(a["sentences"])))
        elif case["modality"] == "tabular" and "cells" in a:
            parts.append(rp.tabular_examples(rp.load_json(a["cells"])))
        elif case["modality"] == "speech":
            parts.append(rp.speech_examples(a))
    return "".join(parts)


def _plots(rows: Sequence[lb.Row]) -> list[str]:
    out = []
    by_mod: dict[str, list[lb.Row]] = {}
    for r in rows:  # each modality's plots use its own primary metric
        by_mod.setdefault(r.case["modality"], []).append(r)
    for axis, xlabel, logx in (("batch_size", "batch size", True), ("defense", "defense strength", False)):
        for name, series, primary in ((n, s, p) for rs in by_mod.values() if (p := lb.default_primary(rs))
                                      for n, s in lb.plot_series(rs, p, axis)):
            if max((len(v) for v in series.values()), default=0) < 2:
                continue
            fixed = "everything else fixed" if axis == "batch_size" else "batch size and protocol fixed"
            uri = rp.line_plot(series, title=f"{name}: {primary} vs {xlabel} ({fixed})", xlabel=xlabel,
                               metric=primary, logx=logx)
            out.append(f"<figure><img alt='{rp.esc(name)} {primary} vs {xlabel}' src='{uri}'>"
                       f"<figcaption>{rp.esc(name)}: {primary} vs {xlabel}; {fixed}</figcaption></figure>")
    return out


def load_utility(paths: Sequence[str | Path]) -> list[dict]:
    """``utility.jsonl`` lines (``python -m eval utility``) under the run folders."""
    out = []
    for p in map(Path, paths):
        for f in (sorted(p.rglob("utility.jsonl")) if p.is_dir() else []):
            for ln in f.read_text(encoding="utf-8").splitlines():
                try:
                    out.append(json.loads(ln))
                except json.JSONDecodeError:
                    continue
    return out


def _join_key(case: dict) -> str:
    return json.dumps([case["name"], case["protocol"]["batch_size"], case.get("defenses") or []], sort_keys=True)


def frontier_series(rows: Sequence[lb.Row], utility: Sequence[dict]) -> list[tuple[str, str, dict]]:
    """[(setting name, defense family, {attack preset: [(utility, attack metric)]})]: one point per
    defense strength (the undefended model in every family), sorted by utility. The attack metric
    is the primary metric of the setting's own rows (each modality has its own)."""
    return [(name, fam, series) for name, fam, series, _mod, _p in frontier_groups(rows, utility)]


def frontier_groups(rows: Sequence[lb.Row], utility: Sequence[dict]) -> list[tuple[str, str, dict, str, str]]:
    """As :func:`frontier_series`, with the setting's modality and primary metric."""
    util = {_join_key(u["case"]): u["utility"]["test_accuracy"] for u in utility}
    by_setting: dict[tuple[str, int], list[lb.Row]] = {}
    for r in rows:
        by_setting.setdefault((r.case["name"], r.case["protocol"]["batch_size"]), []).append(r)
    out = []
    for (name, b), rs in sorted(by_setting.items()):
        primary = lb.default_primary(rs)
        fams: dict[str, dict[str, list[tuple[float, float]]]] = {}
        for r in rs:
            u, m = util.get(_join_key(r.case)), _mean(r, primary) if primary else None
            if u is None or m is None:
                continue
            defs = r.case.get("defenses") or []
            if len(defs) == 1:
                families = [defs[0]["name"]]
            elif not defs:  # the undefended point joins every family measured for this setting
                families = sorted({u2["case"]["defenses"][0]["name"] for u2 in utility
                                   if u2["case"]["name"] == name and len(u2["case"].get("defenses") or []) == 1})
            else:
                continue  # a stack of several defenses belongs to no single family
            for fam in families:
                fams.setdefault(fam, {}).setdefault(r.preset, []).append((u, m))
        for fam, series in sorted(fams.items()):
            series = {k: v for k, v in series.items() if len(v) >= 2}  # an attack run only undefended: no curve
            if series:
                out.append((f"{name} (B={b})", fam, series, rs[0].case["modality"], primary or ""))
    return out


def _utility_label(utility: Sequence[dict], name: str) -> str:
    notes = {u["utility"].get("note", "") for u in utility if u["case"]["name"] == name}
    return "held-out next-token accuracy" if any("next-token" in n for n in notes) else "held-out accuracy"


def _frontier_plots(rows: Sequence[lb.Row], utility: Sequence[dict]) -> dict[str, list[str]]:
    """Frontier figures per modality."""
    out: dict[str, list[str]] = {}
    for name, fam, series, mod, primary in frontier_groups(rows, utility):
        ulabel = _utility_label(utility, name.rsplit(" (B=", 1)[0])
        uri = rp.line_plot(series, title=f"{name}, {fam}: {primary} vs {ulabel} (defense strength varies)",
                           xlabel=f"defended model's {ulabel} (utility)", metric=primary, logx=False,
                           bounded_x=True)
        out.setdefault(mod, []).append(
            f"<figure class='frontier' data-modality='{rp.esc(mod)}'><img alt='frontier {rp.esc(name)} {rp.esc(fam)}' "
            f"src='{uri}'><figcaption>privacy-utility frontier, {rp.esc(name)}, defense family {rp.esc(fam)}: each "
            f"point is one defense strength; up = more leakage ({rp.esc(primary)}), right = more useful model "
            f"({rp.esc(ulabel)})</figcaption></figure>")
    return out


def build_report(paths: Sequence[str | Path], *, title: str = "gradleak report") -> str:
    trials = load_runs(paths)
    rows = lb.aggregate(t.record for t in trials)
    summary = summary_lines(rows, trials)
    h = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
         f"<title>{rp.esc(title)}</title><style>{rp.CSS}</style></head><body>",
         f"<h1>{rp.esc(title)}</h1>",
         f"<p class='note'>{len(trials)} trials from {', '.join(rp.esc(p) for p in paths)}. "
         "Numbers are means over successful trials with 95 % t-intervals; attacks are ranked only within a "
         "setting. Each setting states what the threat model grants.</p>",
         "<section id='summary'><h2>What leaked</h2>"]
    for mod in MODALITIES:
        if mod in summary:
            h.append(f"<h3>{mod}</h3><ul class='summary'>" + "".join(f"<li>{rp.esc(s)}</li>" for s in summary[mod])
                     + "</ul>")
    failed = sum(t.record["status"] == "failed" for t in trials)
    if failed:
        h.append(f"<p><strong>{failed} trial(s) failed</strong>; their errors are in the records.</p>")
    h.append("</section>")
    frontier = _frontier_plots(rows, load_utility(paths))
    if frontier:
        h.append("<section id='frontier'><h2>Privacy-utility frontier</h2>"
                 "<p class='note'>Attack success against the utility of the model federated-trained under the same "
                 "defense on the public pool (python -m eval utility), per defense family.</p>")
        for mod in sorted(frontier, key=lambda m: (MODALITIES.index(m) if m in MODALITIES else 9, m)):
            h.append(f"<h3>{rp.esc(mod)}</h3>" + "".join(frontier[mod]))
        h.append("</section>")
    plots = _plots(rows)
    if plots:
        h.append("<section id='plots'><h2>Trends</h2>" + "".join(plots) + "</section>")
    for case, rs, primary in lb.tables(rows):
        keys = lb._metric_keys(rs, primary)
        h.append(f"<section class='setting' data-modality='{case['modality']}'><h2>{rp.esc(lb.title(case))}</h2>"
                 f"<p>{rp.esc(lb.describe_case(case))}</p><div class='wide'>{lb.html_table(rs, keys, cls='lb')}</div>")
        for r in rs:
            mine = ok_trials(trials, r)
            ex = _examples(case, mine)
            if ex:
                h.append(f"<h4>{rp.esc(r.preset)}: reconstructions beside the originals</h4><div class='wide'>{ex}</div>")
        h.append("</section>")
    h.append("</body></html>")
    return "\n".join(h)


def cmd_report(args) -> int:
    out = Path(args.output)
    if out.exists() and out.is_dir():
        raise UserError(f"report: -o {out} is a folder; give a file name such as {out}/report.html")
    page = build_report(args.runs, title=args.title)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    print(f"report: {out} ({len(page) // 1024} KiB)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="one self-contained HTML report of runs: what leaked, per setting")
    p.add_argument("runs", nargs="+", help="run folders (or records.jsonl files)")
    p.add_argument("-o", "--output", default="report.html", help="HTML file to write (default: %(default)s)")
    p.add_argument("--title", default="gradleak report")
    p.set_defaults(fn=cmd_report)
