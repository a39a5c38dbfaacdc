#!/usr/bin/env bash
# The whole flow on the built-in demo catalog: set up, generate the catalog, train, embed, index,
# evaluate, audit the labels, then serve the web UI with its label review (Ctrl-C to stop; DEMO_NO_SERVE=1 to skip serving).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$(pwd)/.venv/bin:$PATH"
out=${DEMO_DIR:-demo}
mkdir -p "$out"
[ -f "$out/catalog/labels.csv" ] || retrieval demo-catalog "$out/catalog"
retrieval catalog-info "$out/catalog"
if [ -f "$out/run/last.pt" ]; then resume=--resume; else resume=; fi
retrieval train --catalog "$out/catalog" --out "$out/run" --epochs "${DEMO_EPOCHS:-30}" --image-size 128 $resume
retrieval embed --checkpoint "$out/run/best.pt" --catalog "$out/catalog" --out "$out/embeddings.h5" \
  --trunk-cache "$out/run/trunk-cache.h5"
retrieval index build --embeddings "$out/embeddings.h5" --out "$out/index"
retrieval evaluate --embeddings "$out/embeddings.h5" --catalog "$out/catalog" --out "$out/report"
retrieval audit --checkpoint "$out/run/best.pt" --catalog "$out/catalog" --out "$out/audit"
[ -n "${DEMO_NO_SERVE:-}" ] && exit 0
exec retrieval serve --index "$out/index" --catalog "$out/catalog" --checkpoint "$out/run/best.pt" \
  --report "$out/report" --audit "$out/audit" --review --port "${PORT:-8000}"
