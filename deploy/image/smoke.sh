#!/bin/bash
# Run the collector image with podman as the DaemonSet runs it: every capability dropped but
# CAP_BPF and CAP_PERFMON, the host's PID namespace, read-only host mounts of /sys/kernel/btf,
# /sys/kernel/tracing and /sys/fs/cgroup, a read-only root, the bundles folder mounted read-only.
# It traces a workload that runs outside the container and checks the exact count it exports.
#
#   deploy/image/smoke.sh [TAG]      (`make image-smoke`; builds the image first if it is missing)
#
# Needs root, podman, a built tests/workloads (make -C tests/workloads) and the compiler of this
# checkout (to build the bundle). Loads BPF programs: run it under the kernel-test lock here.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' probec/__init__.py)
TAG=${1:-localhost/probec-runtime:$VERSION}
PORT=${PORT:-19435}
CALLS=7
podman image exists "$TAG" || deploy/image/build.sh "$TAG"
WORK=$(mktemp -d /tmp/probec-smoke.XXXXXX)
NAME=probec-smoke-$$
trap 'podman rm -f "$NAME" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT

cat > "$WORK/spec.yaml" <<SPEC
name: smoke
metrics:
  smoke_getpid_total:
    count: tracepoint:syscalls:sys_enter_getpid
    filter: comm == "smokework"
SPEC
PYTHONPATH=$ROOT ${PYTHON:-python3} -m probec build "$WORK/spec.yaml" --backend core -o "$WORK/bundle" >/dev/null
mkdir "$WORK/bundles"          # flat, as the ConfigMap mounts it
cp "$WORK/bundle/manifest.json" "$WORK/bundles/smoke.manifest.json"
cp "$WORK/bundle/smoke.bpf.o" "$WORK/bundles/"
python3 deploy/image/seccomp.py > "$WORK/seccomp.json"

# This machine's quirks, not the image's: crun refuses cgroup v1/hybrid hosts with controllers on
# the v2 hierarchy (use runc there), and root here lacks CAP_SYS_RESOURCE, so podman's default
# ulimits cannot be set (pass ones at or below the current hard limits).
RUNTIME=()
if [ "$(podman info --format '{{.Host.CgroupsVersion}}')" = v1 ] && command -v runc >/dev/null; then
    RUNTIME=(--runtime runc)
fi
podman run -d --name "$NAME" "${RUNTIME[@]}" \
    --ulimit nofile="$(ulimit -Hn)":"$(ulimit -Hn)" --ulimit nproc=4096:4096 \
    --cap-drop=all --cap-add=bpf,perfmon --security-opt seccomp="$WORK/seccomp.json" \
    --security-opt no-new-privileges --pid=host --network=host --read-only \
    -v /sys/kernel/btf:/sys/kernel/btf:ro -v /sys/kernel/tracing:/sys/kernel/tracing:ro \
    -v /sys/fs/cgroup:/sys/fs/cgroup:ro -v "$WORK/bundles":/etc/probec/bundles:ro \
    "$TAG" run /etc/probec/bundles --port "$PORT" --interval 0.5 >/dev/null
for _ in $(seq 300); do
    podman logs "$NAME" 2>&1 | grep -q "attached" && break
    [ "$(podman inspect -f '{{.State.Running}}' "$NAME")" = true ] || break
    sleep 0.1
done
grep -E '^(Uid|Cap|Seccomp|NoNewPrivs)' "/proc/$(podman inspect -f '{{.State.Pid}}' "$NAME")/status" | sed 's/^/collector: /'
podman exec "$NAME" probec doctor | grep -E '^(uid|capabilities)' | sed 's/^/container: /'
tests/workloads/build/pwork --comm smokework getpid "$CALLS"    # outside the container
sleep 1.5
got=$(python3 - "$PORT" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
print(next((l.split()[-1] for l in text.splitlines() if l.startswith("smoke_getpid_total ")), "none"))
PY
)
podman logs "$NAME" 2>&1 | sed 's/^/container: /'
echo "image $TAG ($(podman image inspect --format '{{.Size}}' "$TAG") bytes): smoke_getpid_total $got, expected $CALLS"
[ "$got" = "$CALLS.0" ]
