#!/usr/bin/env bash
# Precompute throughput, side by side in one run: the single-process path, then Ray with 1 and 2 actors,
# each into a fresh store, over the first RECORDS MuSiQue dev records' passages (10 a record).
#   bash scripts/precompute_throughput.sh [RECORDS] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
RECORDS=${1:-4}
THREADS=${2:-2}
BIN=${BIN:-.venv/bin}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$BIN/python" examples/musique_to_jsonl.py musique-dev "$work/musique" --limit "$RECORDS" >/dev/null
run() {  # name, extra args...
  local name=$1; shift
  local line
  line=$("$BIN/kvblend" precompute "$work/musique/passages.jsonl" --store "$work/$name" --no-index --chunk-tokens 1024 "$@" 2>&1 \
         | tr -s ' \n' ' ' | grep -o 'encoded [0-9]* chunks ([0-9,]* tokens[^)]*) in [0-9.]*s')
  local tokens seconds
  tokens=$(echo "$line" | sed -E 's/.*\(([0-9,]+) tokens.*/\1/' | tr -d ,)
  seconds=$(echo "$line" | sed -E 's/.* in ([0-9.]+)s/\1/')
  printf '%-28s %s → %.0f tokens/s\n' "$name" "$line" "$("$BIN/python" -c "print($tokens / $seconds)")"
}
run single-process --threads "$THREADS"
run ray-1-actor --ray local --workers 1 --threads "$THREADS"
run ray-2-actors --ray local --workers 2 --threads $(( THREADS > 1 ? THREADS / 2 : 1 ))
