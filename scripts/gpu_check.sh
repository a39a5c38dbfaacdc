#!/usr/bin/env bash
# One command on a GPU machine: set up (faiss-gpu where it works), run the GPU tests (pytest -m gpu),
# then the benchmarks and the full-fine-tuning comparison; the table lands in WORK/gpu-check.md.
#   bash scripts/gpu_check.sh [--dry-run] [--no-setup] [gpu_report.py options, e.g. --work DIR --skip quality]
# --dry-run runs every step at tiny sizes (on the CPU too), so this script is tested in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
SETUP=1
ARGS=()
for a in "$@"; do
  case "$a" in
    --no-setup) SETUP=0 ;;
    *) ARGS+=("$a") ;;
  esac
done
PY=${PYTHON_BIN:-.venv/bin/python}
[ "$SETUP" = 1 ] && bash scripts/setup.sh
echo "== GPU tests (pytest -m gpu; skipped with the reason where there is no CUDA)"
"$PY" -m pytest -q -m gpu -rs -p no:cacheprovider tests
echo "== benchmarks and full fine-tuning"
export PYTHONUNBUFFERED=1
"$PY" scripts/gpu_report.py "${ARGS[@]}"
