"""Development benchmark of tabular-exact against TabLeak on the same batches (issue 19).

Each cell (case x batch size) runs ``python -m eval run`` once per attack with the same seed and
trial count, so both attacks see the same client batches and model; records go to
``OUT/<case>/b<B>/<attack>/records.jsonl`` and a markdown summary (mean exact_row, cell accuracy,
certified fraction and attack seconds per batch, with the seconds ratio TabLeak / tabular-exact
measured in the same run) is printed and written to ``OUT/summary.md``. Seeds < 1000 only: this is
a development run; evaluation numbers come from ``eval/suites/tabular_exact.toml`` (seed 1000).
``--noise``: the declared-Gaussian-noise grid instead (``NOISE_GRID``; ``python -m eval run`` takes no
defense, so a development suite is written to ``OUT/noise_suite.toml`` and run with ``python -m eval
bench``), summarised per sigma, B and attack in ``OUT/noise_summary.md``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/tabular_exact.py --out runs/tabular_exact_dev
    OMP_NUM_THREADS=1 .venv/bin/python bench/tabular_exact.py --noise --out runs/tabular_exact_dev
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ATTACKS = ("tabular-exact", "tableak")
# (case, batch sizes, trials)
DEV_GRID = (
    ("tabular/adult-fc/fedsgd-labels", (8, 32), 3),
    ("tabular/german-fc/fedsgd-labels", (8, 32), 3),
    ("tabular/adult-fc/fedsgd", (32,), 3),
    ("tabular/german-fc/fedsgd", (32,), 2),
    ("tabular/adult-fc/fedsgd-labels", (64,), 2),
    ("tabular/german-fc/fedsgd-labels", (64,), 2),  # ~3e7 patterns after peeling: the pursuit stage (pursuit.py)
    ("tabular/adult-fc/fedsgd-labels", (128,), 1),  # past the second layer's rank: equals TabLeak
    ("tabular/adult-fc/fedsgd-trained-labels", (32,), 2),
)


# (case, batch sizes, sigmas, trials): the exact stage's per-row noise tolerances and its time budget
NOISE_GRID = ("tabular/adult-fc/fedsgd-labels", (8, 32), (1e-6, 1e-5, 1e-4), 3)


def _noise(out: Path, *, seed: int, trials: int) -> str:
    case, sizes, sigmas, n = NOISE_GRID
    out.mkdir(parents=True, exist_ok=True)
    suite = out / "noise_suite.toml"
    defenses = ", ".join(f'[{{name = "gaussian", sigma = {s:g}}}]' for s in sigmas)
    suite.write_text(f'[[run]]\ncase = "{case}"\nattacks = {json.dumps(list(ATTACKS))}\n'
                     f"batch_sizes = {list(sizes)}\nseeds = [0]\ntrials = {trials or n}\ndefenses = [{defenses}]\n")
    cmd = [sys.executable, "-m", "eval", "bench", str(suite), "--out", str(out / "noise"), "--resume", "--quiet",
           "--seed-offset", str(seed)]
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    recs = [json.loads(line) for line in (out / "noise" / "records.jsonl").read_text().splitlines() if line.strip()]
    cells: dict[tuple, list[dict]] = {}
    for r in recs:
        sigma = sum(d.get("sigma", 0.0) for d in r["case"]["defenses"])
        cells.setdefault((sigma, r["case"]["protocol"]["batch_size"], r["attack"]["name"]), []).append(r)
    lines = ["| sigma | B | attack | n | exact_row | accuracy | certified_rows | best effort | s/batch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (sigma, b, a), rs in sorted(cells.items()):
        m = [r.get("metrics", {}) for r in rs]
        secs = _mean([r["attack_stats"].get("attack_s", r["cost"]["attack_s"]) for r in rs])
        lines.append(f"| {sigma:g} | {b} | {a} | {len(rs)} | {_mean([x['exact_row'] for x in m]):.3f} | "
                     f"{_mean([x['accuracy'] for x in m]):.3f} | {_mean([x.get('certified_rows', 0.0) for x in m]):.3f} | "
                     f"{_mean([r['attack_stats'].get('best_effort', 0.0) for r in rs]):.2f} | {secs:.1f} |")
    text = "\n".join(lines) + "\n"
    (out / "noise_summary.md").write_text(text)
    return text


def _run(case: str, b: int, attack: str, *, trials: int, seed: int, out: Path) -> list[dict]:
    d = out / case.replace("/", "_") / f"b{b}" / attack
    cmd = [sys.executable, "-m", "eval", "run", "--attack", attack, "--case", case, "--batch-size", str(b),
           "--trials", str(trials), "--seed", str(seed), "--out", str(d), "--resume", "--quiet"]
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (d / "records.jsonl").read_text().splitlines() if line.strip()]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trials", type=int, default=0, help="override the grid's trials per cell (0: the grid's)")
    ap.add_argument("--noise", action="store_true", help="the declared-noise grid (NOISE_GRID) instead")
    args = ap.parse_args()
    if args.seed >= 1000:
        raise SystemExit("bench/tabular_exact.py is a development benchmark: use a seed < 1000 "
                         "(evaluation: python -m eval bench eval/suites/tabular_exact.toml)")
    if args.noise:
        print(_noise(args.out, seed=args.seed, trials=args.trials))
        return
    lines = ["| case | B | attack | n | exact_row | accuracy | certified_rows | s/batch | s ratio TabLeak/exact |",
             "|---|---|---|---|---|---|---|---|---|"]
    for case, sizes, trials in DEV_GRID:
        for b in sizes:
            res = {a: _run(case, b, a, trials=args.trials or trials, seed=args.seed, out=args.out) for a in ATTACKS}
            secs = {a: _mean([r["attack_stats"].get("attack_s", r["cost"]["attack_s"]) for r in recs])
                    for a, recs in res.items()}
            for a, recs in res.items():
                m = [r.get("metrics", {}) for r in recs]
                ratio = secs["tableak"] / secs[a] if a == "tabular-exact" else float("nan")
                lines.append(f"| {case} | {b} | {a} | {len(recs)} | {_mean([x['exact_row'] for x in m]):.3f} | "
                             f"{_mean([x['accuracy'] for x in m]):.3f} | "
                             f"{_mean([x.get('certified_rows', 0.0) for x in m]):.3f} | {secs[a]:.1f} | "
                             f"{'' if ratio != ratio else f'{ratio:.1f}x'} |")
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    (args.out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
