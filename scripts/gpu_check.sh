#!/usr/bin/env bash
# One command on a GPU machine: set up (faiss-gpu where it works), run the GPU tests (pytest -m gpu),
# then the benchmarks and the full-fine-tuning comparison; the table lands in WORK/gpu-check.md.
#   bash scripts/gpu_check.sh [--dry-run] [--no-setup] [--wheels DIR] [gpu_report.py options, e.g. --work DIR --skip quality]
# --dry-run runs every step at tiny sizes (on the CPU too), so this script is tested in CI.
# --wheels DIR: a machine without a package index but with torch (python3): the wheels in DIR (see
# the README's GPU section for the download command) go to a folder on PYTHONPATH, no setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
SETUP=1
WHEELS=
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-setup) SETUP=0 ;;
    --wheels) WHEELS=$2; shift ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
PY=${PYTHON_BIN:-.venv/bin/python}
if [ -n "$WHEELS" ]; then
  SITE=${WHEELS_TARGET:-/tmp/gpu-check-site}
  "${PYTHON_BIN:-python3}" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  PY=${PYTHON_BIN:-python3}
  SETUP=0
fi
[ "$SETUP" = 1 ] && bash scripts/setup.sh
echo "== GPU tests (pytest -m gpu; skipped with the reason where there is no CUDA)"
"$PY" -m pytest -q -m gpu -rs -p no:cacheprovider tests
echo "== benchmarks and full fine-tuning"
export PYTHONUNBUFFERED=1
"$PY" scripts/gpu_report.py "${ARGS[@]}"
