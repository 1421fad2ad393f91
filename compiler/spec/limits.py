"""What both backends can represent, in one table, and the names probec keeps for itself.

`probec check` refuses what falls outside these, so that whatever it accepts builds: the core
backend's C compiled by clang, the bpftrace script accepted by bpftrace 0.17. Each limit says why.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..kinds import METRIC_KINDS


@dataclass(frozen=True)
class Limit:
    low: int
    high: int
    why: str


# bpftrace 0.17 keeps integer literals as signed 64-bit (larger ones fail with `stoull`, or wrap
# negative), so every number the spec writes stays below 2^63 in both backends.
INT_MAX = (1 << 63) - 1

LIMITS = {
    "integer": Limit(0, INT_MAX, "numbers are signed 64-bit in bpftrace"),
    "bucket edge": Limit(0, INT_MAX, "values are compared as signed 64-bit numbers in bpftrace"),
    "sample": Limit(1, INT_MAX, "the event counter is a signed 64-bit number in bpftrace"),
    "rate": Limit(0, INT_MAX, "the per-second counter is a signed 64-bit number in bpftrace"),
    # A BPF map's max_entries is a 32-bit number; begin maps hold 2 x concurrency, a histogram's
    # map series x (buckets + 2): 2^24 x 66 stays below 2^31.
    "interval": Limit(1_000_000, 86_400 * 10**9, "bpftrace reads an interval as a 64-bit count of ms"),
    "limits.concurrency": Limit(1, 1 << 24, "begin maps hold twice this many entries, in kernel memory"),
    "limits.series": Limit(1, 1 << 24, "metric maps hold this many label sets (times the buckets), "
                                       "in kernel memory"),
    "limits.ringbuf": Limit(4096, 1 << 30, "the kernel's ring buffer holds at most 1 GiB here"),
}

# Bytes of BPF's 512-byte stack a generated program may use, leaving room for the compilers'
# temporaries. Measured with clang and bpftrace 0.17 (`bpftrace -d`): 32 comm labels (a 512-byte
# map key) or 30 comm event fields (a 520-byte printf record) fail there; 28 of either build.
STACK_BUDGET = 448
# What a bpftrace printf record holds besides the event's fields: its id, then nsecs, pid, tid, cpu.
BPFTRACE_PRINTF_HEADER = 8 + 4 * 8
# A stack in a bpftrace printf record (its id and the pid it belongs to).
BPFTRACE_STACK_BYTES = 16
# bpftrace 0.17 attaches at most this many probes (BPFTRACE_MAX_PROBES); histograms take at most
# 64 edges in every form (exp2, linear, a list).
MAX_PROBES = 512
# The kernel loads a BPF program that uses at most this many maps (MAX_USED_MAPS): a labelled
# metric takes 3 of them (series, __overflow__, folded label sets), a labelled histogram 4.
MAX_MAPS_PER_PROGRAM = 64
MAX_BUCKETS = 64

# Expressions nest at most this deep: clang stops at 256 nested brackets, and each level of an
# expression is one to three brackets in the generated C.
MAX_EXPRESSION_DEPTH = 64

# Names become C identifiers, bpftrace maps, file names and Prometheus names. 64 characters leave
# room for every prefix and suffix probec adds (the longest file name is NAME.bpf.o; generated
# identifiers add up to about 30 characters).
MAX_NAME_LENGTH = 64

# Spec names that would clash with files of the bundle or the build folder (vmlinux.h).
RESERVED_SPEC_NAMES = ("vmlinux", "probec", "loader", "manifest")

# Keys every event's JSON record carries (runtime/core_runner.py, bpftrace_runner.py): a field
# may have one of these names only as that very value (`fields: [pid]`).
EVENT_RECORD_KEYS = ("event", "ts_ns", "pid", "tid", "cpu")

# Prometheus: the health metrics' prefix, and labels with a meaning of their own.
RESERVED_METRIC_PREFIX = "probec_"
HISTOGRAM_LABELS = ("le", "quantile")     # le: histogram buckets; quantile: the NAME_window summary


def out_of_range(what: str, value: int) -> str:
    """A message for a value outside LIMITS[what], or "" when it is inside."""
    lim = LIMITS[what]
    if lim.low <= value <= lim.high:
        return ""
    bound = f"at most {lim.high:,}" if value > lim.high else f"at least {lim.low:,}"
    return f"{what} must be {bound}, got {value:,}"


def exposed_names(name: str, kind: str) -> tuple[str, ...]:
    """The metric family and sample names the runtime exports for one spec metric of `kind`
    (compiler/kinds.py says them per kind)."""
    return METRIC_KINDS[kind].exposed_names(name)


def expression_depth(expr) -> int:
    """How deep an expression nests (without recursion: the expression may be deep)."""
    from ..expr.ast import Binary, Call, Compare, Logical, Unary
    deepest, stack = 0, [(expr, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(node, Unary):
            stack.append((node.operand, depth + 1))
        elif isinstance(node, (Binary, Compare, Logical)):
            stack += [(node.left, depth + 1), (node.right, depth + 1)]
        elif isinstance(node, Call):
            stack += [(arg, depth + 1) for arg in node.args]
    return deepest
