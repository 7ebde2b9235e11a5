"""Cost of the full TabLeak Table 1 grid on UCI Adult (issue 18's target: under 4 hours on 2 cores).

    OMP_NUM_THREADS=1 .venv/bin/python bench/tableak_grid_cost.py [--trials 1] [--seed-offset 0] [--out results/bench]

The paper's grid is 6 attacks (TabLeak, no pooling, no softmax, Inverting Gradients, DLG, random) x
B = 1 ... 128 x known and recovered labels x 50 batches per cell, at the paper's attack settings.
This runs the published suite ``eval/suites/tableak_table1_adult.toml`` with DLG added and
``--trials`` batches per cell (development seeds unless told otherwise) through ``python -m eval
bench`` in a child process on one thread, and measures the child's CPU seconds (user + system,
which a shared machine distorts far less than the wall clock). The projection for 50 batches per
cell on 2 cores is ``CPU s x 50 / trials / 2``: it assumes the two workers are kept busy (the
suite orders the expensive sizes first) and counts every per-trial cost the real run pays
(data, model, attack, metrics, the record). The per-cell CPU seconds come from the records'
own ``cost.attack_s`` shares. Output: ``results/bench/tableak-grid-<stamp>.md`` and ``.jsonl``
with the commit, the load and the thread count.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from perf import provenance  # noqa: E402

SUITE = ROOT / "eval" / "suites" / "tableak_table1_adult.toml"
PAPER_BATCHES = 50
TARGET_H = 4.0


def grid_suite(trials: int) -> str:
    """The published Adult suite with DLG added and ``trials`` batches per cell."""
    text = SUITE.read_text()
    text = text.replace('"tableak-random"]', '"tableak-random", "tableak-dlg"]')
    text, n = re.subn(r"^trials = \d+$", f"trials = {trials}", text, flags=re.M)
    if n == 0 or "tableak-dlg" not in text:
        raise SystemExit(f"error: {SUITE} no longer has the expected layout; update {Path(__file__).name}")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=1, help="batches per cell, >= 1 (default 1)")
    ap.add_argument("--seed-offset", type=int, default=0, help="development seeds by default")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench"))
    a = ap.parse_args(argv)
    if a.trials < 1:
        print("error: --trials must be >= 1", file=sys.stderr)
        return 2
    os.environ["OMP_NUM_THREADS"] = "1"
    prov = provenance("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        suite = Path(tmp) / "grid.toml"
        suite.write_text(grid_suite(a.trials))
        out = Path(tmp) / "out"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, "-m", "eval", "bench", str(suite), "--out", str(out), "--quiet",
                             "--seed-offset", str(a.seed_offset)], cwd=ROOT).returncode
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines() if line.strip()]
    if rc != 0:
        print(f"error: the suite exited {rc}", file=sys.stderr)
        return 1
    per_cell: dict[tuple, float] = defaultdict(float)
    for r in recs:
        per_cell[(r["attack"].get("preset") or r["attack"]["name"], r["case"]["protocol"]["batch_size"])] += r["cost"]["attack_s"]
    attack_share = sum(per_cell.values())
    projected_h = cpu * PAPER_BATCHES / a.trials / 2 / 3600
    row = {"what": "TabLeak Table 1 grid, UCI Adult", "trials_per_cell": a.trials, "trials": len(recs),
           "cpu_s": round(cpu, 1), "wall_s": round(wall, 1), "projected_hours_2_cores": round(projected_h, 2),
           "target_hours": TARGET_H, "attack_wall_s_in_records": round(attack_share, 1),
           "seed_offset": a.seed_offset} | prov
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = Path(a.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"tableak-grid-{stamp}-cpu.jsonl").write_text(json.dumps(row) + "\n")
    lines = [f"commit `{prov['commit'][:10]}`{' (dirty)' if prov['dirty'] else ''}, cpu, OMP threads 1, "
             f"{prov['cpus_available']} CPUs, load {prov['load_avg_1m_at_start']}", "",
             f"TabLeak Table 1 grid on UCI Adult (6 attacks incl. DLG, B = 1 ... 128, known and recovered labels): "
             f"{len(recs)} trials ({a.trials} per cell, seed offset {a.seed_offset}) in {cpu:.0f} CPU s "
             f"({wall:.0f} s wall on a {'shared' if (prov['load_avg_1m_at_start'] or 0) > 1.5 else 'quiet'} machine).",
             f"Projected for the paper's {PAPER_BATCHES} batches per cell on 2 cores: **{projected_h:.2f} h** "
             f"(target < {TARGET_H:.0f} h; CPU s x {PAPER_BATCHES} / {a.trials} / 2).", "",
             "| attack | " + " | ".join(f"B={b}" for b in sorted({k[1] for k in per_cell})) + " |",
             "|---|" + "---|" * len({k[1] for k in per_cell})]
    for att in sorted({k[0] for k in per_cell}):
        lines.append(f"| {att} | " + " | ".join(f"{per_cell.get((att, b), 0) / a.trials / 2:.1f}"
                                                 for b in sorted({k[1] for k in per_cell})) + " |")
    lines += ["", "Cells: attack seconds per batch (records' `cost.attack_s`, mean of the two label settings; wall "
              "clock of the attack inside the trial, so inflated by the machine's load; the projection uses CPU s)."]
    (dest / f"tableak-grid-{stamp}-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
