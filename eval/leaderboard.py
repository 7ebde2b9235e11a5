"""Leaderboards: pure functions of run records.

Records are grouped by *setting* (the whole case block: model, data, protocol incl. batch
size, threat model, defenses) and, within a setting, by attack preset. Rows of different
settings are never ranked against each other: each setting gets its own table.
Duplicate run ids (a failed trial re-run with ``--resume``) keep the latest record.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from statistics import fmean, stdev
from typing import Any, Callable, Iterable, Sequence

from common.metrics import higher_is_better

from .records import canonical_json


@dataclass
class Row:
    setting: str  # canonical JSON of the case block
    case: dict
    preset: str
    attack: str
    n_ok: int = 0
    n_failed: int = 0
    n_skipped: int = 0
    metrics: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # key -> (mean, ci95, std)
    wall_s: float | None = None


def _t95(n: int) -> float:
    if n < 2:
        return float("nan")
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def summarize(values: Sequence[float]) -> tuple[float, float, float]:
    n = len(values)
    if n == 0:
        return (float("nan"),) * 3
    m = fmean(values)
    if n < 2 or not all(math.isfinite(v) for v in values):  # an Inf (a metric's worst value) has no spread
        return m, float("nan"), float("nan")
    s = stdev(values)
    return m, _t95(n) * s / math.sqrt(n), s


# Config fields that change what a trial writes, never what it computes: a re-run of the same batch
# that differs only in these is the same trial (counted once, the latest kept).
OUTPUT_ONLY_CONFIG = frozenset({"save_heatmap", "save_artifacts", "progress"})


def content_key(r: dict) -> str:
    """The trial's content: case (data digest included), preset, computing config, seed, trial."""
    cfg = {k: v for k, v in (r.get("attack", {}).get("config") or {}).items() if k not in OUTPUT_ONLY_CONFIG}
    return canonical_json({"case": r.get("case"), "preset": r.get("attack", {}).get("preset"), "config": cfg,
                           "seed": r.get("seed"), "trial": r.get("trial")})


def dedupe(records: Iterable[dict]) -> list[dict]:
    """One record per trial content (see ``content_key``), the latest created kept; records that
    lack the fields (hand-made tables) fall back to their run id."""
    latest: dict[str, dict] = {}
    for r in records:
        key = content_key(r) if "seed" in r and "trial" in r else r["run_id"]
        prev = latest.get(key)
        if prev is None or r.get("created", "") >= prev.get("created", ""):
            latest[key] = r
    return list(latest.values())


def setting_key(case: dict) -> str:
    return canonical_json(case)


def aggregate(records: Iterable[dict]) -> list[Row]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in dedupe(records):
        groups.setdefault((setting_key(r["case"]), r["attack"]["preset"]), []).append(r)
    rows = []
    for (setting, preset), recs in groups.items():
        ok = [r for r in recs if r["status"] == "ok"]
        row = Row(setting, recs[0]["case"], preset, recs[0]["attack"]["name"], n_ok=len(ok),
                  n_failed=sum(r["status"] == "failed" for r in recs),
                  n_skipped=sum(r["status"] == "skipped" for r in recs))
        keys = sorted({k for r in ok for k in r["metrics"]})
        for k in keys:
            row.metrics[k] = summarize([r["metrics"][k] for r in ok if k in r["metrics"]])
        walls = [r["cost"]["wall_s"] for r in ok if "wall_s" in r.get("cost", {})]
        row.wall_s = fmean(walls) if walls else None
        rows.append(row)
    return rows


def default_primary(rows: Sequence[Row]) -> str | None:
    for k in ("rouge2", "accuracy", "rouge1", "mel_cosine", "pesq", "exact_match"):
        if any(k in r.metrics for r in rows):
            return k
    keys = sorted({k for r in rows for k in r.metrics})
    return keys[0] if keys else None


def _sort_rows(rows: list[Row], primary: str | None) -> list[Row]:
    if primary is None:
        return sorted(rows, key=lambda r: r.preset)
    hib = higher_is_better(primary)
    sign = -1.0 if hib in (True, None) else 1.0

    def key(r: Row):
        m = r.metrics.get(primary, (float("nan"),))[0]
        return (math.isnan(m), sign * (0.0 if math.isnan(m) else m), r.preset)

    return sorted(rows, key=key)


def tables(rows: Sequence[Row], primary: str | None = None) -> list[tuple[dict, list[Row], str | None]]:
    """[(case block, rows ranked within it, primary metric)], settings in a stable order."""
    by: dict[str, list[Row]] = {}
    for r in rows:
        by.setdefault(r.setting, []).append(r)
    out = []
    for setting in sorted(by, key=_setting_order):
        rs = by[setting]
        p = primary if primary is not None else default_primary(rs)
        out.append((rs[0].case, _sort_rows(rs, p), p))
    return out


def _setting_order(setting: str) -> tuple:
    """Settings by case name, batch size, then defenses by value (the setting is a case's JSON)."""
    case = json.loads(setting)
    return case["name"], case["protocol"]["batch_size"], _defense_order(case), setting


def _defense_order(case: dict) -> list:
    """Sort key of a case's defenses: by name, then numeric parameters by value (sigma 1e-6 before 1e-4)."""
    def value(v: Any) -> tuple:
        return (0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0.0, str(v))
    return [(str(d.get("name", "")), [(k, value(v)) for k, v in sorted(d.items()) if k != "name"])
            for d in case.get("defenses", [])]


def _fmt(v: tuple[float, float, float] | None) -> str:
    if v is None or math.isnan(v[0]):
        return "–"
    mean, ci, _ = v
    return f"{mean:.3f}" if math.isnan(ci) else f"{mean:.3f} ± {ci:.3f}"


def _defense_text(case: dict) -> str:
    return "; ".join(",".join(f"{k}={v}" for k, v in d.items()) for d in case["defenses"]) or "none"


def title(case: dict) -> str:
    t = f"{case['name']} (B={case['protocol']['batch_size']}"
    cap = case.get("capture")  # an audit record: which capture (python -m eval audit prints its own report)
    if cap:
        t += f", round {cap.get('round')}, client {cap.get('client_id')}"
    return t + (f", defense {_defense_text(case)})" if case["defenses"] else ")")


def describe_case(case: dict) -> str:
    p = case["protocol"]
    proto = f"{p['kind']} B={p['batch_size']}"
    if p["kind"] == "fedavg":
        proto += f" E={p['local_epochs']} b={p['local_batch_size'] or p['batch_size']} lr={p['local_lr']}"
    grants = ",".join(case["threat"]["grants"])
    defense = _defense_text(case)
    return (f"model `{case['model']}` · data `{case['data']}` · {proto} · threat {case['threat']['name']} "
            f"({grants}) · defense {defense}")


def _metric_keys(rows: Sequence[Row], primary: str | None) -> list[str]:
    keys = sorted({k for r in rows for k in r.metrics})
    if primary in keys:
        keys.remove(primary)
        keys.insert(0, primary)
    return keys


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def render_markdown(rows: Sequence[Row], primary: str | None = None) -> str:
    out = ["# gradleak leaderboard", "",
           "Mean ± 95% CI (t) over ok trials. Each table is one setting; rows are ranked only within it.", ""]
    for case, rs, p in tables(rows, primary):
        keys = _metric_keys(rs, p)
        out.append(f"## {title(case)}")
        out.append("")
        out.append(describe_case(case))
        out.append("")
        out.append(_md_row(["rank", "attack", *keys, "n ok", "n failed", "s/trial"]))
        out.append("|" + "---|" * (len(keys) + 5))
        for i, r in enumerate(rs, 1):
            cells = [_fmt(r.metrics.get(k)) for k in keys]
            wall = "–" if r.wall_s is None else f"{r.wall_s:.1f}"
            out.append(_md_row([str(i), r.preset, *cells, str(r.n_ok), str(r.n_failed), wall]))
        out.append("")
    return "\n".join(out)


def render_csv(rows: Sequence[Row], primary: str | None = None) -> str:
    import csv

    keys = sorted({k for r in rows for k in r.metrics})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case", "batch_size", "setting", "rank", "attack", "preset", "n_ok", "n_failed", "wall_s"]
               + [f"{k}_{s}" for k in keys for s in ("mean", "ci95", "std")])
    for case, rs, _ in tables(rows, primary):
        for i, r in enumerate(rs, 1):
            vals = []
            for k in keys:
                m = r.metrics.get(k)
                vals += ["" if m is None else f"{x:.6g}" for x in (m or (None, None, None))] if m else ["", "", ""]
            w.writerow([case["name"], case["protocol"]["batch_size"], describe_case(case), i, r.attack, r.preset,
                        r.n_ok, r.n_failed, "" if r.wall_s is None else f"{r.wall_s:.3f}"] + vals)
    return buf.getvalue()


def _family_key(case: dict, drop: str) -> str:
    c = json.loads(json.dumps(case))
    if drop == "batch_size":
        c["protocol"].pop("batch_size")
    else:
        c.pop("defenses")
    return canonical_json(c)


#: One number per defense for plots of quality versus defense strength, read from the record's
#: ``case.defenses`` dicts (the same formulas as ``common.defenses.*.strength``, without building
#: the defense, which would import torch). A defense not listed uses its first numeric parameter.
DEFENSE_STRENGTH: dict[str, Callable[[dict], float]] = {
    "gaussian": lambda d: d["sigma"],
    "dpsgd": lambda d: d["noise_multiplier"],
    "topk": lambda d: 1.0 - d["keep"],
    "mask": lambda d: d["p"],
    "quantize": lambda d: 1.0 / d["bits"],
}


def _one_strength(d: dict) -> float:
    fn = DEFENSE_STRENGTH.get(d.get("name", ""))
    if fn is not None:
        try:
            return float(fn(d))
        except (KeyError, TypeError, ZeroDivisionError):
            pass
    for k, v in d.items():
        if k != "name" and isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return 0.0


def defense_strength(case: dict) -> float:
    return sum(_one_strength(d) for d in case["defenses"])


def plot_series(rows: Sequence[Row], metric: str, axis: str) -> list[tuple[str, dict[str, list[tuple[float, float]]]]]:
    """Series for plots: per case family (all but ``axis`` equal), per preset, (x, mean metric)."""
    fam: dict[str, dict[str, list[tuple[float, float]]]] = {}
    names: dict[str, str] = {}
    for r in rows:
        if metric not in r.metrics:
            continue
        key = _family_key(r.case, axis)
        x = float(r.case["protocol"]["batch_size"]) if axis == "batch_size" else defense_strength(r.case)
        fam.setdefault(key, {}).setdefault(r.preset, []).append((x, r.metrics[metric][0]))
        names[key] = r.case["name"]
    out = []
    for key, series in sorted(fam.items(), key=lambda kv: names[kv[0]]):
        xs = {x for pts in series.values() for x, _ in pts}
        if len(xs) >= 2:
            out.append((names[key], {p: sorted(v) for p, v in series.items()}))
    return out


def html_table(rows: Sequence[Row], keys: Sequence[str], *, cls: str = "") -> str:
    """One setting's ranked rows as an HTML table (metric columns ``keys``, then counts and cost)."""
    import html

    attr = f" class='{cls}'" if cls else ""
    out = [f"<table{attr}><tr><th>rank</th><th>attack</th>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys)
           + "<th>n ok</th><th>n failed</th><th>s/trial</th></tr>"]
    for i, r in enumerate(rows, 1):
        wall = "–" if r.wall_s is None else f"{r.wall_s:.1f}"
        out.append(f"<tr><td>{i}</td><td>{html.escape(r.preset)}</td>"
                   + "".join(f"<td>{_fmt(r.metrics.get(k))}</td>" for k in keys)
                   + f"<td>{r.n_ok}</td><td>{r.n_failed}</td><td>{wall}</td></tr>")
    out.append("</table>")
    return "".join(out)


def render_html(rows: Sequence[Row], primary: str | None = None) -> str:
    import html

    from .report_parts import line_plot

    parts = ["<!doctype html><meta charset='utf-8'><title>gradleak leaderboard</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:nth-child(2){text-align:left}</style>",
             "<h1>gradleak leaderboard</h1><p>Mean ± 95% CI over ok trials; rows ranked only within a setting.</p>"]
    p_all = primary or default_primary(rows)
    if p_all:
        for axis, xlabel, logx in (("batch_size", "batch size", True), ("defense", "defense strength", False)):
            for name, series in plot_series(rows, p_all, axis):
                uri = line_plot(series, title=f"{name}: {p_all} vs {xlabel}", xlabel=xlabel, metric=p_all, logx=logx)
                parts.append(f"<h3>{html.escape(name)}: {p_all} vs {xlabel}</h3><img src='{uri}'>")
    for case, rs, p in tables(rows, primary):
        keys = _metric_keys(rs, p)
        parts.append(f"<h2>{html.escape(title(case))}</h2><p>{html.escape(describe_case(case))}</p>"
                     + html_table(rs, keys))
    return "\n".join(parts)


RENDERERS = {"md": render_markdown, "csv": render_csv, "html": render_html}
