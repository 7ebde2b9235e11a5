"""Compact DAGER tables (one row per case x defense x B) from records.jsonl files.

    python bench/dager_summary.py results/dager/main [results/dager/defenses ...] > results/dager/summary.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(directory: str):
    for line in (Path(directory) / "records.jsonl").read_text().splitlines():
        r = json.loads(line)
        d = ",".join(f"{x['name']} {next(v for k, v in x.items() if k != 'name')}" for x in r["case"]["defenses"]) or "none"
        m, st = r.get("metrics", {}), r.get("attack_stats", {})
        status = "error" if r["status"] != "ok" else ("precondition failed" if st.get("precondition_failed") else
                                                     ("timed out" if st.get("timed_out") else "ok"))
        yield (r["case"]["name"], r["attack"]["preset"], d, r["case"]["protocol"]["batch_size"], m.get("rouge1"), m.get("rouge2"),
               m.get("exact_match"), r["cost"].get("attack_s"), st.get("rank_l1"), status)


def fmt(x, nd=3):
    return "–" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


if __name__ == "__main__":
    print("| case | preset | defense | B | ROUGE-1 | ROUGE-2 | exact match | s/batch (attack) | rank L1 | status |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for d in sys.argv[1:]:
        for c, pr, de, b, r1, r2, em, s, rk, stt in sorted(rows(d), key=lambda x: (x[0], x[1], x[2], x[3])):
            print(f"| {c} | {pr} | {de} | {b} | {fmt(r1)} | {fmt(r2)} | {fmt(em)} | {fmt(s, 1)} | {fmt(rk, 0)} | {stt} |")
