"""The registries of probe kinds and metric kinds: what each kind is, said once.

A probe kind says how its address is written, what an expression may read where it fires
(arguments, a return value), and the kernel mechanism it needs. A metric kind says which spec
key makes one, whether it has buckets, and how many slots its map keeps per label set. The spec
loader, the type checker and lowering read these entries; each backend keeps a table keyed by
the same names (for metrics: by how they are updated) saying how it renders a kind, and what is
not in a backend's table is what that backend cannot do (compiler/backends/base.py reports it).

Adding a probe kind: an entry here, its address in the spec loader, its resolution in
compiler/ir/resolve.py, a row in each backend's PROBES table and the runtime's attachment.
Adding a metric kind: an entry here, its spec form in the loader, its lowering if its updates are
new, its export in the runtime (runtime/manifest.py MetricKind, runtime/exporter.py) and its
dashboard panel; the backends render it without a change while it updates as an existing kind
does (`gauge` touched 8 files outside docs and tests, none of them a backend or a template).
"""

from __future__ import annotations

from dataclasses import dataclass


# --- probe kinds ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeKind:
    name: str              # as the spec writes it before ':'
    address: str           # the address grammar, as messages show it
    args: int = 0          # arg0 .. arg{args-1} can be read (0: no positional arguments)
    retval: bool = False   # `retval` can be read
    mechanism: str = ""    # the kernel feature it needs beyond tracepoints and uprobes: kprobes | fentry
    lowers_to: str = ""    # the IR kind it becomes, when not its own name (syscall -> tracepoint)
    picks: tuple[str, ...] = ()   # spans only: the IR kinds it chooses from, in order, by what the kernel has


PROBE_KINDS: dict[str, ProbeKind] = {k.name: k for k in (
    ProbeKind("tracepoint", "tracepoint:CATEGORY:NAME"),
    ProbeKind("syscall", "syscall:NAME", lowers_to="tracepoint"),
    ProbeKind("syscallret", "syscallret:NAME", retval=True, lowers_to="tracepoint"),
    ProbeKind("uprobe", "uprobe:BINARY:SYMBOL", args=10),
    ProbeKind("uretprobe", "uretprobe:BINARY:SYMBOL", retval=True),
    ProbeKind("usdt", "usdt:BINARY:PROVIDER:NAME", args=12),
    ProbeKind("kprobe", "kprobe:FUNCTION", args=6, mechanism="kprobes"),
    ProbeKind("kretprobe", "kretprobe:FUNCTION", retval=True, mechanism="kprobes"),
    ProbeKind("fentry", "fentry:FUNCTION", args=6, mechanism="fentry"),
    ProbeKind("fexit", "fexit:FUNCTION", retval=True, mechanism="fentry"),
    ProbeKind("kernel", "kernel:FUNCTION", picks=("fentry", "kprobe")),
    ProbeKind("kernelret", "kernelret:FUNCTION", picks=("fexit", "kretprobe")),
    ProbeKind("profile", "profile:hz:N"),
    ProbeKind("interval", "interval:s:N or interval:ms:N"),
)}

# What a program attaches: the kinds lowering leaves in the IR (every backend table covers these).
IR_PROBE_KINDS = tuple(k.name for k in PROBE_KINDS.values() if not k.lowers_to and not k.picks)


# --- metric kinds --------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricKind:
    name: str              # the manifest's metric kind (runtime/manifest.py MetricKind)
    spec_keys: tuple[str, ...]   # the spec keys that make a metric of this kind
    buckets: bool = False  # has bucket edges, a +Inf bucket and a sum
    suffix: str = ""       # what its Prometheus name ends in, by convention
    # The family and sample names the runtime exports for a metric NAME (runtime/exporter.py);
    # {base} is NAME without `_total`. `_created` is Prometheus's own suffix.
    exports: tuple[str, ...] = ("{name}",)
    # How lowering updates it: where a probe fires or a span ends (`on:`, `count:`, SPAN.duration),
    # or, counting open spans, +1 where its span opens at a key and -1 where it closes there.
    open_spans: bool = False

    @property
    def update(self) -> str:
        """How a probe updates it, which is all a backend renders (compiler/backends/base.py):
        `add` a value to its one slot, or count a value in its `buckets` and add it to the sum."""
        return "buckets" if self.buckets else "add"

    def slots(self, edges: tuple[int, ...]) -> int:
        """Map slots per label set: one value, or a count per bucket, the +Inf bucket and the sum."""
        return len(edges) + 2 if self.buckets else 1

    def exposed_names(self, name: str) -> tuple[str, ...]:
        base = name[:-6] if name.endswith("_total") else name
        return tuple(form.format(name=name, base=base) for form in self.exports)


METRIC_KINDS: dict[str, MetricKind] = {k.name: k for k in (
    # a histogram, with the summary NAME_window of its window quantiles beside it (a summary's own
    # _count and _sum names reserved too)
    MetricKind("histogram", ("histogram", "parts"), buckets=True,
               exports=("{name}", "{name}_bucket", "{name}_sum", "{name}_count", "{name}_created", "{name}_window",
                        "{name}_window_count", "{name}_window_sum", "{name}_window_created")),
    MetricKind("counter", ("count", "sum"), suffix="_total", exports=("{base}", "{base}_total", "{base}_created")),
    # `gauge: SPAN.open`: how many of the span are open now (requests in flight, queue depth)
    MetricKind("gauge", ("gauge",), open_spans=True),
)}

# spec key -> the metric kind it makes
METRIC_SPEC_KEYS = {key: k for k in METRIC_KINDS.values() for key in k.spec_keys}
