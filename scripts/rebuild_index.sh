#!/usr/bin/env bash
# Embed the catalog with a checkpoint (copying the rows of images unchanged since the last rebuild)
# and build a fresh index keeping each image's id, then swap it into place atomically: a running
# `retrieval serve` picks it up without a restart. With nothing changed the index is left as it was.
#   scripts/rebuild_index.sh CATALOG CHECKPOINT INDEX_DIR [--type flat|ivf|hnsw|ivfpq] [--shared-view file|embedding] [embed options...]
# One rebuild per INDEX_DIR at a time (flock on .INDEX_DIR.lock beside it; a second one exits 75 with
# "another rebuild ... is running (pid N)"). SIGINT/SIGTERM/SIGHUP stop the running step too; the
# embeddings work file stays, and the next run resumes it (or, finished for the same checkpoint,
# catalog and options, builds from it without embedding again).
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 CATALOG CHECKPOINT INDEX_DIR [--type TYPE] [--shared-view VIEW] [retrieval embed options]" >&2
  exit 2
fi
catalog=$1 checkpoint=$2 index_dir=${3%/}
shift 3
type=flat shared_view=file
while :; do  # the index build's own options, in either order, before the embed options
  case "${1:-}" in
    --type) type=${2:-}; shift $(( $# > 1 ? 2 : 1 )) ;;
    --shared-view) shared_view=${2:-}; shift $(( $# > 1 ? 2 : 1 )) ;;
    *) break ;;
  esac
done
# checked before the embedding, which takes the longest
case "$type" in flat|ivf|hnsw|ivfpq) ;; *) echo "$0: --type takes flat, ivf, hnsw or ivfpq (got '$type')" >&2; exit 2 ;; esac
case "$shared_view" in file|embedding) ;; *) echo "$0: --shared-view takes file or embedding (got '$shared_view')" >&2; exit 2 ;; esac
if [ -e "$index_dir" ] && { [ ! -d "$index_dir" ] || { [ ! -f "$index_dir/sidecar.json" ] && [ -n "$(ls -A "$index_dir")" ]; }; }; then
  echo "$0: $index_dir is not an index (a file, or a folder of other files without sidecar.json); rebuilding" \
       "there would delete it: choose a new or empty folder" >&2
  exit 2
fi
retrieval=${RETRIEVAL:-retrieval}
parent=$(dirname "$index_dir") name=$(basename "$index_dir")
mkdir -p "$parent"

# The lock is inherited by the steps: a step that outlives this script (kill -9) still holds it.
lock="$parent/.$name.lock"
exec 9<>"$lock"  # read-write without truncating: the holder's pid stays readable
if ! flock -n 9; then
  holder=$(cat "$lock" 2>/dev/null || true)
  holder=${holder:-unknown}
  detail=""
  if [ "$holder" != unknown ] && ! kill -0 "$holder" 2>/dev/null; then
    detail="; pid $holder has exited but a step it started still holds $lock (fuser -v $lock shows it)"
  fi
  echo "$0: another rebuild of $index_dir is running (pid $holder)$detail" >&2
  exit 75
fi
echo $$ >"$lock"
# its steps run under this lock: `retrieval index build` takes it unless it is the one named here
export RETRIEVAL_INDEX_LOCK="$(cd "$parent" && pwd -P)/.$name.lock"

child=""
stop() {  # $1: exit status; stop the running step, which otherwise goes on without us
  trap - INT TERM HUP
  if [ -n "$child" ]; then
    kill -TERM "$child" 2>/dev/null || true
    wait "$child" 2>/dev/null || true
  fi
  echo "$0: stopped; the next run resumes the embedding" >&2
  exit "$1"
}
trap 'stop 130' INT
trap 'stop 143' TERM
trap 'stop 129' HUP

step() {  # run a step in the background and wait for it, so that a signal reaches the trap at once
  "$@" &
  child=$!
  wait "$child"
  child=""
}

work="$parent/.$name.rebuild"
mkdir -p "$work"
# the embeddings file survives an interrupted run: the next run resumes it, or, once embed finished for
# the same checkpoint, catalog and options (what $work/embedded records), goes straight to the build
# (the checkpoint and labels.csv through links; no file of the catalog written or changed since the
# finished embedding: the change time too, which a copy keeping the old times (cp -p, rsync -a) cannot keep;
# a new hard link or a chmod changes it as well, and costs an embedding again, never a stale index)
made="$({ stat -L -c '%s %Y' "$checkpoint" "$catalog/labels.csv" 2>/dev/null || true; } | tr '\n' ' ')$*"
if [ -f "$work/embeddings.h5" ] && [ "$(cat "$work/embedded" 2>/dev/null)" = "$made" ] \
   && [ -z "$(find -L "$catalog" "$checkpoint" \( -newer "$work/embedded" -o -cnewer "$work/embedded" \) \
              -print -quit 2>/dev/null)" ]; then
  echo "$0: $work/embeddings.h5 was finished by a run stopped after it: building the index from it"
else
  rm -f "$work/embedded"
  # the last rebuild's embeddings: the rows of images unchanged since are copied, the rest computed
  reuse=()
  if [ -f "$parent/$name.embeddings.h5" ]; then reuse=(--reuse "$parent/$name.embeddings.h5"); fi
  step "$retrieval" embed --checkpoint "$checkpoint" --catalog "$catalog" --out "$work/embeddings.h5" ${reuse[@]+"${reuse[@]}"} "$@"
  printf '%s' "$made" >"$work/embedded"
fi
# index build writes beside INDEX_DIR (removing what killed builds left there) and renames into place
# (left as it is when it holds what the build would write: nothing changed, no server reloads)
step "$retrieval" index build --embeddings "$work/embeddings.h5" --catalog "$catalog" --out "$index_dir" --type "$type" --shared-view "$shared_view" --skip-unchanged
# always: an index left as it was says nothing of the file (new image times, an item added outside)
mv -f "$work/embeddings.h5" "$parent/$name.embeddings.h5"
rm -f "$work/embedded"
rmdir "$work" 2>/dev/null || true
echo "Index $index_dir is up to date with $catalog and $checkpoint"
