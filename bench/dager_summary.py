"""Compact DAGER tables (one row per case x preset x defense x B, averaged over the batches run) from
records.jsonl files.

    python bench/dager_summary.py RUN_DIR [RUN_DIR ...] > summary.md

Columns: mean ROUGE-1 / ROUGE-2 / exact match over the batches (trials) of the cell, how many batches
reached ROUGE-1 and ROUGE-2 >= 0.99, mean attack seconds per batch, mean layer-1 rank (~ distinct
token inputs of the batch), and the trial statuses (ok / timed out / precondition failed / error).
"""
from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path


def rows(directory: str):
    for line in (Path(directory) / "records.jsonl").read_text().splitlines():
        r = json.loads(line)
        d = ",".join(f"{x['name']} {next(v for k, v in x.items() if k != 'name')}" for x in r["case"]["defenses"]) or "none"
        m, st = r.get("metrics") or {}, r.get("attack_stats") or {}
        status = "error" if r["status"] != "ok" else ("precondition failed" if st.get("precondition_failed") else
                                                     ("timed out" if st.get("timed_out") else "ok"))
        yield ((r["case"]["name"], r["attack"]["preset"], d, r["case"]["protocol"]["batch_size"]),
               (m.get("rouge1", 0.0), m.get("rouge2", 0.0), m.get("exact_match", 0.0),
                (r.get("cost") or {}).get("attack_s"), st.get("rank_l1"), status))


def fmt(x, nd=3):
    return "–" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


if __name__ == "__main__":
    cells = defaultdict(list)
    for d in sys.argv[1:]:
        for key, val in rows(d):
            cells[key].append(val)
    print("| case | preset | defense | B | batches | ROUGE-1 | ROUGE-2 | exact match | batches R1,R2 >= 0.99 "
          "| s/batch (attack) | rank L1 | status |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (c, pr, de, b), vals in sorted(cells.items()):
        r1, r2, em, s, rk, stt = zip(*vals)
        good = sum(1 for a, bb in zip(r1, r2) if a >= 0.99 and bb >= 0.99)
        status = ", ".join(f"{n} {k}" for k, n in Counter(stt).items())
        print(f"| {c} | {pr} | {de} | {b} | {len(vals)} | {fmt(mean(r1))} | {fmt(mean(r2))} | {fmt(mean(em))} | "
              f"{good}/{len(vals)} | {fmt(mean(s), 1)} | {fmt(mean(rk), 0)} | {status} |")
