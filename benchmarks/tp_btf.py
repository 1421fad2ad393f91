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

    flock /tmp/probec-kernel.lock python benchmarks/tp_btf.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import span_overhead as S  # noqa: E402

PWORK = C.WORKLOADS / "pwork"
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
    obj = C.compile_handwritten("span_tp_btf")
    n = 50_000 if quick else 2_000_000
    rounds, reps = (1, 1) if quick else (5, 3)
    lines = C.header("Syscall span: classic tracepoint vs tp_btf vs raw_tp", "tp_btf.py", quick)
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
    C.write_result("tp_btf", lines, quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
