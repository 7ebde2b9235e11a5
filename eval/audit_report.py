"""The audit's report: one table per (round, case), one row per client, the attack's metric
next to the random/prior baseline's on the same capture and a plain verdict."""
from __future__ import annotations

import math
from typing import Iterable

from .leaderboard import dedupe

#: the attack counts as better than the baseline only by more than this (absolute, primary metric)
MARGIN = 0.05


def verdict(attack: float | None, baseline: float | None) -> str:
    if attack is None or baseline is None or not (math.isfinite(attack) and math.isfinite(baseline)):
        return "no comparison"
    return "leaks" if attack > baseline + MARGIN else "NOT better than baseline"


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def render(records: Iterable[dict]) -> str:
    recs = [r for r in dedupe(records) if "capture" in r["case"]]
    groups: dict[tuple, list[dict]] = {}
    for r in recs:
        groups.setdefault((r["case"]["capture"].get("round") or 0, r["case"]["name"]), []).append(r)
    out = ["# gradleak audit", "",
           f"One table per round and case, one row per client. `baseline` is the random/prior baseline on the same "
           f"capture; an attack that does not beat it by more than {MARGIN} shows nothing about leakage.", ""]
    for (rnd, case), rs in sorted(groups.items()):
        rs.sort(key=lambda r: (str(r["case"]["capture"].get("client_id")), r["attack"]["preset"]))
        p = rs[0]["case"]["protocol"]
        proto = f"{p['kind']} B={p['batch_size']}"
        if p["kind"] == "fedavg":
            proto += f" E={p['local_epochs']} b={p.get('local_batch_size') or p['batch_size']} lr={p['local_lr']}"
        enc = (rs[0].get("encoding") or {}).get("source", "n/a")
        out += [f"## round {rnd} · case {case}", "",
                f"protocol {proto} ({rs[0].get('protocol_source', 'capture')}) · encoding {enc} · "
                f"model `{rs[0]['case']['model']}`", ""]
        metric = next((r["baseline"]["metric"] for r in rs if (r.get("baseline") or {}).get("metric")), None) \
            or next((k for r in rs for k in ("accuracy", "rouge1", "rouge2") if k in r.get("metrics", {})), None)
        head = ["client", "attack", metric or "metric", "baseline", "verdict", "status"]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rs:
            m = r.get("metrics", {}).get(metric) if metric else None
            b = (r.get("baseline") or {}).get("value")
            status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')}"[:80]
            v = (r.get("baseline") or {}).get("verdict") or ("no ground truth" if not r.get("ground_truth") else
                                                              "no baseline for this modality")
            out.append("| " + " | ".join([str(r["case"]["capture"].get("client_id")), r["attack"]["preset"],
                                          _fmt(m), _fmt(b), v, status]) + " |")
        out.append("")
    return "\n".join(out)
