#!/usr/bin/env bash
# Corpus → `kvblend precompute` → `kvblend ask`, on CPU with the default model (a few minutes).
# MuSiQue passages of the first RECORDS records become a JSONL corpus; the first record's question is asked.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kvblend-musique}
RECORDS=${RECORDS:-3}
PY=${PYTHON:-python}

"$PY" examples/musique_to_jsonl.py musique-dev "$OUT" --limit "$RECORDS"
kvblend precompute "$OUT/passages.jsonl" --store "$OUT/store" --chunk-tokens 1024 --dry-run
kvblend precompute "$OUT/passages.jsonl" --store "$OUT/store" --chunk-tokens 1024
question=$("$PY" -c 'import json, sys; print(json.loads(open(sys.argv[1]).readline())["question"])' "$OUT/questions.jsonl")
echo "Q: $question"
kvblend ask "$question" --store "$OUT/store" --top-k 6 --max-new-tokens 24
