"""Record what each backend's runtime reads from the kernel for tests/recorded/decode.yaml, for the
decoder unit tests in tests/test_decoders.py (which then run anywhere, without root).

  core.json:        the metric maps' contents as the core runner reads them (bpf_map_lookup_batch:
                    key bytes and per-CPU value bytes) and the ring-buffer records, in hex
  bpftrace.jsonl:   the stdout of `bpftrace -f json` running the bpftrace bundle, line by line

Needs root, clang, bpftrace and the test workloads (make -s -C tests/workloads). Run it under the
kernel lock, from the repository root, and commit what it writes after reading the diff:

    flock /tmp/probec-kernel.lock python3 tests/recorded/record.py

The recording then has to match the expectations in tests/test_decoders.py (durations aside, the
workloads make exact counts).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SPEC = HERE / "decode.yaml"
PWORK = ROOT / "tests" / "workloads" / "build" / "pwork"

# (cpu, argv): each pinned to one CPU, and rec_b's, rec_write's and rec_sleep's calls split over both, so that
# per-CPU values differ between CPUs and one key is counted on both; run one after the other so
# that the label sets arrive in a known order (the kernel keeps the first ones).
WORKLOADS = [
    (0, ["--comm", "rec_a", "record", "0", "1", "2", "3", "4", "5", "1023", "1024", "1025",
         str((1 << 64) - 1)]),
    (1, ["--comm", "rec_b", "record", "7"]),
    (0, ["--comm", "rec_b", "record", "7"]),
    (0, ["--comm", "rec_c", "record", "8"]),
    (1, ["--comm", "rec_d", "record", "9"]),
    (1, ["--comm", "rec_write", "write", "2", "10"]),
    (0, ["--comm", "rec_write", "write", "2", "10"]),
    (0, ["--comm", "rec_sleep", "sleep", "2", "700", "1", "1500"]),
    (1, ["--comm", "rec_sleep", "sleep", "1", "700", "1", "1500"]),
]


def run_workloads() -> None:
    for cpu, argv in WORKLOADS:
        subprocess.run(["taskset", "-c", str(cpu), str(PWORK), *argv], check=True, timeout=60)


def build(backend: str, out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "probec", "build", str(SPEC.relative_to(ROOT)), "--backend", backend,
                    "-o", str(out)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    return out


def hexed(value) -> str | list[str]:
    return value.hex() if isinstance(value, (bytes, bytearray)) else [v.hex() for v in value]


def record_core(tmp: Path) -> dict:
    from probec.runtime.core_runner import CoreRunner
    from probec.runtime.manifest import load_bundle
    from probec.runtime.store import MetricStore
    bundle = load_bundle(build("core", tmp / "core"))
    runner = CoreRunner(bundle, MetricStore(bundle.manifest), None, log=lambda message: None)
    records: list[str] = []
    runner.on_record = lambda data: records.append(bytes(data).hex())
    runner.start()
    try:
        run_workloads()
        time.sleep(0.5)                  # the reader drains the ring every 50 ms
        maps = {}
        for m in bundle.manifest["metrics"]:
            for name in (m["map"], m.get("overflow_map"), m.get("folded_map")):
                if name:
                    maps[name] = [[k.hex(), hexed(v)] for k, v in runner.obj.map(name).items_batch()]
    finally:
        runner.stop()
    return {"cpus": os.cpu_count(), "workloads": [argv for _, argv in WORKLOADS], "maps": maps,
            "records": records}


def record_bpftrace(tmp: Path) -> list[str]:
    bundle = build("bpftrace", tmp / "bpftrace")
    manifest = json.loads((bundle / "manifest.json").read_text())
    settings = manifest["bpftrace"]
    env = dict(os.environ, BPFTRACE_MAP_KEYS_MAX=str(settings.get("map_keys_max", 4096)), BPFTRACE_STRLEN="64")
    proc = subprocess.Popen([shutil.which("bpftrace"), "-f", "json", str(bundle / manifest["files"]["script"]), "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    lines = []
    try:
        for line in proc.stdout:          # up to the mark of the script's last probe firing
            lines.append(line.rstrip("\n"))
            if settings["ready_mark"] in line:
                break
        run_workloads()
        time.sleep(3.5)                   # two dumps after the work: both epochs frozen since
    finally:
        proc.send_signal(signal.SIGINT)
    lines += [line.rstrip("\n") for line in proc.stdout]
    proc.wait(30)
    return [line for line in lines if line]


def main() -> int:
    if os.geteuid() != 0:
        print("record.py needs root (it loads BPF programs and runs bpftrace)", file=sys.stderr)
        return 2
    subprocess.run(["make", "-s", "-C", str(ROOT / "tests" / "workloads")], check=True)
    with tempfile.TemporaryDirectory(prefix="probec-record-") as tmp:
        core = record_core(Path(tmp))
        bpftrace = record_bpftrace(Path(tmp))
    (HERE / "core.json").write_text(json.dumps(core, indent=1) + "\n")
    (HERE / "bpftrace.jsonl").write_text("\n".join(bpftrace) + "\n")
    print(f"recorded {sum(len(v) for v in core['maps'].values())} map entries, {len(core['records'])} events "
          f"(core); {len(bpftrace)} lines (bpftrace)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
