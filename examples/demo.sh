#!/usr/bin/env bash
# The README's demo: a C++ "inference runtime" of ours serves requests of known latency with a
# slow tail; probec prototypes the bundled spec under bpftrace and shows the histogram and
# p50/p95/p99 live, while Prometheus metrics are served on 127.0.0.1:9435.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DEMO_SECONDS:-20}
BACKEND=${DEMO_BACKEND:-bpftrace}
WORK=tests/workloads/build

echo "demo: checking examples/inference/spec.yaml" >&2
"$PYTHON" -m probec check examples/inference/spec.yaml

"$PYTHON" -m probec run examples/inference/spec.yaml --backend "$BACKEND" --show --window 10 \
  --duration "$DURATION" --events /tmp/probec-demo-events.jsonl &
RUNNER=$!
trap 'kill -INT $RUNNER 2>/dev/null || true; wait $RUNNER 2>/dev/null || true' EXIT
sleep 4
end=$((SECONDS + DURATION - 6))
while [ $SECONDS -lt $end ] && kill -0 $RUNNER 2>/dev/null; do
  # 95% fast requests (2-4 ms), a 5% tail of 60-120 ms; one long-lived process per ~4 s, as a
  # server is, ending on fast requests (bpftrace 0.17 symbolises stacks only of live processes).
  "$WORK/inference" --comm model-server forward 40 2000 20 4000 3 60000 1 120000 40 2000 20 4000 3 60000 \
    40 2000 20 4000 2 60000 1 120000 40 2000 20 4000 3 60000 50 2000
done
wait $RUNNER
trap - EXIT
echo "demo: sampled slow requests are in /tmp/probec-demo-events.jsonl" >&2
