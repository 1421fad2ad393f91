#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine, as root: the packages probec and its tests use,
# tracefs, and the Python package. Safe to run again; does nothing that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(bpftrace clang llvm libbpf-dev libbpf1 bpftool systemtap-sdt-dev libelf-dev zlib1g-dev
          gcc g++ make binutils iproute2
          prometheus                                      # Prometheus and promtool for the real-scrape tests
          python3-bpfcc linux-headers-amd64               # the BCC backend (hosts without BTF)
          qemu-system-x86 busybox-static linux-image-amd64 # the kernel matrix: Debian's 6.1 under qemu
          podman buildah mmdebstrap uidmap                # the collector image
          runc)                                           # podman on cgroup v1/hybrid hosts (crun refuses them)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing packages ${missing[*]}; run as root to install them" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -d /sys/kernel/tracing/events/sched ] && [ "$(id -u)" -eq 0 ]; then
  mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
fi

# virtme-ng boots the matrix kernels with this machine's root file system; it is not packaged for Debian 12.
if [ ! -x /opt/vng/bin/vng ] && [ "$(id -u)" -eq 0 ]; then
  echo "setup: installing virtme-ng into /opt/vng" >&2
  python3 -m venv /opt/vng && /opt/vng/bin/pip install -q --disable-pip-version-check virtme-ng 2>&1 | grep -v "Running pip as the 'root' user" >&2 || true
fi

# The matrix's older kernels (Debian 11's 5.10, Ubuntu 20.04's 5.4), unpacked under /opt/probec-kernels.
# Only `make kernel-matrix` boots them, so an archive out of reach is said here and does not stop the
# set-up; the matrix then reports that kernel as missing and fails.
if [ "$(id -u)" -eq 0 ]; then
  scripts/fetch-kernels.sh || echo "setup: the older kernels of the matrix are not all here (see above)" >&2
fi

PYTHON=${PYTHON:-python3}
# The demo's model server and its test use PyTorch (CPU). A local wheel is used where pip finds one.
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "setup: installing torch 2.13.0 (CPU)" >&2
  "$PYTHON" -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "Running pip as the 'root' user" >&2 || true
fi
# Installed, with its dependencies, and from this checkout (not another clone on the machine).
here=$(pwd -P)
installed=$("$PYTHON" -c "import os, probec.compiler, probec.runtime, lark, jinja2, yaml, prometheus_client, pytest, jsonschema, opentelemetry.sdk, kubernetes_validate
print(os.path.dirname(os.path.dirname(os.path.realpath(probec.compiler.__file__))))" 2>/dev/null || true)
if [ "$installed" != "$here" ] || [ pyproject.toml -nt .setup-stamp ]; then
  echo "setup: installing the probec Python package" >&2
  "$PYTHON" -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "Running pip as the 'root' user" >&2 || true
  "$PYTHON" -c "import probec.compiler, probec.runtime" 
  touch .setup-stamp
fi
