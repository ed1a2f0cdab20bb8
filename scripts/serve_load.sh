#!/usr/bin/env bash
# Throughput of `kvblend serve` under load (docs/vllm.md, "Under load"): the passages of the
# MuSiQue dev records a run sends are precomputed into a store, then each server configuration is
# started in turn and `kvblend bench load` sends one warm-up record, then LIMIT records of their own
# (passages shuffled) at each concurrency level:
#   full          vLLM prefills every prompt (prefix caching off)
#   prefix        vLLM's automatic prefix caching, no kvblend
#   blend         kvblend blends inside vLLM's worker, on vLLM's weights
#
#   bash scripts/serve_load.sh [OUT_DIR]     # LIMIT=16 CONCURRENCY=1,4,8 KVBLEND=.venv/bin/kvblend
#   SERVE_ARGS="--enforce-eager" adds options to every server (e.g. to skip torch.compile's start-up on CPU)
# Writes OUT_DIR/load.json (the rows), memory.txt (each server's processes' resident memory) and
# prints a markdown table of the rows (req/s against full at each concurrency).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/load}
LIMIT=${LIMIT:-16}
CONCURRENCY=${CONCURRENCY:-1,4,8}
KVBLEND=${KVBLEND:-.venv/bin/kvblend}
PY=${PY:-.venv/bin/python}
PORT=${PORT:-8391}
SERVE_ARGS=${SERVE_ARGS:-}
mkdir -p "$OUT"
rm -f "$OUT/load.json" "$OUT/memory.txt"

$PY - "$OUT/passages.jsonl" "$LIMIT" "$CONCURRENCY" <<'EOF'
import json, sys
from kvblend.eval.datasets import load_dataset
from kvblend.eval.load import records_needed
needed = records_needed(int(sys.argv[2]), len(sys.argv[3].split(",")))  # each level sends records of its own
with open(sys.argv[1], "w") as f:
    for r in load_dataset("musique-dev", top_k=6, limit=needed):
        for c in r.chunks:
            f.write(json.dumps({"text": c}) + "\n")
EOF
# One passage per chunk (they are far below 4096 tokens), so the store holds exactly what requests send.
$KVBLEND precompute "$OUT/passages.jsonl" --store "$OUT/store" --no-index --chunk-tokens 4096 > "$OUT/precompute.log" 2>&1

memory() {  # label pid when: the resident memory of each process of the server's session
  echo "== $1: resident memory of the server's processes (MiB) $3" >> "$OUT/memory.txt"
  ps -o rss=,args= -s "$2" | awk '{printf "%8.0f  %s\n", $1/1024, substr($0, index($0,$2), 90)}' >> "$OUT/memory.txt"
}

run() {  # label method [serve options...]
  local label=$1 method=$2; shift 2
  setsid $KVBLEND serve --store "$OUT/store" --port "$PORT" --kv-cache-bytes 2GiB --max-model-len 8192 \
    --no-precompute-misses $SERVE_ARGS "$@" > "$OUT/serve_$label.log" 2>&1 &
  local pid=$!
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$PORT/v1/models" > /dev/null && break
    kill -0 $pid 2>/dev/null || { echo "server for $label exited; see $OUT/serve_$label.log"; exit 1; }
    sleep 1
  done
  memory "$label" "$pid" "before the load"
  $KVBLEND bench load "http://127.0.0.1:$PORT/v1" --limit "$LIMIT" --method "$method" --label "$label" \
    --concurrency "$CONCURRENCY" --json "$OUT/load.json" || { kill -- -$pid; wait $pid || true; exit 1; }
  memory "$label" "$pid" "after the load"
  kill -- -$pid; wait $pid || true  # the server and its vLLM processes
}

run full full
run prefix full --enable-prefix-caching
run blend blend

$PY - "$OUT/load.json" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))
full = {r["concurrency"]: r["requests_per_s"] for r in rows if r["label"] == "full"}
print("| server | concurrency | req/s | vs full | TTFT p50 (s) | TTFT p99 (s) | failed |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['label']} | {r['concurrency']} | {r['requests_per_s']:.3f} | {r['requests_per_s'] / full[r['concurrency']]:.2f}x "
          f"| {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | {r['failed']} |")
EOF
