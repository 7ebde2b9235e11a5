"""Development check (issue 19): tabular-exact's rows on fixed dev batches, hashed bit for bit.

Used to show that a refactor leaves the attack's output unchanged: runs ``TabularExact(fallback="none")``
on the tests' batches (dev seeds < 1000) and writes, per batch, the SHA-256 of the reconstructed rows'
float32 bytes, of the labels, of the certified flags, plus the decoded rows, to ``--out`` (JSON). Compare two
files with ``--compare A B``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/tabular_exact_same.py --out runs/same_before.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "tableak"))

CASES = (("german", 64, 0, True), ("german", 64, 3, False), ("german", 64, 1, True), ("german", 64, 2, False), ("adult", 32, 0, True), ("adult", 32, 1, False),
         ("adult", 64, 0, True), ("adult", 64, 1, True))


def _h(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def run(out: Path) -> None:
    from common.seed import make_generator
    from common.threat import HONEST, HONEST_WITH_LABELS
    from tableak.data import adult, german
    from tableak.exact import TabularExact, TabularExactConfig
    from test_exact import _case

    sets = {"german": german(), "adult": adult()}
    res = {}
    for name, b, seed, labels in CASES:
        model, rows, batch, obs, prior = _case(sets[name], b, seed=seed, threat=HONEST_WITH_LABELS if labels else HONEST)
        t0 = time.perf_counter()
        rec = TabularExact(TabularExactConfig(fallback="none", resolution=False)).reconstruct(
            obs, model, prior, generator=make_generator(1))
        schema = sets[name][1]
        pc, pn = schema.decode_arrays(rec.data)
        key = f"{name}-b{b}-s{seed}-{'labels' if labels else 'nolabels'}"
        res[key] = {"data": _h(rec.data.numpy()), "labels": _h(rec.labels.numpy()) if rec.labels is not None else None,
                    "certified": rec.extras["certified"], "decoded": np.concatenate([pc, pn], 1).tolist(),
                    "certified_rows": rec.stats["certified_rows"], "s": time.perf_counter() - t0,
                    "stats": {k: v for k, v in rec.stats.items() if not k.endswith("_s")}}
        print(key, res[key]["data"], res[key]["certified_rows"], f"{res[key]['s']:.1f}s", flush=True)
    out.write_text(json.dumps(res))


def compare(a: Path, b: Path) -> None:
    x, y = json.loads(a.read_text()), json.loads(b.read_text())
    for k in x:
        same = {f: x[k][f] == y[k][f] for f in ("data", "labels", "certified", "decoded", "stats")}
        print(k, "identical" if all(same.values()) else f"DIFFERENT {same}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compare", type=Path, nargs=2)
    args = ap.parse_args()
    compare(*args.compare) if args.compare else run(args.out)
