#!/usr/bin/env python3
"""Nanoseconds a span adds per call: (a) probec's generated CO-RE program, (b) our hand-written
libbpf program doing the same work, (c) the bpftrace script probec generates, side by side in
one run.

Two spans: uprobe+uretprobe on pwork_nop (libpwork.so, `push %rbp` first) timed with
`pwork nop N`, and the getpid syscall span (sys_enter_getpid .. sys_exit_getpid) timed with
`pwork getpid N`. For the syscall span, two more begin maps in hand-written form: task-local
storage (BPF_MAP_TYPE_TASK_STORAGE) and a tid-indexed ARRAY.

How: every round attaches each variant in turn (order rotated per round), runs the workload REPS
times, detaches. Per call added = (median time with the variant - median time without probes) / N.
Two clocks: wall time (CLOCK_MONOTONIC around spawn..reap) and the workload's own CPU time
(user+sys from wait4; it excludes time other processes held the CPU, so it is the steadier one on
a shared 2-core machine). Then one more pass with the kernel's BPF stats on gives each variant's
time inside its BPF programs per span and its instruction counts.

    flock /tmp/probec-kernel.lock python benchmarks/span_overhead.py [--quick]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

PWORK = C.WORKLOADS / "pwork"
LIBPWORK = C.WORKLOADS / "libpwork.so"


class Variant:
    def __init__(self, name: str, label: str, setup=None, count=None):
        self.name = name
        self.label = label
        self.setup = setup          # () -> context manager (attached while inside), or None
        self.count = count          # (ctx) -> spans counted, read before detaching
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.switches: list[int] = []   # context switches of the workload per run
        self.counted: list[tuple[int, int]] = []   # (spans counted, calls made) per round
        self.bpf: dict | None = None


def snapshot_count(path: Path, metric: str) -> int:
    try:
        text = path.read_text()
    except OSError:
        return -1
    v = C.metric_value(text, f"{metric}_count")
    return int(v) if v is not None else -1


class ProbecVariant:
    """A bundle under `probec run`, counting through its final snapshot."""

    def __init__(self, bundle: Path, metric: str, scratch: Path):
        self.bundle = bundle
        self.metric = metric
        self.scratch = scratch
        self.n = 0
        self.run = None

    def __enter__(self):
        self.n += 1
        self.snap = self.scratch / f"{self.bundle.name}.{self.n}.prom"
        self.run = C.ProbecRun(self.bundle, snapshot=self.snap).__enter__()
        return self

    def __exit__(self, *exc):
        self.run.stop()

    def counted(self) -> int:
        self.run.stop()             # the snapshot is written on exit
        return snapshot_count(self.snap, self.metric)


def make_variants(span: str, bundles: dict[str, Path], objs: dict[str, Path], scratch: Path) -> list[Variant]:
    metric = {"nop": "bench_nop_duration_seconds", "getpid": "bench_getpid_duration_seconds"}[span]
    out = [Variant("baseline", "no probes")]

    def probec_variant(name, label, bundle):
        pv = ProbecVariant(bundle, metric, scratch)
        out.append(Variant(name, label, lambda: pv, lambda ctx: ctx.counted()))

    def hand_variant(name, label, obj, programs, attach):
        out.append(Variant(name, label, lambda: C.Handwritten(obj, programs, attach), lambda ctx: C.hist_count(ctx.obj)))

    probec_variant("core", "(a) probec core (generated CO-RE C)", bundles["core"])
    if bundles.get("core_socket"):
        probec_variant("core_socket", "(a') probec core, keyed by socket(1) (HASH begin map)", bundles["core_socket"])
    if span == "nop":
        programs, attach = ["uprobe_begin", "uprobe_end"], C.attach_uprobe_pair(LIBPWORK, "pwork_nop")
    else:
        programs, attach = ["getpid_begin", "getpid_end"], C.attach_getpid_pair
    hand_variant("hand", "(b) hand-written libbpf, HASH begin map", objs["span_hash"], programs, attach)
    if "span_task_storage" in objs:
        hand_variant("hand_task", "(b') hand-written, TASK_STORAGE begin", objs["span_task_storage"], programs, attach)
    if "span_tid_array" in objs:
        hand_variant("hand_array", "(b'') hand-written, tid-indexed ARRAY begin", objs["span_tid_array"],
                     programs, attach)
    if bundles.get("bpftrace"):
        probec_variant("bpftrace", "(c) bpftrace 0.17 (probec's generated script)", bundles["bpftrace"])
    return out


def bpf_prog_ids() -> dict[int, dict]:
    r = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True)
    try:
        return {p["id"]: p for p in json.loads(r.stdout or "[]")}
    except ValueError:
        return {}


def measure(span: str, variants: list[Variant], argv: list[str], n: int, rounds: int, reps: int) -> None:
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            ctx_mgr = v.setup() if v.setup else None
            ctx = ctx_mgr.__enter__() if ctx_mgr else None
            try:
                C.settle(0.2)
                for _ in range(reps):
                    wall, cpu, switches = C.run_workload(argv)
                    v.wall.append(wall)
                    v.cpu.append(cpu)
                    v.switches.append(switches)
                if v.count is not None:
                    v.counted.append((v.count(ctx), n * reps))
            finally:
                if ctx_mgr:
                    ctx_mgr.__exit__(None, None, None)
        base = C.median(variants[0].cpu)
        C.log(f"{span} round {r + 1}/{rounds}: " + ", ".join(
            f"{v.name} {(C.median(v.cpu) - base) / n:+.0f}" for v in variants[1:]) + " ns/call (CPU)")


def bpf_stats_pass(variants: list[Variant], argv: list[str], n: int) -> None:
    """One workload run per variant with the kernel's BPF stats on: ns inside the span's BPF
    programs per span, and their instruction counts (xlated / JIT bytes)."""
    from probec.runtime import libbpf as L
    fd = L.enable_stats()
    try:
        for v in variants[1:]:
            before = set(bpf_prog_ids())
            ctx_mgr = v.setup()
            ctx_mgr.__enter__()
            try:
                C.settle(0.2)
                start = {i: p for i, p in bpf_prog_ids().items() if i not in before and p.get("type") != "perf_event"}
                C.time_workload(argv)
                after = {i: p for i, p in bpf_prog_ids().items() if i in start}
            finally:
                ctx_mgr.__exit__(None, None, None)
            run_ns = sum(after[i].get("run_time_ns", 0) - start[i].get("run_time_ns", 0) for i in after)
            runs = sum(after[i].get("run_cnt", 0) - start[i].get("run_cnt", 0) for i in after)
            v.bpf = {
                "ns_per_span": run_ns / (runs / 2) if runs else float("nan"),
                "programs": len(after),
                "insns": sum(p.get("bytes_xlated", 0) for p in after.values()) // 8,
                "jited": sum(p.get("bytes_jited", 0) for p in after.values()),
            }
    finally:
        import os
        os.close(fd)


def table(span: str, title: str, variants: list[Variant], n: int, rounds: int, reps: int) -> tuple[list[str], dict]:
    base_w, base_c = C.median(variants[0].wall), C.median(variants[0].cpu)
    added = {}
    rows = ["| variant | ns/call added (CPU) | ns/call added (wall) | spread of runs, CPU ns/call | "
            "BPF ns per span (bpf_stats) | BPF insns (xlated) | spans counted / calls |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for v in variants:
        a_c = (C.median(v.cpu) - base_c) / n
        a_w = (C.median(v.wall) - base_w) / n
        added[v.name] = (a_c, a_w)
        per_run = [(c - base_c) / n for c in v.cpu] if v.name != "baseline" else [c / n for c in v.cpu]
        counted = ", ".join(f"{c:,}/{m:,}" for c, m in v.counted[:3]) + (" ..." if len(v.counted) > 3 else "") \
            if v.counted else "-"
        bpf = v.bpf or {}
        if v.name == "baseline":
            rows.append(f"| {v.label} | (per call: {base_c / n:,.1f} CPU, {base_w / n:,.1f} wall) | - | "
                        f"{C.spread(per_run)} total | - | - | - |")
        else:
            rows.append(f"| {v.label} | **{C.fmt_ns(a_c)}** | {C.fmt_ns(a_w)} | {C.spread(per_run)} | "
                        f"{C.fmt_ns(bpf.get('ns_per_span', float('nan')))} | {bpf.get('insns', '-')} | {counted} |")
    lines = [f"## {title}", "", f"N = {n:,} calls per workload run, {rounds} rounds x {reps} runs per variant.", ""]
    lines += rows
    lines.append("")
    ratios = []

    def ratio(a, b, label, goal=None):
        if a in added and b in added:
            rc = added[a][0] / added[b][0] if added[b][0] else float("nan")
            rw = added[a][1] / added[b][1] if added[b][1] else float("nan")
            verdict = ""
            if goal is not None:
                verdict = " - **goal met**" if rc <= goal else " - **goal missed**"
                verdict += f" (goal <= {goal}x)"
            ratios.append(f"- {label}: **{rc:.2f}x** CPU, {rw:.2f}x wall{verdict}")
    ratio("core", "hand", "(a) / (b), core / hand-written (HASH begin map)", 1.05)
    ratio("core", "hand_task", "(a) / (b'), core / hand-written with the same TASK_STORAGE begin map", 1.05)
    ratio("core", "bpftrace", "(a) / (c), core / bpftrace", 0.6 if span == "getpid" else None)
    ratio("bpftrace", "hand", "(c) / (b), bpftrace / hand-written")
    ratio("hand_task", "hand", "(b') / (b), TASK_STORAGE / HASH begin map")
    ratio("hand_array", "hand", "(b'') / (b), tid ARRAY / HASH begin map")
    ratio("hand_task", "bpftrace", "(b') / (c), TASK_STORAGE hand-written / bpftrace")
    lines += ratios
    return lines, added


def main() -> int:
    quick = C.quick_flag()
    C.require_root()
    C.check_lock()
    C.ensure_workloads()
    scratch = C.scratch("span-")
    # --quick (the smoke test): the syscall span only, no bpftrace, no tid ARRAY, tiny N
    have_bpftrace = not quick and subprocess.run(["which", "bpftrace"], capture_output=True).returncode == 0
    names = ("span_hash", "span_task_storage") if quick else ("span_hash", "span_task_storage", "span_tid_array")
    objs = {name: C.compile_handwritten(name) for name in names}
    n_nop, n_getpid = (20_000, 50_000) if quick else (1_000_000, 2_000_000)
    rounds, reps = (1, 1) if quick else (5, 3)

    lines = C.header("Span overhead: generated CO-RE vs hand-written libbpf vs bpftrace", "span_overhead.py", quick)
    lines += ["", "Nanoseconds each call of the workload gets slower with the span attached. (a) is what "
              "`probec build --backend core` writes and `probec run` loads; (b) is "
              "`benchmarks/handwritten/span_hash.bpf.c` (HASH begin map keyed by tid, branch-free exp2 bucket "
              "index, one PERCPU_ARRAY value holding buckets and sum) loaded through runtime/libbpf/; (c) is "
              "`probec build --backend bpftrace` run by `probec run`. Same spec for (a) and (c): "
              "`benchmarks/specs/span_nop.yaml`, `benchmarks/specs/span_getpid.yaml`.", "",
              "Per call added = (median time with the variant - median time with no probes) / N, from the "
              "workload's CPU time (user+sys from wait4) and from wall time; rounds alternate the variants, "
              "ratios come from this run only. 'BPF ns per span' is run_time_ns / spans with "
              "kernel.bpf_stats_enabled, in a separate pass (the stats add their own ~20-40 ns per program)."]
    summary = {}
    spans = (
            ("nop", "span_nop.yaml", [str(PWORK), "nop"], n_nop,
             "uprobe + uretprobe span on pwork_nop (libpwork.so, first instruction push %rbp)"),
            ("getpid", "span_getpid.yaml", [str(PWORK), "getpid"], n_getpid,
             "syscall span: sys_enter_getpid .. sys_exit_getpid (classic tracepoints)"))
    for span, spec, argv, n, title in spans[1:] if quick else spans:
        bundles = {"core": C.build_bundle(C.SPECS / spec, "core")}
        if span == "getpid":
            bundles["core_socket"] = C.build_bundle(C.SPECS / "span_getpid_socket.yaml", "core")
        if have_bpftrace:
            bundles["bpftrace"] = C.build_bundle(C.SPECS / spec, "bpftrace")
        variants = make_variants(span, bundles, objs, scratch)
        cmd = argv + [str(n)]
        C.log(f"{span}: {len(variants)} variants, {rounds} rounds x {reps} runs of {' '.join(cmd)}")
        measure(span, variants, cmd, n, rounds, reps)
        if not quick:
            bpf_stats_pass(variants, cmd, n)
        part, added = table(span, title, variants, n, rounds, reps)
        summary[span] = added
        lines += [""] + part
    lines += ["", "## Reading the numbers", "",
              "- A span's cost is what its probes' mechanisms cost (uprobe trap, uretprobe trampoline; tracepoint "
              "entry) plus what its programs do (bpf_stats column). Wall and CPU medians agree within the machine's "
              "noise; the CPU column is the one to compare.",
              "- 'spans counted / calls' checks that each variant did the work: at least one span per call (getpid "
              "counts every process's getpid calls, so a little more)."]
    C.write_result("span_overhead", lines, quick)
    (C.build_dir() / ("span_overhead.quick.json" if quick else "span_overhead.json")).write_text(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
