#!/usr/bin/env python3
"""The collector's own cost: CPU and memory of `probec run` (core backend) while ~100k spans/s
flow, the time one scrape of /metrics takes, and batch vs per-key reads of a 64-bucket per-CPU
histogram through runtime/libbpf/.

How:
  - `probec run` on benchmarks/specs/collector_getpid.yaml (getpid span, histogram labelled by
    comm, a counter), fixed --port, --interval 1. benchmarks/loadgen.c makes getpid spans at a
    paced rate. The collector's CPU is the change of utime+stime in /proc/PID/stat (threads that
    exited included) over the window, divided by the window; RSS from /proc/PID/status.
    Conditions: no spans; 100k spans/s; 100k spans/s and one scrape per second.
  - Scrapes: back-to-back HTTP GETs of /metrics from this process.
  - Map reads: benchmarks/handwritten/maps64.bpf.c, a 64-entry PERCPU_ARRAY and a PERCPU_HASH of
    64 keys (the layouts of an unlabelled and a labelled histogram), filled on every CPU, read with
    64 lookups of known keys, with a get_next_key walk + lookups (Map.items), with one batch
    lookup (Map.items_batch), and with `bpftool map dump -j`.

    flock /tmp/probec-kernel.lock python benchmarks/collector.py [--quick] [--port N]
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
DEFAULT_PORT = 19435


def proc_cpu_s(pid: int) -> float:
    """utime + stime of the whole process (exited threads included), seconds."""
    text = open(f"/proc/{pid}/stat").read()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK      # fields 14 and 15 of proc(5)


def proc_mem_kib(pid: int) -> tuple[int, int]:
    rss = hwm = 0
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return rss, hwm


def scrape(port: int) -> tuple[float, int]:
    t = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        body = r.read()
    return time.perf_counter() - t, len(body)


def collector_load(port: int, seconds: float, rate: int, quick: bool) -> tuple[list[str], dict]:
    bundle = C.build_bundle(C.SPECS / "collector_getpid.yaml", "core")
    loadgen = C.compile_loadgen()
    rows = ["| condition | spans/s made (loadgen) | spans counted | collector CPU, % of one core | "
            "RSS at end | peak RSS | map read time (probec_last_read_seconds) |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    result = {}
    with C.ProbecRun(bundle, port=port, interval=1.0) as run:
        C.settle(2.0)            # imports settled, first reads done
        for name, spans, scrapes in (("no spans", False, False), (f"{rate // 1000}k spans/s", True, False),
                                     (f"{rate // 1000}k spans/s + 1 scrape/s", True, True)):
            before_text = C.metrics_text(port)
            before_count = C.metric_value(before_text, "bench_getpid_total") or 0
            stop = threading.Event()
            read_times: list[float] = []

            def scraper():
                while not stop.wait(1.0):
                    try:
                        text = C.metrics_text(port)
                    except OSError:
                        continue
                    v = C.metric_value(text, "probec_last_read_seconds")
                    if v is not None:
                        read_times.append(v)

            th = threading.Thread(target=scraper, daemon=True) if scrapes else None
            gen = None
            cpu0, t0 = proc_cpu_s(run.pid), time.monotonic()
            if spans:
                gen = subprocess.Popen([str(loadgen), "getpid", str(rate), str(int(rate * seconds))],
                                       stdout=subprocess.PIPE, text=True)
            if th:
                th.start()
            if gen:
                out = gen.communicate()[0]
            else:
                time.sleep(seconds)
                out = ""
            cpu1, t1 = proc_cpu_s(run.pid), time.monotonic()
            stop.set()
            if th:
                th.join()
            rss, hwm = proc_mem_kib(run.pid)
            time.sleep(0.6 if quick else 1.2)        # one more read, so the counter is current
            after_text = C.metrics_text(port)
            counted = (C.metric_value(after_text, "bench_getpid_total") or 0) - before_count
            if not read_times:
                v = C.metric_value(after_text, "probec_last_read_seconds")
                read_times = [v] if v is not None else []
            made = out.split("rate=")[1].strip() if "rate=" in out else "0"
            pct = 100 * (cpu1 - cpu0) / (t1 - t0)
            result[name] = pct
            rows.append(f"| {name} | {int(float(made)):,} | {int(counted):,} | **{pct:.2f} %** | "
                        f"{rss / 1024:.1f} MiB | {hwm / 1024:.1f} MiB | "
                        f"{C.median(read_times) * 1e3:.2f} ms |" if read_times else "- |")
            C.log(f"collector {name}: {pct:.2f}% CPU, RSS {rss / 1024:.1f} MiB")
        # scrape time, collector still running with its series filled
        n = 20 if quick else 300
        times, size = [], 0
        for _ in range(n):
            dt, size = scrape(port)
            times.append(dt)
        times.sort()
        result["scrape_ms"] = C.median(times) * 1e3
        scrape_rows = ["| scrapes | median | p90 | p99 | max | body |", "| --- | --- | --- | --- | --- | --- |",
                       f"| {n} back-to-back | **{C.median(times) * 1e3:.2f} ms** | {times[int(n * 0.9)] * 1e3:.2f} ms | "
                       f"{times[min(n - 1, int(n * 0.99))] * 1e3:.2f} ms | {times[-1] * 1e3:.2f} ms | {size:,} bytes |"]
    lines = ["## Collector CPU and memory while spans flow", "",
             f"`probec run` (core) on `benchmarks/specs/collector_getpid.yaml`, `--port {port} --interval 1`; "
             f"each condition {seconds:g} s; CPU from /proc/PID/stat utime+stime (resolution 1/{CLK_TCK} s, so "
             f"+-{100 / CLK_TCK / seconds:.2f} % here). Goal: under 0.5 % of one core at 100k spans/s.", ""]
    lines += rows
    lines += ["", "## One scrape of /metrics", "", "HTTP GET from this process while the collector above runs "
              "(its series filled by the spans above).", ""] + scrape_rows
    return lines, result


def fill(bmap, keys: list[bytes], ncpu: int) -> None:
    for i, k in enumerate(keys):
        bmap.update(k, [(i * 1000 + c).to_bytes(8, "little") for c in range(ncpu)])


def map_reads(quick: bool) -> tuple[list[str], dict]:
    from probec.runtime import libbpf as L
    obj_path = C.compile_handwritten("maps64")
    reps = 30 if quick else 500
    ncpu = L.num_possible_cpus()
    rows = ["| map (64 entries, per-CPU u64, " + f"{ncpu} possible CPUs) | 64 lookups of known keys | "
            "get_next_key walk + lookups (Map.items) | one batch lookup (Map.items_batch) | bpftool map dump -j |",
            "| --- | --- | --- | --- | --- |"]
    result = {}
    obj = L.BpfObject.open(obj_path)
    try:
        obj.set_autoload("unused", False)
        obj.load()
        arr, hsh = obj.map("hist_array"), obj.map("hist_hash")
        akeys = [i.to_bytes(4, "little") for i in range(64)]
        hkeys = [b"model-server".ljust(16, b"\0") + i.to_bytes(4, "little") + b"\0" * 4 for i in range(64)]
        fill(arr, akeys, ncpu)
        fill(hsh, hkeys, ncpu)
        for label, bmap, keys, name in (("PERCPU_ARRAY (unlabelled histogram)", arr, akeys, "hist_array"),
                                        ("PERCPU_HASH, 24-byte keys (labelled histogram)", hsh, hkeys, "hist_hash")):
            def per_key():
                return [bmap.lookup(k) for k in keys]
            ways = {"per_key": per_key, "walk": bmap.items, "batch": bmap.items_batch}
            samples = {w: [] for w in ways}
            for _ in range(reps):
                for w, fn in ways.items():       # interleaved, so noise hits all three alike
                    t = time.perf_counter()
                    got = fn()
                    samples[w].append(time.perf_counter() - t)
                    assert len(got) == 64, (w, len(got))
            bt = []
            for _ in range(3 if quick else 20):
                t = time.perf_counter()
                subprocess.run(["bpftool", "map", "dump", "name", name, "-j"], capture_output=True)
                bt.append(time.perf_counter() - t)
            med = {w: C.median(s) * 1e6 for w, s in samples.items()}
            result[name] = med
            rows.append(f"| {label} | {med['per_key']:.0f} us | {med['walk']:.0f} us | **{med['batch']:.0f} us** | "
                        f"{C.median(bt) * 1e3:.1f} ms |")
        # the values must agree whichever way they are read
        assert dict(arr.items_batch()) == dict(arr.items()) and dict(hsh.items_batch()) == dict(hsh.items())
    finally:
        obj.close()
    lines = ["## Reading a 64-bucket per-CPU histogram through runtime/libbpf/", "",
             f"Medians of {reps} reads each, the three ways interleaved; the results of all ways are checked equal. "
             "CoreRunner.read() uses the batch lookup.", ""] + rows
    a = result["hist_array"]
    lines += ["", f"- Batch vs per-key on the array: {a['per_key'] / a['batch']:.1f}x faster "
              f"({a['per_key']:.0f} -> {a['batch']:.0f} us); vs the walk {a['walk'] / a['batch']:.1f}x."]
    return lines, result


def main() -> int:
    quick = C.quick_flag()
    C.require_root()
    C.check_lock()
    port = DEFAULT_PORT
    if "--port" in sys.argv:
        port = int(sys.argv[sys.argv.index("--port") + 1])
    seconds = 0.3 if quick else 20.0
    rate = 100_000
    lines = C.header("Collector cost: CPU, memory, scrape, map reads", "collector.py", quick)
    part, _ = collector_load(port, seconds, rate, quick)
    lines += [""] + part
    part, _ = map_reads(quick)
    lines += [""] + part
    C.write_result("collector", lines, quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
