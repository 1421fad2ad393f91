#!/usr/bin/env python3
"""What a syscall span costs by how it attaches: the classic per-syscall tracepoints (probec's
`syscall:` spans today, `tp/syscalls/sys_{enter,exit}_getpid`) against the raw syscall
tracepoints with typed arguments (`tp_btf/sys_{enter,exit}`) and untyped (`raw_tp/...`), the
same program body in all three (benchmarks/handwritten/span_tp_btf.bpf.c: task-storage begin,
exp2 histogram).

Two workloads: `pwork getpid N` (the traced syscall: the span's cost per call) and `pwork write N
1` to /dev/null (a syscall the span does not trace: what every other syscall on the machine pays
while it is attached, since the raw tracepoints fire for all of them, and the classic ones make
every syscall take the tracing path too).

Per call added = (median CPU time with the variant - median without probes) / N, over rounds
that alternate the variants (benchmarks/span_overhead.py's method).

Then the sched spans probec generates (benchmarks/handwritten/span_sched.bpf.c), on the same three
attachments: the runqueue span (sched_wakeup and sched_wakeup_new begin, keyed by the woken pid;
sched_switch end, keyed by next_pid: examples/runqueue) and the off-CPU span (sched_switch: begin
at prev_pid, end at next_pid: the off-CPU part of examples/correlation), timed with
`taskset -c 0 runq N 0` (examples/workloads: two threads handing a byte back and forth through two
pipes, both on CPU 0, so every switch is between them and its tracing runs on the workload's own
CPU time). Per switch added = (median CPU with the variant - median with no probes) / the
workload's context switches (voluntary + involuntary from wait4). Each raw sched tracepoint fires
exactly as often as its classic one, so there is no "every other event" cost here.

    flock /tmp/probec-kernel.lock python benchmarks/tp_btf.py [--quick]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import span_overhead as S  # noqa: E402

PWORK = C.WORKLOADS / "pwork"
RUNQ = C.ROOT / "examples" / "workloads" / "build" / "runq"
MECHANISMS = (
    ("classic", "tp/syscalls/sys_{enter,exit}_getpid (classic tracepoints)", ["classic_begin", "classic_end"],
     lambda obj: (obj.program("classic_begin").attach_tracepoint("syscalls", "sys_enter_getpid"),
                  obj.program("classic_end").attach_tracepoint("syscalls", "sys_exit_getpid"))),
    ("tp_btf", "tp_btf/sys_{enter,exit} (typed raw tracepoints, filter on the number)", ["btf_begin", "btf_end"],
     lambda obj: (obj.program("btf_begin").attach(), obj.program("btf_end").attach())),
    ("raw_tp", "raw_tp/sys_{enter,exit} (untyped raw tracepoints)", ["raw_begin", "raw_end"],
     lambda obj: (obj.program("raw_begin").attach_raw_tracepoint("sys_enter"),
                  obj.program("raw_end").attach_raw_tracepoint("sys_exit"))),
)


def variants(obj_path: Path, counted: bool) -> list[S.Variant]:
    out = [S.Variant("baseline", "no probes")]
    for name, label, programs, attach in MECHANISMS:
        out.append(S.Variant(name, label, lambda p=programs, a=attach: C.Handwritten(obj_path, p, a),
                             (lambda ctx: C.hist_count(ctx.obj)) if counted else None))
    return out


def _tp(obj, programs: dict[str, str]):
    for prog, event in programs.items():
        obj.program(prog).attach_tracepoint("sched", event)


def _raw(obj, programs: dict[str, str]):
    for prog, event in programs.items():
        obj.program(prog).attach_raw_tracepoint(event)


def _btf(obj, programs: dict[str, str]):
    for prog in programs:
        obj.program(prog).attach()


SCHED_DOC = next(p for p in __doc__.split("\n\n") if p.startswith("Then the sched spans")).replace("\n", " ")
# construct -> (title, {mechanism: {program: tracepoint}})
SCHED = {
    "runq": ("Runqueue span: sched_wakeup / sched_wakeup_new (pid) -> sched_switch (next_pid)", {
        "classic": {"classic_wakeup_runq": "sched_wakeup", "classic_wakeup_new_runq": "sched_wakeup_new",
                    "classic_switch_runq": "sched_switch"},
        "tp_btf": {"btf_wakeup_runq": "sched_wakeup", "btf_wakeup_new_runq": "sched_wakeup_new",
                   "btf_switch_runq": "sched_switch"},
        "raw_tp": {"raw_wakeup_runq": "sched_wakeup", "raw_wakeup_new_runq": "sched_wakeup_new",
                   "raw_switch_runq": "sched_switch"},
    }),
    "offcpu": ("Off-CPU span: sched_switch (prev_pid) -> sched_switch (next_pid)", {
        "classic": {"classic_switch_offcpu": "sched_switch"},
        "tp_btf": {"btf_switch_offcpu": "sched_switch"},
        "raw_tp": {"raw_switch_offcpu": "sched_switch"},
    }),
}
SCHED_LABELS = {"classic": "tp/sched/* (classic tracepoints: the record, read through CO-RE)",
                "tp_btf": "tp_btf/sched_* (typed arguments: struct task_struct *)",
                "raw_tp": "raw_tp/sched_* (untyped: BPF_CORE_READ)"}
SCHED_ATTACH = {"classic": _tp, "tp_btf": _btf, "raw_tp": _raw}


def sched_variants(obj_path: Path) -> list[S.Variant]:
    out = [S.Variant("baseline", "no probes")]
    for construct, (_, mechanisms) in SCHED.items():
        for mech, programs in mechanisms.items():
            out.append(S.Variant(f"{construct}:{mech}", f"{construct}: {SCHED_LABELS[mech]}",
                                 lambda p=programs, a=SCHED_ATTACH[mech]: C.Handwritten(
                                     obj_path, list(p), lambda obj: a(obj, p)),
                                 lambda ctx: C.hist_count(ctx.obj)))
    return out


def sched_stats_pass(variants: list[S.Variant], argv: list[str]) -> None:
    """One workload run per variant with the kernel's BPF stats on: ns per program run (the
    programs also run for the rest of the machine's switches; ns per run does not mind)."""
    from probec.runtime import libbpf as L
    fd = L.enable_stats()
    try:
        for v in variants[1:]:
            before = set(S.bpf_prog_ids())
            with v.setup():
                C.settle(0.2)
                start = {i: p for i, p in S.bpf_prog_ids().items() if i not in before}
                _, _, switches = C.run_workload(argv)
                after = {i: p for i, p in S.bpf_prog_ids().items() if i in start}
            run_ns = sum(after[i].get("run_time_ns", 0) - start[i].get("run_time_ns", 0) for i in after)
            runs = sum(after[i].get("run_cnt", 0) - start[i].get("run_cnt", 0) for i in after)
            v.bpf = {"ns_per_run": run_ns / runs if runs else float("nan"), "runs_per_switch": runs / switches,
                     "insns": sum(p.get("bytes_xlated", 0) for p in after.values()) // 8}
    finally:
        import os
        os.close(fd)


def sched_table(variants: list[S.Variant], rounds: int, reps: int, n: int) -> tuple[list[str], dict]:
    base = variants[0]
    switches = C.median(base.switches)
    base_c, base_w = C.median(base.cpu), C.median(base.wall)
    lines = [f"## Sched spans: `taskset -c 0 runq {n} 0`", "", SCHED_DOC, "",
             f"{n:,} hand-offs per workload run, {switches:,.0f} context switches (median, no probes), "
             f"{rounds} rounds x {reps} runs per variant, all variants side by side in one run.", "",
             "| variant | ns/switch added (CPU) | ns/switch added (wall) | spread of runs, CPU ns/switch | "
             "BPF ns per run (bpf_stats) | program runs per workload switch | BPF insns (xlated) | "
             "spans counted / workload switches |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| no probes | (per switch: {base_c / switches:,.0f} CPU, {base_w / switches:,.0f} wall) | - | "
             f"{C.spread([c / switches for c in base.cpu])} total | - | - | - | - |"]
    added = {}
    for v in variants[1:]:
        a_c, a_w = (C.median(v.cpu) - base_c) / switches, (C.median(v.wall) - base_w) / switches
        added[v.name] = a_c
        bpf = v.bpf or {}
        counted = ", ".join(f"{c:,}/{sum(v.switches[i * reps:(i + 1) * reps]):,}"
                            for i, (c, _) in enumerate(v.counted[:3])) + (" ..." if len(v.counted) > 3 else "")
        lines.append(f"| {v.label} | **{C.fmt_ns(a_c)}** | {C.fmt_ns(a_w)} | "
                     f"{C.spread([(c - base_c) / switches for c in v.cpu])} | "
                     f"{C.fmt_ns(bpf.get('ns_per_run', float('nan')))} | "
                     f"{bpf.get('runs_per_switch', float('nan')):.2f} | {bpf.get('insns', '-')} | {counted} |")
    lines += ["", f"Spans counted per round ({reps} runs) against the workload's switches in those runs: the "
              "runqueue span counts each wake-up of a workload thread followed by its switch in; the off-CPU "
              "span each stretch a workload thread spends switched out.", ""]
    for construct in SCHED:
        for mech in ("tp_btf", "raw_tp"):
            a, b = added[f"{construct}:{mech}"], added[f"{construct}:classic"]
            lines.append(f"- {construct}: {mech} / classic: **{a / b:.2f}x** CPU per switch ({a:.0f} against {b:.0f} ns)"
                         if b > 0 else f"- {construct}: {mech} {a:.0f} ns, classic {b:.0f} ns")
    return lines, added


WINS = 0.9      # tp_btf is adopted for a construct where it costs at most this much of classic


def sched_decision(added: dict, variants: list[S.Variant]) -> list[str]:
    """tp_btf is what a generator can use (typed fields, no probe reads); raw_tp is shown for
    comparison only."""
    bpf = {v.name: (v.bpf or {}).get("ns_per_run", float("nan")) for v in variants}
    out = ["", "The programs themselves cost the same on all three (BPF ns per run: runq "
           f"{bpf['runq:classic']:.0f} / {bpf['runq:tp_btf']:.0f} / {bpf['runq:raw_tp']:.0f}, off-CPU "
           f"{bpf['offcpu:classic']:.0f} / {bpf['offcpu:tp_btf']:.0f} / {bpf['offcpu:raw_tp']:.0f}, classic / tp_btf / "
           "raw_tp): what tp_btf saves is the work the kernel does before a classic tracepoint's program runs "
           "(a record in the per-CPU perf buffer, both comms copied into it, prev_state computed).",
           "", f"Decision (tp_btf adopted where tp_btf / classic <= {WINS}):"]
    for construct, (title, _) in SCHED.items():
        btf, classic = added[f"{construct}:tp_btf"], added[f"{construct}:classic"]
        keep = "tp_btf" if classic > 0 and btf / classic <= WINS else "classic"
        out.append(f"- {title.split(':')[0]}: **{keep}** (tp_btf {btf:.0f}, raw_tp {added[f'{construct}:raw_tp']:.0f}, "
                   f"classic {classic:.0f} ns per switch)")
    return out


def break_even(added: dict) -> list[str]:
    """Where tp_btf starts to pay: it saves on each traced call and costs on every other syscall."""
    saved = added["getpid"]["classic"][0] - added["getpid"]["tp_btf"][0]
    extra = added["write"]["tp_btf"][0] - added["write"]["classic"][0]
    if saved <= 0 or extra <= 0:
        keep = "tp_btf" if saved > 0 >= extra else "classic"
        return ["", f"Kept for probec's syscall spans: **{keep}** (it costs less on both workloads)."]
    share = extra / (saved + extra)
    return ["", f"tp_btf saves {saved:.0f} ns on each traced call and costs {extra:.0f} ns more on each other "
            f"syscall: it pays only where the traced syscall is more than **{share:.0%}** of all syscalls on "
            "the machine. A collector traces a few syscalls among many (a serving process makes reads, writes, "
            "futexes, epolls), so probec keeps the classic per-syscall tracepoints for `syscall:` spans; the "
            "typed raw tracepoints stay a measured alternative, not the default."]


def main() -> int:
    quick = C.quick_flag()
    C.require_root()
    C.check_lock()
    C.ensure_workloads()
    subprocess.run(["make", "-s", "-C", str(RUNQ.parent.parent)], check=True)
    obj = C.compile_handwritten("span_tp_btf")
    n = 50_000 if quick else 2_000_000
    rounds, reps = (1, 1) if quick else (5, 3)
    lines = C.header("Syscall and sched spans: classic tracepoint vs tp_btf vs raw_tp", "tp_btf.py", quick)
    lines += ["", __doc__.split("\n\n")[0].replace("\n", " "), "",
              "Per call added = (median CPU time with the variant - median with no probes) / N (CPU: user+sys "
              "of the workload from wait4; wall alongside). Same program body in every variant; only the "
              "attachment differs. 'BPF ns per span' from kernel.bpf_stats_enabled in a separate pass."]
    added = {}
    for workload, argv, title in (
            ("getpid", [str(PWORK), "getpid", str(n)], "The traced syscall: `pwork getpid N`"),
            ("write", [str(PWORK), "write", str(n), "1"], "A syscall not traced, while the span is attached: "
                                                          "`pwork write N 1` (to /dev/null)")):
        vs = variants(obj, workload == "getpid")
        C.log(f"{workload}: {len(vs)} variants, {rounds} rounds x {reps} runs")
        S.measure(workload, vs, argv, n, rounds, reps)
        if not quick and workload == "getpid":
            S.bpf_stats_pass(vs, argv, n)
        part, added[workload] = S.table(workload, title, vs, n, rounds, reps)
        lines += [""] + part
    lines += ["", "## Ratios", ""]
    for workload in added:
        for name in ("tp_btf", "raw_tp"):
            a, b = added[workload][name][0], added[workload]["classic"][0]
            lines.append(f"- {workload}: {name} / classic: **{a / b:.2f}x** CPU" if b > 0 else
                         f"- {workload}: {name}: {a:.0f} ns, classic {b:.0f} ns")
    lines += break_even(added)

    runq = ["taskset", "-c", "0", str(RUNQ), str(2_000 if quick else 30_000), "0"]
    vs = sched_variants(C.compile_handwritten("span_sched"))
    C.log(f"sched: {len(vs)} variants, {rounds} rounds x {reps} runs")
    S.measure("sched", vs, runq, 1, rounds, reps)
    if not quick:
        sched_stats_pass(vs, runq)
    part, sched_added = sched_table(vs, rounds, reps, int(runq[-2]))
    lines += ["", *part, *sched_decision(sched_added, vs)]
    C.write_result("tp_btf", lines, quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
