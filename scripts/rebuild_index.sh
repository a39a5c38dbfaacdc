#!/usr/bin/env bash
# Embed the whole catalog with a checkpoint and build a fresh index, then swap it into place
# atomically: a running `retrieval serve` picks it up without a restart.
#   scripts/rebuild_index.sh CATALOG CHECKPOINT INDEX_DIR [--type flat|ivf|hnsw|ivfpq] [embed options...]
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 CATALOG CHECKPOINT INDEX_DIR [--type TYPE] [retrieval embed options]" >&2
  exit 2
fi
catalog=$1 checkpoint=$2 index_dir=${3%/}
shift 3
type=flat
if [ "${1:-}" = "--type" ]; then type=$2; shift 2; fi
retrieval=${RETRIEVAL:-retrieval}
work="$(dirname "$index_dir")/.$(basename "$index_dir").rebuild"
mkdir -p "$work"
# the embeddings file survives an interrupted run: the next run resumes it
"$retrieval" embed --checkpoint "$checkpoint" --catalog "$catalog" --out "$work/embeddings.h5" "$@"
# index build writes beside INDEX_DIR and renames into place
"$retrieval" index build --embeddings "$work/embeddings.h5" --catalog "$catalog" --out "$index_dir" --type "$type"
mv -f "$work/embeddings.h5" "$(dirname "$index_dir")/$(basename "$index_dir").embeddings.h5"
rmdir "$work" 2>/dev/null || true
echo "Index $index_dir rebuilt from $checkpoint"
