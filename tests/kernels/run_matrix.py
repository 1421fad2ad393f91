"""`make kernel-matrix`: build every example's core bundle once, here, with --kernel any, then run
the tests/kernels suite against those bundles on this machine's kernel and on Debian 12's 6.1
under qemu (virtme-ng, software emulation), and write docs/kernel-matrix.md from the results.

    python3 tests/kernels/run_matrix.py [--kernels host,6.1] [--suites core-kernel,spans] [-k EXPR]

Every kernel run holds the shared kernel lock (/tmp/probec-kernel.lock) and a time limit; a guest
that does not finish in time is killed and its run counts as failed. The exit status is 1 when any
run failed, timed out or wrote no results, so CI fails instead of hanging or skipping.
Results: build/kernel-matrix/ (a JSON file per kernel and suite, and results.json, all merged);
with --write-docs, docs/kernel-matrix.json and docs/kernel-matrix.md too."""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
LOCK = "/tmp/probec-kernel.lock"
# One guest boot per suite (pytest file, -k expression, time limit in seconds), each well under
# its limit in the 6.1 guest under software emulation (booting takes 10-25 s). Seconds each took
# there in the full run of 2026-11-30 03:00 UTC, boot included: core-kernel 66, core-user 59,
# core-torch 107, bpftrace-kernel 123, bpftrace-user 123, bpftrace-torch 168 (283 in a run beside
# other guests), spans 73, bcc 194. The PyTorch example has a suite per backend with a longer
# limit: there the server's `import torch` alone takes minutes. core-user took 290 s in Debian
# 11's 5.10 guest and once ran past 360 s there (142 s in the next run); bcc, which compiles each
# program in the guest, ran past 360 s on Ubuntu's 5.4.
KERNEL_SIDE = "send_latency or runqueue or retransmits"
TORCH = "torch_serving"
EXAMPLES = "tests/kernels/matrix_examples.py"
SUITES = {"core-kernel": (EXAMPLES, f"core and ({KERNEL_SIDE})", 360),
          "core-user": (EXAMPLES, f"core and not ({KERNEL_SIDE} or {TORCH})", 600),
          "core-torch": (EXAMPLES, f"core and {TORCH}", 600),
          "bpftrace-kernel": (EXAMPLES, f"bpftrace and ({KERNEL_SIDE})", 360),
          "bpftrace-user": (EXAMPLES, f"bpftrace and not ({KERNEL_SIDE} or {TORCH})", 360),
          "bpftrace-torch": (EXAMPLES, f"bpftrace and {TORCH}", 600),
          "spans": ("tests/kernels/matrix_kernel_spans.py", "", 360),
          "bcc": ("tests/kernels/matrix_bcc.py", "", 600)}
VNG = "/opt/vng/bin/vng"


KERNELS_DIR = os.environ.get("PROBEC_KERNELS_DIR", "/opt/probec-kernels")
# Older kernels that scripts/fetch-kernels.sh unpacks (not installed into /boot), by name: image glob.
OLD_KERNELS = {"5.10": "5.10.0-*-amd64/boot/vmlinuz-5.10.0-*-amd64",      # Debian 11: no task storage
               "5.4": "5.4.0-*-generic/boot/vmlinuz-5.4.0-*-generic"}     # Ubuntu 20.04: no ring buffer, no BTF


def guest_kernels() -> dict[str, str]:
    """Kernel images to boot, by name: Debian's generic 6.1 (the cloud flavour has no 9p), and the
    older kernels of scripts/fetch-kernels.sh where it has fetched them (their modules, 9p
    included, beside them: virtme-ng finds DIR/lib/modules from DIR/boot/vmlinuz-*)."""
    images = {"6.1": path for path in sorted(glob.glob("/boot/vmlinuz-6.1.0-*-amd64"))[-1:]}
    for name, pattern in OLD_KERNELS.items():
        found = [p for p in sorted(glob.glob(os.path.join(KERNELS_DIR, pattern)))
                 if os.path.exists(os.path.join(p.split("/boot/")[0], ".complete"))]
        if found:
            images[name] = found[-1]
    return images


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, text=True, **kw)


def build_bundles(out: Path) -> list[dict]:
    """Core bundles of examples/NAME/spec.yaml (as NAME.core) and tests/kernels/specs/NAME.yaml,
    built with --kernel any; a build that fails is reported as a failed row."""
    for folder in ("tests/workloads", "examples/workloads"):
        run(["make", "-s", "-C", folder], check=True)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = dict(os.environ)
    torch = importlib.util.find_spec("torch")
    if torch is not None:
        env.setdefault("TORCH_LIB", os.path.join(torch.submodule_search_locations[0], "lib"))
    failed = []
    specs = {spec.parent.name: spec for spec in sorted(ROOT.glob("examples/*/spec.yaml"))}
    specs |= {spec.stem: spec for spec in sorted(HERE.glob("specs/*.yaml"))}
    for name, spec in specs.items():
        result = run([sys.executable, "-m", "probec", "build", str(spec), "--backend", "core", "--kernel", "any",
                      "-o", str(out / f"{name}.core")], capture_output=True, env=env, timeout=300)
        if result.returncode != 0:
            failed.append({"construct": f"build of {spec.relative_to(ROOT)} (--kernel any)", "backend": "core",
                           "result": "", "outcome": "failed", "message": result.stderr.strip()[-400:],
                           "test": "build", "detail": "", "measured": {}, "seconds": 0.0})
        print(f"kernel-matrix: built {name}.core" + (" FAILED" if result.returncode else ""), file=sys.stderr)
    return failed


def pytest_command(suite: str, results: Path, bundles: Path, select: str | None) -> list[str]:
    path, within, _limit = SUITES[suite]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "matrix_plugin", path,
           "--rootdir", str(ROOT)]
    expr = " and ".join(f"({e})" for e in (within, select) if e)
    return cmd + (["-k", expr] if expr else [])


def suite_env(results: Path, bundles: Path) -> dict[str, str]:
    return {"PYTHONPATH": f"{ROOT}:{HERE}", "PYTHONDONTWRITEBYTECODE": "1", "PROBEC_BUNDLES": str(bundles),
            "PROBEC_MATRIX_OUT": str(results), "CI": os.environ.get("CI", "")}


def kernel_lock():
    """The shared kernel lock, held for one kernel run: timing-sensitive kernel tests of others
    must not run beside a guest that takes both cores. Returns the open file (close to release)."""
    import fcntl
    f = open(LOCK, "a")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def run_here(suite: str, results: Path, bundles: Path, select: str | None, limit: int) -> tuple[int, float, float]:
    env = dict(os.environ) | suite_env(results, bundles)
    with kernel_lock():
        start = time.monotonic()
        rc = run(["timeout", "-k", "10", str(limit), *pytest_command(suite, results, bundles, select)],
                 env=env).returncode
        return rc, time.monotonic() - start, 0.0


def run_guest(image: str, suite: str, results: Path, bundles: Path, select: str | None, limit: int,
              rwdir: Path) -> tuple[int, float, float]:
    """Boot IMAGE under qemu and run the suite inside; the guest sees this machine's files
    read-only and writes only under RWDIR (the results and its log). Returns the exit status,
    the seconds from start to power-off, and the seconds it took to boot (to the suite's start)."""
    env = suite_env(results, bundles) | {"PROBEC_MATRIX_GUEST": "1"}
    script = rwdir / f"guest-{suite}.sh"
    exports = " ".join(f"{k}={_quote(v)}" for k, v in env.items())
    script.write_text(
        "#!/bin/bash\n"
        "# Written by tests/kernels/run_matrix.py: runs inside the guest.\n"
        "echo 'kernel-matrix: guest up'\n"
        "mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null\n"
        f"export {exports} PATH={_quote(os.path.dirname(sys.executable))}:$PATH\n"
        f"cd {_quote(str(ROOT))}\n"
        f"{' '.join(_quote(c) for c in pytest_command(suite, results, bundles, select))}\n"
        f"echo $? > {_quote(str(results))}.rc\n")
    cmd = ["nice", "-n", "19", "timeout", "-k", "10", str(limit), VNG, "--run", image,
           "--user", "root", "--cpus", "2", "--memory", "2G", "--disable-kvm", "--force-9p",
           "--rwdir", str(rwdir), "--exec", f"bash {script}"]
    env = dict(os.environ) | {"PATH": f"/opt/vng/bin:{os.environ['PATH']}"}
    booted = 0.0
    with kernel_lock(), open(rwdir / f"guest-{suite}.log", "w") as log:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            if not booted and "kernel-matrix: guest up" in line:
                booted = time.monotonic() - start
            log.write(line)
            sys.stdout.write(line)
        rc = proc.wait()
        took = time.monotonic() - start
    if rc != 0:
        return rc, took, booted          # timeout (124, 137) or qemu failed
    rc_file = Path(f"{results}.rc")
    return (int(rc_file.read_text()) if rc_file.exists() else 125), took, booted


def source_commit() -> str:
    """The commit the run tested, with '+changes' when probec's code or tests differ from it."""
    head = run(["git", "rev-parse", "--short", "HEAD"], capture_output=True).stdout.strip() or "unknown"
    changed = run(["git", "status", "--porcelain", "--", "probec", "compiler", "runtime", "host", "templates",
                   "tests"], capture_output=True).stdout.strip()
    return head + ("+changes" if changed else "")


KERNEL_ORDER = ["host", "6.1", "5.10", "5.4"]


def merge_runs(kept: dict, new: dict) -> dict:
    """docs/kernel-matrix.json after a run: its runs replace those of the same kernel and suite,
    the others stay (each says its commit and date), so the table can be filled a kernel or a suite
    at a time; the host's build failures are the latest run's."""
    done = {(r["kernel"], r["suite"]) for r in new["runs"]}
    runs = [r for r in kept.get("runs", []) if (r["kernel"], r["suite"]) not in done] + new["runs"]
    order = {k: i for i, k in enumerate(KERNEL_ORDER)}
    suites = {s: i for i, s in enumerate(SUITES)}
    runs.sort(key=lambda r: (order.get(r["kernel"], len(order)), suites.get(r["suite"], len(suites))))
    return {"runs": runs, "build_failures": new["build_failures"]}


def _quote(s: str) -> str:
    import shlex
    return shlex.quote(s)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default="host,6.1", help="comma-separated: host, 6.1, 5.10, 5.4 (default host,6.1; "
                   "scripts/fetch-kernels.sh fetches 5.10 and 5.4)")
    p.add_argument("--suites", default=",".join(SUITES), help=f"comma-separated: {', '.join(SUITES)}")
    p.add_argument("-k", dest="select", help="pytest -k expression within the suites")
    p.add_argument("--limit", type=int, help="seconds per kernel and suite (default: each suite's own, SUITES)")
    p.add_argument("--out", default=str(ROOT / "build" / "kernel-matrix"))
    p.add_argument("--write-docs", action="store_true",
                   help="put the results in docs/kernel-matrix.json (replacing the runs of the same kernels and "
                        "suites, keeping the others) and write docs/kernel-matrix.md from it")
    args = p.parse_args()
    unknown = [s for s in args.suites.split(",") if s not in SUITES]
    if unknown:
        p.error(f"no suite {', '.join(unknown)} (suites: {', '.join(SUITES)})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundles = out / "bundles"
    merged = {"runs": [], "build_failures": build_bundles(bundles)}
    images = guest_kernels()
    commit = source_commit()
    status = 1 if merged["build_failures"] else 0
    for kernel in args.kernels.split(","):
        for suite in args.suites.split(","):
            results = out / f"results-{kernel}-{suite}.json"
            results.unlink(missing_ok=True)
            Path(f"{results}.rc").unlink(missing_ok=True)
            limit = args.limit or SUITES[suite][2]
            if kernel == "host":
                rc, took, booted = run_here(suite, results, bundles, args.select, limit)
            elif kernel in images:
                rc, took, booted = run_guest(images[kernel], suite, results, bundles, args.select, limit, out)
            else:
                print(f"kernel-matrix: no image for kernel {kernel} (have: host, {', '.join(images)}"
                      + ("; scripts/fetch-kernels.sh fetches it" if kernel in OLD_KERNELS else "") + ")", file=sys.stderr)
                rc, took, booted = 127, 0.0, 0.0
            found = json.loads(results.read_text()) if results.exists() else None
            if found is not None and found["exitstatus"] is None:
                for row in found["rows"]:      # the test it was in when its time ran out
                    if row["outcome"] == "not reached":
                        row["outcome"], row["message"] = "failed", f"the run hit its time limit ({limit} s) here"
            why = {124: f"timed out after {limit} s", 137: "killed after its time limit"}.get(rc, f"exit {rc}")
            print(f"kernel-matrix: {kernel} {suite}: {why} in {took:.0f} s" + (f" (booted in {booted:.0f} s)"
                  if booted else ""), file=sys.stderr)
            merged["runs"].append({"kernel": kernel, "uname": found["kernel"] if found else None, "suite": suite,
                                   "commit": commit, "date": time.strftime("%Y-%m-%d", time.gmtime()),
                                   "rc": rc, "seconds": round(took), "boot_seconds": round(booted),
                                   "rows": found["rows"] if found else []})
            if rc != 0 or found is None:
                status = 1
    (out / "results.json").write_text(json.dumps(merged, indent=1) + "\n")
    if args.write_docs:
        docs = ROOT / "docs" / "kernel-matrix.json"
        kept = json.loads(docs.read_text()) if docs.exists() else {"runs": []}
        docs.write_text(json.dumps(merge_runs(kept, merged), indent=1) + "\n")
        run([sys.executable, str(HERE / "write_table.py"), str(ROOT / "docs" / "kernel-matrix.json"),
             str(ROOT / "docs" / "kernel-matrix.md")], check=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
