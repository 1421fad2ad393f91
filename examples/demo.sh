#!/usr/bin/env bash
# The README's demo: a PyTorch model served over HTTP on localhost (examples/torch_serving), under
# the bundled spec. probec prototypes it with bpftrace (DEMO_BACKEND=core for the production path),
# shows the request latency histogram with p50/p95/p99 live, and serves Prometheus metrics on
# 127.0.0.1:9435 while a client sends requests with a slow tail (every 10th a big batch).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DURATION=${DEMO_SECONDS:-30}
BACKEND=${DEMO_BACKEND:-bpftrace}
PORT=${DEMO_MODEL_PORT:-8085}
TORCH_LIB=$("$PYTHON" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
export TORCH_LIB
SPEC=examples/torch_serving/spec.yaml

echo "demo: probec check $SPEC" >&2
"$PYTHON" -m probec check "$SPEC"

"$PYTHON" examples/torch_serving/server.py --port "$PORT" > /tmp/probec-demo-server.log 2>&1 &
SERVER=$!
cleanup() {
  [ -n "${RUNNER:-}" ] && kill -INT "$RUNNER" 2>/dev/null && wait "$RUNNER" 2>/dev/null || true
  kill "$SERVER" 2>/dev/null || true
  wait "$SERVER" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 100); do grep -q READY /tmp/probec-demo-server.log 2>/dev/null && break; sleep 0.2; done

"$PYTHON" -m probec run "$SPEC" --backend "$BACKEND" --show --window 10 --duration "$DURATION" \
  --events /tmp/probec-demo-events.jsonl &
RUNNER=$!
sleep 5
"$PYTHON" examples/torch_serving/client.py --port "$PORT" --seconds $((DURATION - 8)) --tail-every 10 >/dev/null
wait "$RUNNER" || true
RUNNER=
echo "demo: sampled slow requests are in /tmp/probec-demo-events.jsonl" >&2
