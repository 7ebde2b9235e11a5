"""The performance suite: every attack next to its baseline in the same run (issue 18).

    .venv/bin/python bench/perf.py [--quick] [--device cpu|cuda] [--only tableak,lamp,dager] [--out results/bench]

Each section is a module ``bench/perf_<name>.py`` exposing ``measure(*, quick: bool, device: str)
-> list[dict]``; a row has the keys of :data:`ROW_KEYS` (``ratio`` = baseline seconds / variant
seconds, ``peak_rss_mb`` the variant's own peak resident memory where the section measures it in a
fresh process); optional keys ``cpu_s`` and ``ratio_cpu`` give the same on process CPU time,
which a shared machine distorts far less than the wall clock. A section whose file is missing is skipped with a note. The suite prints one
Markdown table and writes ``perf-<stamp>.md`` and ``perf-<stamp>.jsonl`` under ``--out``; every
JSONL line carries the git commit, the dirty flag, the device, the CPU threads and the host.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECTIONS = {"tableak": "perf_tableak.py", "lamp": "perf_lamp.py", "dager": "perf_dager.py", "speech": "perf_speech.py"}
ROW_KEYS = ("attack", "setting", "variant", "baseline", "wall_s", "ratio", "peak_rss_mb", "metric_name", "metric",
            "notes")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def provenance(device: str) -> dict:
    """Commit, dirty flag, device and threads: stamped on every line."""
    dev = device
    if device.startswith("cuda"):
        try:
            import torch

            dev = f"{device} ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else f"{device} (absent)"
        except Exception:  # noqa: BLE001 - provenance only
            pass
    try:
        ncpu = len(os.sched_getaffinity(0))
    except AttributeError:
        ncpu = os.cpu_count() or 0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    recorded = os.environ.get("GRADLEAK_COMMIT", "")
    if recorded:  # a copy on a device machine: the commit bench/gpu_prepare.sh recorded (its git metadata,
        commit, dirty = recorded, recorded.endswith("-dirty")  # if any, can be older than the tree)
    else:
        commit = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None
    return {"commit": commit, "dirty": dirty,
            "device": dev, "cpu_threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or None,
            "cpus_available": ncpu, "host": platform.node(), "load_avg_1m_at_start": load}


def load_section(name: str, file: str):
    path = HERE / file
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(f"perf_section_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _fmt(v, nd=2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown(rows: list[dict], prov: dict) -> str:
    head = (f"commit `{prov['commit'][:10] or '?'}`{' (dirty)' if prov['dirty'] else ''}, device {prov['device']}, "
            f"OMP threads {prov['cpu_threads']}, {prov['cpus_available']} CPUs, load {prov['load_avg_1m_at_start']}")
    lines = [head, "", "| attack | device | setting | variant | vs | wall s | ratio | CPU s | CPU ratio | peak RSS MB | metric | notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        metric = f"{r.get('metric_name') or ''} {_fmt(r.get('metric'), 3)}".strip()
        dev = r.get("device") or prov["device"]
        lines.append(f"| {r['attack']} | {dev} | {r['setting']} | {r['variant']} | {r['baseline']} | {_fmt(r['wall_s'])} | "
                     f"{_fmt(r['ratio'])}{'x' if r.get('ratio') is not None else ''} | {_fmt(r.get('cpu_s'))} | "
                     f"{_fmt(r.get('ratio_cpu'))}{'x' if r.get('ratio_cpu') is not None else ''} | {_fmt(r['peak_rss_mb'], 0)} | "
                     f"{metric} | {r.get('notes', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations / smaller settings (a smoke run)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (cpu:0: the device code paths on the CPU, a dry run)")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--out", default=str(ROOT / "results" / "bench"))
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not a.device.split(":")[0] in ("cpu", "cuda"):
        print(f"error: --device {a.device!r}: use cpu or cuda", file=sys.stderr)
        return 2
    wanted = [s.strip() for s in a.only.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        print(f"error: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    prov = provenance(a.device)
    rows: list[dict] = []
    for name in wanted:
        mod = load_section(name, SECTIONS[name])
        if mod is None:
            rows.append({k: None for k in ROW_KEYS} | {"attack": name, "setting": "–", "variant": "–", "baseline": "–",
                                                      "notes": f"skipped: bench/{SECTIONS[name]} not present"})
            print(f"[perf] {name}: skipped (bench/{SECTIONS[name]} missing)", flush=True)
            continue
        t0 = time.perf_counter()
        print(f"[perf] {name}: measuring ({'quick' if a.quick else 'full'}, {a.device}) ...", flush=True)
        try:
            got = mod.measure(quick=a.quick, device=a.device)
        except KeyboardInterrupt:  # a time limit (bench/gpu.sh sends SIGINT): keep what the other sections measured
            rows.append({k: None for k in ROW_KEYS} | {"attack": name, "setting": "–", "variant": "–", "baseline": "–",
                                                      "notes": "interrupted (time limit)"})
            print(f"[perf] {name}: interrupted", flush=True)
            break
        except Exception as exc:  # noqa: BLE001 - one failing section must not hide the others
            traceback.print_exc()
            got = [{k: None for k in ROW_KEYS} | {"attack": name, "setting": "–", "variant": "–", "baseline": "–",
                                                  "notes": f"section failed: {type(exc).__name__}: {exc}"[:300]}]
        for r in got:
            missing = [k for k in ROW_KEYS if k not in r]
            if missing:
                r = r | {k: None for k in missing} | {"notes": f"{r.get('notes', '')} (row lacked {missing})"}
            rows.append(r)
        print(f"[perf] {name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    md = markdown(rows, prov)
    print(md)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + ("-quick" if a.quick else "") + f"-{a.device.replace(':', '')}"
    (out / f"perf-{stamp}.md").write_text(md)
    with open(out / f"perf-{stamp}.jsonl", "w") as f:
        for r in rows:
            # a row measured on another device than --device (e.g. the CPU baseline of a cuda run) says so
            dev = r.get("device")
            line = prov | {"quick": a.quick} | r | ({"device": prov["device"]} if dev in (None, a.device) else {})
            f.write(json.dumps(line) + "\n")
    print(f"[perf] wrote {out / f'perf-{stamp}.md'} and .jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
