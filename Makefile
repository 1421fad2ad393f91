# The two commands of the README: `make demo` and `make test`. Both set up what they need.
PYTHON ?= python3
export PYTHON

.PHONY: setup workloads demo test check fuzz bench soak kernel-matrix clean image image-smoke deploy-bundles

setup:
	@bash scripts/setup.sh

workloads: setup
	@$(MAKE) -s -C tests/workloads
	@$(MAKE) -s -C examples/workloads

demo: workloads
	@bash examples/demo.sh

test: workloads
	@$(PYTHON) -m pytest -q -p no:cacheprovider tests

check: setup
	@$(PYTHON) -m probec check specs/*.yaml examples/*/spec.yaml

# The spec fuzzer at length: FUZZ_SEED (default 1), FUZZ_CASES (default 5000), FUZZ_JOBS (default: all
# cores), FUZZ_BPFTRACE_PARSE=1 to parse each built script with `bpftrace -d` (root).
fuzz: workloads
	@$(PYTHON) tests/spec_fuzzer.py

bench: workloads
	@$(PYTHON) benchmarks/check_speed.py

# An hour of the core collector under load (SOAK_SECONDS=300 for five minutes): exact counts, RSS
# and fds over time, in benchmarks/results/soak.md.
soak: workloads
	@$(PYTHON) benchmarks/soak.py

# The kernel matrix (tests/kernels/): every example's core bundle, built once here with --kernel any,
# loaded and checked on this kernel and on Debian 12's 6.1 under qemu (virtme-ng), with the bpftrace
# backend and tcp_sendmsg on fentry, kprobe and the syscall fallback; writes docs/kernel-matrix.md.
# About 25 minutes (most of it the guest: software emulation); KERNELS=host or KERNELS=6.1, SUITES=spans
# (of core-kernel, core-user, core-torch, bpftrace-kernel, bpftrace-user, bpftrace-torch, spans, bcc) for a part.
# Seconds per suite in the 6.1 guest, boot included: see tests/kernels/run_matrix.py. KERNELS=5.10,5.4
# boots the older kernels scripts/fetch-kernels.sh unpacks; the table keeps the runs of kernels not run.
KERNELS ?= host,6.1
SUITES ?= core-kernel,core-user,core-torch,bpftrace-kernel,bpftrace-user,bpftrace-torch,spans,bcc
kernel-matrix: workloads
	@$(PYTHON) tests/kernels/run_matrix.py --kernels $(KERNELS) --suites $(SUITES) --write-docs

clean:
	@$(MAKE) -s -C tests/workloads clean
	@$(MAKE) -s -C examples/workloads clean
	rm -rf build *.egg-info .setup-stamp

# The collector image (Debian rootfs + the runtime, no compiler): minutes and the Debian mirror, so
# not part of `make test`. image-smoke runs it with podman, least privilege, against a workload.
image:
	@bash deploy/image/build.sh

image-smoke: workloads
	@flock /tmp/probec-kernel.lock bash deploy/image/smoke.sh

# deploy/bundles/ from deploy/specs/ (the ConfigMap of deploy/kustomization.yaml)
deploy-bundles: setup
	@bash deploy/build-bundles.sh
