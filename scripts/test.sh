#!/usr/bin/env bash
# Run the test suite, with a throwaway Redis server on a loopback port when one is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
if command -v redis-server >/dev/null 2>&1 && [ -z "${KVBLEND_TEST_REDIS_URL:-}" ]; then
  port=${KVBLEND_TEST_REDIS_PORT:-6391}
  dir=$(mktemp -d)
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" --daemonize yes \
    --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
  # shutdown waits for the server to exit, so its log is closed before the folder goes
  trap 'redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || kill "$(cat "$dir/redis.pid")" 2>/dev/null || true; sleep 0.2; rm -rf "$dir" || true' EXIT
  for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  export KVBLEND_TEST_REDIS_URL="redis://127.0.0.1:$port/0"
fi
"$BIN/pytest" -q "$@"
