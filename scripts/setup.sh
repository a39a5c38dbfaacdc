#!/usr/bin/env bash
# Create .venv and install the project with its test extras (idempotent; safe to re-run).
#   FAISS=auto (default): faiss-gpu where `nvidia-smi` sees a GPU and the wheel works, else faiss-cpu
#   FAISS=cpu | FAISS=gpu: force one. Exactly one FAISS is installed: both provide the module `faiss`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
FAISS=${FAISS:-auto}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
if [ "$FAISS" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then FAISS=gpu; else FAISS=cpu; fi
fi
# a re-run with nothing changed (the same pyproject.toml, pins and FAISS choice, the project importable)
# installs nothing and needs no network: the stamp says what the last successful run installed
stamp=".venv/.setup-stamp"
want="$(cat pyproject.toml; echo "${TORCH_VERSION:-2.14.1} ${TORCHVISION_VERSION:-0.29.1} $FAISS")"
want=$(printf '%s' "$want" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c 'import retrieval, faiss, torch' 2>/dev/null; then
  echo "Environment ready (unchanged since the last setup): $(pwd)/.venv"
  exit 0
fi
rm -f "$stamp"
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
# torch/torchvision first, pinned to the releases this project is tested with
$PIP install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
install_faiss() {  # $1 = cpu | gpu: remove the other build first (same files), then install the project
  local other=faiss-gpu; [ "$1" = gpu ] && other=faiss-cpu
  $PIP uninstall -q -y "$other" >/dev/null 2>&1 || true
  $PIP install -q -e ".[$1,test,trunks]"
}
if [ "$FAISS" = gpu ]; then
  if install_faiss gpu && .venv/bin/python -c 'import faiss, sys; sys.exit(faiss.get_num_gpus() == 0)'; then
    echo "faiss-gpu installed and sees $(.venv/bin/python -c 'import faiss; print(faiss.get_num_gpus())') GPU(s)"
  else
    echo "warning: no faiss-gpu wheel works with this machine's CUDA; using faiss-cpu (training, embedding" \
         "and evaluation still run on the GPU through torch)" >&2
    $PIP uninstall -q -y faiss-gpu >/dev/null 2>&1 || true
    install_faiss cpu
  fi
else
  install_faiss cpu
fi
echo "$want" > "$stamp"
echo "Environment ready: $(pwd)/.venv ($(.venv/bin/python -c 'import torch, faiss; print("torch", torch.__version__, "faiss", faiss.__version__, "cuda", torch.cuda.is_available())'))"
