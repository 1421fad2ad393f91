#!/usr/bin/env bash
# Run every kernel benchmark of probec for real and write benchmarks/results/*.md.
#
#   benchmarks/run_all.sh            full runs (about 15 minutes), results in benchmarks/results/
#   benchmarks/run_all.sh --quick    smoke runs (seconds), tables in benchmarks/build/*.quick.md
#
# The project's kernel lock is taken once and held for the whole run, so no other eBPF work
# perturbs the numbers (the scripts themselves never take it). Needs root, clang, bpftool and
# bpftrace; builds the test workloads first.
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=/tmp/probec-kernel.lock
if [ "${PROBEC_BENCH_LOCKED:-}" != 1 ]; then
    exec env PROBEC_BENCH_LOCKED=1 flock "$LOCK" "$0" "$@"
fi
PY=${PYTHON:-python3}
make -s -C tests/workloads
for bench in span_overhead uprobe_placement collector ringbuf event_cost otlp_events tp_btf containers bcc_backend; do
    echo "== $bench" >&2
    "$PY" "benchmarks/$bench.py" "$@"
done
if [ "${1:-}" != --quick ]; then
    ls -l benchmarks/results/ >&2
fi
