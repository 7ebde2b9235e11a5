#!/usr/bin/env bash
# Main job: set up (idempotent), run the main suite on real models and data (text, tabular, speech),
# train each model of the suite's defense sweeps under its defense (utility, the frontier's x axis),
# print the leaderboard and write the report (one self-contained HTML page with a privacy-utility
# frontier per modality).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-runs/main}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
rc=0  # bench exits 1 when a trial failed: still write the leaderboard, then exit 1
.venv/bin/python -m eval bench eval/suites/main.toml --out "$OUT" --resume "$@" > /dev/null || rc=$?
[ "$rc" -le 1 ] || exit "$rc"
.venv/bin/python -m eval utility eval/suites/main.toml --out "$OUT" --defended-only --resume \
  || { echo "[main] eval utility failed: the report is written without frontiers" >&2; rc=1; }
.venv/bin/python -m eval leaderboard "$OUT" --format html -o "$OUT/leaderboard.html"
.venv/bin/python -m eval leaderboard "$OUT" --format md | tee "$OUT/leaderboard.md"
.venv/bin/python -m eval report "$OUT" -o "$OUT/report.html" --title "gradleak main job"
echo "records: $OUT/records.jsonl  report: $OUT/report.html  leaderboard: $OUT/leaderboard.html" >&2
exit "$rc"
