"""The core backend: IR -> libbpf CO-RE C, the header it shares with user space, the manifest, a
thin loader and, where clang exists, the compiled object.

Every name, size, offset, bucket table and health slot is computed here; the templates in
`templates/core/` only loop and branch over what this module hands them. Spec strings never reach
the C source as string literals: they become byte arrays (`probec_str_N`), so no spec can inject C;
other outside text (file names, addresses) goes through the filters of `compiler/escaping.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from importlib import resources

from ...diagnostics import Diagnostics, SourceSpan
from ...kinds import METRIC_KINDS
from ...spec.limits import MAX_BUCKETS
from ...ir import nodes as ir
from ..base import Backend, Bundle, template_environment
from ..manifest import contract, field_ctype, map_info, task_map_name
from . import toolchain

U64_MAX = (1 << 64) - 1
MAX_BUCKET_STEPS = 10                  # probec.bpf.h: PROBEC_MAX_BUCKET_STEPS
STACK_DEPTH = 127                      # PERF_MAX_STACK_DEPTH: u64 slots per stack-map entry
COMM_LEN = 16
HEADER_FIELDS = contract.EVENT_HEADER_NAMES
# What emit_event.j2 stores in each header field of an event record (contract.EVENT_HEADER).
HEADER_C = {"event": "{index}", "cpu": "bpf_get_smp_processor_id()", "ts": "probec_now",
            "pid": "probec_id >> 32", "tid": "(__u32)probec_id"}

# sys_exit_* tracepoints: `retval` is the `ret` field (of trace_event_raw_sys_exit, or checked
# against tracefs at load time where BTF did not tell).
SYSCALL_RET_FIELD = ir.TracepointField("ret", 16, 8, ir.SINT)
# Where the kernel has no ring buffer, events go through a perf buffer, built in a per-CPU record.
PERF_MAP, SCRATCH_MAP = "probec_perfbuf", "probec_scratch"
# Tracepoint fields are read through a local copy of the kernel's record type, named with this
# flavour suffix (which CO-RE ignores when it matches types) and holding only the members read.
RECORD_FLAVOUR = "___probec"
SYS_ENTER = "trace_event_raw_sys_enter"   # syscall arguments: args[i], 8 bytes each from offset 16
SYS_ENTER_ARGS, SYS_ENTER_COUNT = 16, 6

# Tracepoints the core backend also attaches in their raw form with typed arguments (`tp_btf`):
# the kernel fills no record, and the program reads the fields from the tasks it is handed. Per
# context switch, a sched span costs about 0.7x its classic-tracepoint form this way
# (benchmarks/results/tp_btf.md; syscall tracepoints stay classic: raw sys_enter fires for every
# syscall). Each classic field -> (argument index, task_struct member) holding the same value, as
# the tracepoint's TP_fast_assign copies it. A probe that reads any other field (prev_state is
# __trace_sched_switch_state() of the arguments; target_cpu is task_cpu(), whose member moved
# between kernels) stays classic only. The typed program is variant 0 of TYPED_GROUP, the classic
# one variant 1: the runtime loads the first that works (no BTF, a kernel before 5.5: classic).
_WOKEN = {"comm": (0, "comm"), "pid": (0, "pid"), "prio": (0, "prio")}
TYPED_TRACEPOINTS: dict[tuple[str, str], dict[str, tuple[int, str]]] = {
    ("sched", "sched_switch"): {"prev_comm": (1, "comm"), "prev_pid": (1, "pid"), "prev_prio": (1, "prio"),
                                "next_comm": (2, "comm"), "next_pid": (2, "pid"), "next_prio": (2, "prio")},
    ("sched", "sched_wakeup"): _WOKEN,
    ("sched", "sched_wakeup_new"): _WOKEN,
}
TYPED_GROUP, TYPED_LABELS, TYPED_SUFFIX = "sched_tracepoints", ("tp_btf", "tracepoint"), "_btf"


@dataclass(frozen=True)
class CoreProbe:
    """How the core backend attaches a probe kind: its SEC() name pattern and the type of its
    context, and the C that reads an argument (`{index}`) or the return value where the kind has
    them (compiler/kinds.py says where; typing refuses them elsewhere)."""
    section: str
    ctx_type: str
    arg: str = ""
    retval: str | ir.TracepointField = ""


CONTEXT_C = {
    "pid": "((__u64)(probec_id >> 32))",
    "tid": "((__u64)(__u32)probec_id)",
    "cgroup": "bpf_get_current_cgroup_id()",
    "cpu": "((__u64)bpf_get_smp_processor_id())",
    "uid": "((__u64)(__u32)bpf_get_current_uid_gid())",
    # shown in user space as the container or pod of that cgroup (runtime/cgroups.py)
    **{name: "bpf_get_current_cgroup_id()" for name in ir.CGROUP_RENDERS},
}
SCALAR_C = {(1, False): "__u8", (2, False): "__u16", (4, False): "__u32", (8, False): "__u64",
            (1, True): "__s8", (2, True): "__s16", (4, True): "__s32", (8, True): "__s64"}


def c_u64(value: int) -> str:
    return f"{value:#x}ULL" if value == U64_MAX else f"{value}ULL"


def c_member(layout_field: ir.Field, is_event_member: bool) -> str:
    """The C member name of a layout field: event fields get `f_` so `pid` cannot clash with the header."""
    if is_event_member and not layout_field.name.startswith("__pad"):
        return "f_" + layout_field.name
    return layout_field.name


def sum_slot(m: ir.Metric) -> int:
    """The slot of a histogram's map that carries its sum: after the +Inf bucket."""
    return len(m.edges) + 1


def bucket_steps(n_edges: int) -> int:
    """log2 of the padded edge table: at least one ~0 pad after the real edges."""
    steps = 1
    while (1 << steps) < n_edges + 1:
        steps += 1
    return steps


# The spec's bucket limit fits the kernel side's bucket search (no table needs refusing here).
assert bucket_steps(MAX_BUCKETS) <= MAX_BUCKET_STEPS


def signed_metrics(program: ir.Program) -> dict[str, bool]:
    """Metrics whose value is signed: the runtime reads their sums as two's complement."""
    signed = {m.name: False for m in program.metrics}
    for p in program.probes:
        for a in p.actions:
            for upd in (a.then if isinstance(a, ir.SpanEnd) else (a,)):
                if isinstance(upd, ir.MetricUpdate) and upd.value is not None and upd.value.type.signed:
                    signed[upd.metric] = True
    return signed


@dataclass
class HealthSlots:
    """Slots of the per-CPU health array: what the runtime reads besides the metrics."""
    slots: list[dict] = field(default_factory=list)

    def add(self, kind: str, name: str = "") -> int:
        for s in self.slots:
            if s["kind"] == kind and s["name"] == name:
                return s["slot"]
        self.slots.append({"slot": len(self.slots), "kind": kind, "name": name})
        return len(self.slots) - 1


class StringTable:
    """Spec string constants as byte arrays, numbered in order of first use."""

    def __init__(self):
        self.names: dict[bytes, str] = {}

    def name(self, value: bytes) -> str:
        if value not in self.names:
            self.names[value] = f"probec_str_{len(self.names)}"
        return self.names[value]

    def definitions(self) -> list[dict]:
        return [{"name": n, "size": len(v) + 1, "bytes": ", ".join(f"{b:#04x}" for b in v + b"\0")}
                for v, n in self.names.items()]


class CExpression:
    """Renders IR expressions as C for one probe, noting what its prologue must provide."""

    def __init__(self, probe: ir.Probe, backend: "CoreBackend"):
        self.probe = probe
        self.backend = backend
        self.needs: set[str] = set()                       # comm, now
        self.duration_uses = 0
        self.tp_strings: dict[str, ir.TracepointField] = {}
        self.tp_fields: dict[str, ir.TracepointField] = {}  # every field read, for load-time checks
        self.tp_members: dict[str, str] = {}                # field -> its member in the record type ("": offset)
        self.prelude: list[str] = []                       # declarations the program computes first
        self.hoisted: dict[ir.IRExpr, str] = {}
        self.fields_read: set[str] = set()                 # tracepoint fields read into locals (prelude)
        # the tp_btf variant of a tracepoint probe: fields from its typed arguments (TYPED_TRACEPOINTS)
        self.typed = TYPED_TRACEPOINTS[(probe.category, probe.name)] if probe.id in backend.typed_probes else None

    def where(self) -> str:
        return self.probe.spec_text or self.probe.id

    def tracepoint_field(self, f: ir.TracepointField) -> ir.TracepointField:
        self.tp_fields[f.name] = f
        self.tp_members[f.name] = self.typed[f.name][1] if self.typed else self.backend.record_member(self.probe, f)
        return f

    def field_place(self, f: ir.TracepointField) -> str:
        """A C expression for the field in the record: through the BTF record type (a CO-RE
        relocation) where the probe has one, else at the build host's offset; in a tp_btf program,
        the member of the task argument that holds it."""
        if self.typed:
            index, member = self.typed[f.name]
            return f"((struct task_struct *)ctx[{index}])->{member}"
        member = self.tp_members[f.name]
        if member:
            return f"((struct {self.probe.record_type}{RECORD_FLAVOUR} *)ctx)->{member}"
        return f"((char *)ctx + {f.offset})"

    def value(self, e: ir.IRExpr) -> str:
        """A C expression of type __u64 or __s64 (per e.type.signed)."""
        if isinstance(e, ir.Context):
            if e.name in ("pid", "tid"):
                self.needs.add("id")
            return CONTEXT_C[e.name]
        if isinstance(e, ir.Arg):
            return self.backend.PROBES[self.probe.kind].arg.format(index=e.index)
        if isinstance(e, ir.Retval):
            retval = self.backend.PROBES[self.probe.kind].retval
            return self.value(retval) if isinstance(retval, ir.TracepointField) else retval
        if isinstance(e, ir.TracepointField):
            f = self.tracepoint_field(e)
            if f.type.kind == "str":
                raise AssertionError("string field used as a number")  # pragma: no cover
            ctype = SCALAR_C[(f.size, f.type.signed)]
            wide = "__s64" if f.type.signed else "__u64"
            if not self.tp_members[f.name]:
                if f.offset % f.size:       # the kernel refuses a context read at an unaligned offset
                    return f"(({wide})({ctype})probec_ctx_unaligned(ctx, {f.offset}, {f.size}))"
                return f"(({wide})*({ctype} *){self.field_place(f)})"
            # Read once, at the top: a relocated offset used twice may be kept in a register and
            # added to ctx, and the verifier refuses a load through a modified ctx pointer.
            name = f"probec_field_{f.name}"
            if name not in self.fields_read:
                self.fields_read.add(name)
                load = self.field_place(f) if f.type.render != "ipv4" else f"*({ctype} *){self.field_place(f)}"
                self.prelude.append(f"{wide} {name} = ({wide}){load};")
            return name
        if isinstance(e, ir.Duration):
            self.needs.add("now")
            self.duration_uses += 1
            return "probec_duration"
        if isinstance(e, ir.SpanTotal):
            total, count = ir.accumulator_maps(e.span)
            return f"probec_acc_read(&{total if e.field == 'total' else count}, {self.value(e.key)})"
        if isinstance(e, ir.ActiveSpan):
            # the first listed span open on this thread wins: (a open ? 1 : (b open ? 2 : 0))
            text = "0ULL"
            for i in reversed(range(len(e.spans))):
                text = f"({self.backend.open_span(ir.Within(e.spans[i], e.key), self)} ? {i + 1}ULL : {text})"
            return text
        if isinstance(e, ir.FdSocket):
            # computed once, at the top of the program: the fd table is the same throughout
            if e not in self.hoisted:
                name = f"probec_socket_{len(self.hoisted)}"
                self.hoisted[e] = name
                self.prelude.append(f"__u64 {name} = probec_fd_socket({self.value(e.fd)});")
            return self.hoisted[e]
        if isinstance(e, ir.Const):
            return c_u64(e.value)
        if isinstance(e, ir.BinOp):
            left, right = self.value(e.left), self.value(e.right)
            if e.op in "/%":
                fn = ("probec_sdiv" if e.op == "/" else "probec_smod") if e.type.signed else \
                     ("probec_udiv" if e.op == "/" else "probec_umod")
                cast = "__s64" if e.type.signed else "__u64"
                return f"{fn}(({cast}){left}, ({cast}){right})"
            result = f"((__u64){left} {e.op} (__u64){right})"
            return f"((__s64){result})" if e.type.signed else result
        if isinstance(e, ir.Neg):
            return f"((__s64)0 - (__s64){self.value(e.operand)})"
        if isinstance(e, (ir.Cmp, ir.StrEq, ir.Logic, ir.Not, ir.CgroupMatch)):
            return f"((__u64){self.condition(e)})"
        raise AssertionError(type(e))  # pragma: no cover

    def condition(self, e: ir.IRExpr) -> str:
        if isinstance(e, ir.Cmp):
            signed = e.left.type.signed or e.right.type.signed
            cast = "__s64" if signed else "__u64"
            return f"(({cast}){self.value(e.left)} {e.op} ({cast}){self.value(e.right)})"
        if isinstance(e, ir.StrEq):
            source, length = self.string(e.left)
            literal = self.backend.strings.name(e.right.value)
            test = f"probec_bytes_eq({source}, {literal}, {len(e.right.value) + 1})"
            if len(e.right.value) + 1 > length:     # cannot match: typing rejects this, stay safe
                test = "false"
            return test if e.op == "==" else f"!{test}"
        if isinstance(e, ir.Logic):
            return f"({self.condition(e.left)} {e.op} {self.condition(e.right)})"
        if isinstance(e, ir.Not):
            return f"(!{self.condition(e.operand)})"
        if isinstance(e, ir.CgroupMatch):
            bit = self.backend.program.cgroup_sets.index((e.attribute, e.value))
            return f"probec_cgroup_has(&{ir.CGROUP_MAP}, {bit})"
        return f"({self.value(e)} != 0)"

    def string(self, e: ir.IRExpr) -> tuple[str, int]:
        """(pointer expression, bytes available) for a string value."""
        if isinstance(e, ir.Context) and e.name == "comm":
            self.needs.add("comm")
            return "probec_comm", COMM_LEN
        if isinstance(e, ir.TracepointField):
            f = self.tracepoint_field(e)
            self.tp_strings[f.name] = f
            return f"probec_tp_{f.name}", f.size
        if isinstance(e, ir.StrConst):
            return self.backend.strings.name(e.value), len(e.value) + 1
        raise AssertionError(type(e))  # pragma: no cover

    def copy_string(self, target: str, length: int, e: ir.IRExpr) -> list[str]:
        """Lines that fill char target[length] from a string value, zero padded."""
        source, available = self.string(e)
        n = min(length, available)
        lines = [f"__builtin_memcpy({target}, {source}, {n});"] if n else []
        if n < length:
            lines.append(f"__builtin_memset({target} + {n}, 0, {length - n});")
        return lines


class CoreBackend(Backend):
    name = "core"
    expression_class = CExpression
    PROBES = {
        "tracepoint": CoreProbe("tp/{category}/{name}", "void *", retval=SYSCALL_RET_FIELD),
        "uprobe": CoreProbe("uprobe", "struct pt_regs *", arg="probec_regs_arg(ctx, {index}, true)"),
        "uretprobe": CoreProbe("uretprobe", "struct pt_regs *", retval="((__s64)PT_REGS_RC(ctx))"),
        "usdt": CoreProbe("usdt", "struct pt_regs *", arg="((__u64)probec_usdt_arg(ctx, {index}))"),
        "kprobe": CoreProbe("kprobe", "struct pt_regs *", arg="probec_regs_arg(ctx, {index}, false)"),
        "kretprobe": CoreProbe("kretprobe", "struct pt_regs *", retval="((__s64)PT_REGS_RC(ctx))"),
        "fentry": CoreProbe("fentry/{name}", "__u64 *", arg="probec_func_arg(ctx, {index})"),
        "fexit": CoreProbe("fexit/{name}", "__u64 *", retval="((__s64)probec_func_ret(ctx))"),
        "profile": CoreProbe("perf_event", "struct bpf_perf_event_data *"),
        "interval": CoreProbe("perf_event", "struct bpf_perf_event_data *"),
    }
    # The template of each way a metric is updated (compiler/kinds.py MetricKind.update).
    UPDATES = {"add": "metric_update.j2", "buckets": "metric_update.j2"}
    FIELD_OFFSETS = ("tracefs was not readable when the spec was checked; mount it "
                     "(mount -t tracefs nodev /sys/kernel/tracing) and rebuild")

    def __init__(self, diags: Diagnostics, compile: bool = True, spec_span: SourceSpan | None = None,
                 task_storage: bool = True):
        super().__init__(diags, spec_span)
        self.compile = compile
        self.typed_probes: set[str] = set()     # ids of the tp_btf variants being written (TYPED_TRACEPOINTS)
        # Spans keyed by the current thread keep their begin time in task-local storage (kernel
        # 5.11+): no hash insert, lookup and delete per span. benchmarks/results/span_overhead.md
        # measured it at 0.6x the HASH begin map on a syscall span.
        self.task_storage = task_storage
        self.task_spans: set[str] = set()
        self.task_maps: frozenset[str] = frozenset()      # their begin maps
        self.task_spans_by_map: dict[str, str] = {}       # begin map -> its span
        self.env = template_environment("core")
        self.strings = StringTable()
        self.health = HealthSlots()
        self.records: dict[str, dict[str, str]] = {}        # record type -> member -> its declaration

    # -- rendering helpers ---------------------------------------------------------------------
    def render(self, template: str, **values) -> str:
        return self.env.get_template(template).render(**values)

    def lines(self, template: str, **values) -> list[str]:
        return self.render(template, **values).rstrip("\n").split("\n")

    # -- names ---------------------------------------------------------------------------------
    @staticmethod
    def generated_names(kind: str, name: str, histogram: bool = False) -> tuple[str, ...]:
        """Maps (span_X_begin, m_X, acc_X_*), structs (the layouts' names) and globals."""
        total, count = ir.accumulator_maps(name)
        if kind == "span":
            return (f"span_{name}_begin", task_map_name(name), total, count)
        if kind == "metric":
            return (f"m_{name}", count, f"struct probec_{name}_key", f"struct probec_{name}_value",
                    f"probec_edges_{name}")
        return (f"struct probec_event_{name}", f"probec_sample_every_{name}", f"probec_max_per_second_{name}",
                f"probec_rate_{name}", f"probec_sampled_{name}")

    @staticmethod
    def struct_name(layout: ir.Layout) -> str:
        return f"probec_{layout.name}"

    def begin_map(self, program: ir.Program, span: str) -> str:
        return next(s.begin_map.name for s in program.spans if s.name == span)

    def record_member(self, probe: ir.Probe, f: ir.TracepointField) -> str:
        """The member of the probe's BTF record type that holds field `f` ("args[2]", "pid"),
        declared for the local copy of the type; "" where the field is read at its offset."""
        record = probe.record_type
        if not record:
            return ""
        if f.type.kind != "str" and f.offset % f.size:
            # at an unaligned offset (tcp:tcp_retransmit_skb's saddr at 34) the field is read a byte
            # at a time at its offset: a relocated offset is added to ctx in a register, and the
            # verifier refuses loads through a modified ctx pointer
            return ""
        members = self.records.setdefault(record, {})
        if record == SYS_ENTER:
            index, rest = divmod(f.offset - SYS_ENTER_ARGS, 8)
            if rest or f.size != 8 or not 0 <= index < SYS_ENTER_COUNT:
                return ""
            members["args"] = f"__u64 args[{SYS_ENTER_COUNT}]"
            return f"args[{index}]"
        if f.type.kind == "str":
            decl = f"char {f.name}[{f.size}]"
        elif f.type.render == "ipv4":
            decl = f"__u8 {f.name}[{f.size}]"
        elif f.ckind == "ptr":
            decl = f"const void *{f.name}"
        elif f.ckind == "enum":
            if f.size != 4:          # a C enum is 4 bytes
                return ""
            decl = f"enum {{ probec_{record}_{f.name} }} {f.name}"
        else:
            decl = f"{SCALAR_C[(f.size, f.type.signed)]} {f.name}"
        members[f.name] = decl
        return f.name

    def thread_keyed_spans(self, program: ir.Program) -> set[str]:
        """Spans only ever asked about at the current thread: begun and ended at its tid, and
        never looked up at another key (a `within` or `active_at` computed elsewhere cannot reach
        this thread's storage)."""
        spans = {s.name for s in program.spans}
        for node in ir.walk((program.probes, program.events)):
            if isinstance(node, (ir.SpanBegin, ir.SpanEnd, ir.Within)) and node.key != ir.TID:
                spans.discard(node.span)
            elif isinstance(node, ir.ActiveSpan) and node.key != ir.TID:
                spans.difference_update(node.spans)
        return spans

    def open_span(self, within: ir.Within, em: CExpression) -> str:
        """A C condition: the span is open at the key (computed here)."""
        begin_map = self.begin_map(self.program, within.span)
        in_hash = f"probec_within(&{begin_map}, {em.value(within.key)})"
        if within.span in self.task_spans:
            return f"({contract.USE_TASK_STORAGE} ? probec_task_within(&{task_map_name(within.span)}) : {in_hash})"
        return in_hash

    @staticmethod
    def either(setting: str, used: list[str], otherwise: list[str]) -> list[str]:
        """Lines that run `used` where the loader left `setting` on, else `otherwise`: the setting
        is a .rodata constant, so the verifier keeps only one of them."""
        return ([f"if ({setting}) {{"] + ["\t" + line if line else "" for line in used] + ["} else {"]
                + ["\t" + line if line else "" for line in otherwise] + ["}"])

    # -- guards and actions --------------------------------------------------------------------
    def guard(self, g: ir.Guard, em: CExpression, program: ir.Program, extra: ir.IRExpr | None = None) -> str:
        parts = []
        for cond in (extra, g.filter):
            if cond is not None:
                parts.append(em.condition(cond))
        parts += [self.open_span(w, em) for w in g.within]
        return " && ".join(parts)

    def action(self, a: ir.Action, em: CExpression, program: ir.Program) -> list[str]:
        if isinstance(a, ir.SpanBegin):
            return self.span_begin(a, em, program)
        if isinstance(a, ir.SpanEnd):
            key = em.value(a.key)
            before = em.duration_uses
            then = [line for t in a.then for line in self.action(t, em, program)]
            if a.accumulate_into:
                em.needs.add("now")
                em.duration_uses += 1
            total, count = ir.accumulator_maps(a.span)
            values = dict(key=key, then=then, duration=em.duration_uses > before,
                          inside=self.open_span(a.inside, em) if a.inside else "", pad="\t" if a.inside else "",
                          outside_slot=self.health.add("span_outside", a.span) if a.inside else -1,
                          accumulate=a.accumulate_into is not None,
                          outer_key=em.value(a.accumulate_into.key) if a.accumulate_into else "",
                          total=total, count=count,
                          clears=[m for inner in a.clears for m in program.accumulators(inner)])
            in_hash = self.lines("span_end.j2", map=self.begin_map(program, a.span), task=False, **values)
            if a.span not in self.task_spans:
                return in_hash
            return self.either(contract.USE_TASK_STORAGE, self.lines(
                "span_end.j2", map=task_map_name(a.span), task=True, **values), in_hash)
        if isinstance(a, ir.MetricUpdate):
            return self.metric_update(a, em, program)
        if isinstance(a, ir.EmitEvent):
            return self.emit_event(a, em, program)
        raise AssertionError(type(a))  # pragma: no cover

    def span_begin(self, a: ir.SpanBegin, em: CExpression, program: ir.Program) -> list[str]:
        """The begin time written at the key under the guard; a span that keeps its first begin
        (restart: false) only where it is not open yet. A thread-keyed span writes it in the
        thread's task storage where the loader found it (probec_use_task_storage), else at the key."""
        em.needs.add("now")
        in_hash = self.span_begin_lines(a, em, program, self.begin_map(program, a.span), False)
        if a.span not in self.task_spans:
            return in_hash
        return self.either(contract.USE_TASK_STORAGE,
                           self.span_begin_lines(a, em, program, task_map_name(a.span), True), in_hash)

    def span_begin_lines(self, a: ir.SpanBegin, em: CExpression, program: ir.Program, begin_map: str,
                         task: bool) -> list[str]:
        guard = self.guard(a.guard, em, program)
        key = em.value(a.key)
        slot = self.health.add("span_overflow", a.span)
        keep_first = "false" if a.restart else "true"
        if task:
            begin = f"probec_task_span_begin(&{begin_map}, probec_now, &probec_health, {slot}, {keep_first});"
            is_open = f"probec_task_within(&{begin_map})"
        else:
            begin = f"probec_span_begin(&{begin_map}, {key}, probec_now, &probec_health, {slot}, {keep_first});"
            is_open = f"probec_within(&{begin_map}, {key})"
        conditions = ([guard] if guard else []) + ([] if a.restart else [f"!{is_open}"])
        return self.lines("span_begin.j2", condition=" && ".join(conditions), begin=begin, key=key,
                          resets=[m for inner in a.resets for m in program.accumulators(inner)])

    def metric_update(self, a: ir.MetricUpdate, em: CExpression, program: ir.Program) -> list[str]:
        m = program.metric(a.metric)
        histogram = METRIC_KINDS[m.kind].buckets
        value = em.value(a.value) if a.value is not None else "1ULL"
        signed = a.value is not None and a.value.type.signed
        key_lines: list[str] = []
        labelled = bool(m.labels)
        if labelled:
            by_name = {lab.name: expr for lab, expr in zip(m.labels, a.labels)}
            for f in m.map.key.fields:
                target = f"probec_k.{f.name}"
                if f.name.startswith("__pad"):
                    key_lines.append(f"__builtin_memset({target}, 0, {f.length});")
                elif f.label:
                    expr = by_name[f.label]
                    if f.kind == "bytes":
                        key_lines += em.copy_string(target, f.length, expr)
                    else:
                        key_lines.append(f"{target} = ({field_ctype(f)}){em.value(expr)};")
        return self.lines(
            self.UPDATES[METRIC_KINDS[m.kind].update], guard=self.guard(a.guard, em, program), histogram=histogram,
            labelled=labelled, value=value, value_ctype="__s64" if signed else "__u64",
            map=m.map.name, key_struct=self.struct_name(m.map.key), key_lines=key_lines,
            bucket=self.bucket_call(m, signed), sum_slot=sum_slot(m),
            full_slot=self.health.add("metric_map_full", m.name) if labelled and histogram else -1,
            overflow_map=m.overflow_map.name if m.overflow_map else "",
            folded_map=m.folded_map.name if m.folded_map else "",
            sets_map=m.sets_map.name if m.sets_map else "",
            counted=program.accumulators(a.metric)[0] if a.accumulate_into else "",
            counted_key=em.value(a.accumulate_into.key) if a.accumulate_into else "")

    def bucket_call(self, m: ir.Metric, signed: bool) -> str:
        """C that computes the bucket of `probec_v` for histogram `m`: a search of its edge table."""
        fn = "probec_bucket_s64" if signed else "probec_bucket_u64"
        return f"{fn}(probec_v, probec_edges_{m.name}, {bucket_steps(len(m.edges))})"

    def emit_event(self, a: ir.EmitEvent, em: CExpression, program: ir.Program) -> list[str]:
        ev = program.event(a.event)
        em.needs.update(("now", "id"))
        fields = {f.name: f for f in ev.fields}
        field_lines: list[str] = []
        stacks = next((mp.name for mp in program.maps if mp.shape == "stacks"), "")
        for lf in ev.record.fields[len(HEADER_FIELDS):]:
            target = f"probec_e->{c_member(lf, True)}"
            if lf.name.startswith("__pad"):
                field_lines.append(f"__builtin_memset({target}, 0, {lf.length});")
                continue
            f = fields[lf.name]
            if f.stack:
                flags = "BPF_F_USER_STACK" if f.stack == "user" else "0"
                field_lines.append(f"{target} = bpf_get_stackid(ctx, &{stacks}, {flags});")
            elif lf.kind == "bytes":
                field_lines += em.copy_string(target, lf.length, f.expr)
            else:
                field_lines.append(f"{target} = ({field_ctype(lf)}){em.value(f.expr)};")
        ringbuf = next(mp.name for mp in program.maps if mp.shape == "ring")
        return self.lines(
            "emit_event.j2", condition=self.guard(a.guard, em, program, extra=a.when),
            name=ev.name, struct=self.struct_name(ev.record), ringbuf=ringbuf, use_ringbuf=contract.USE_RINGBUF,
            use_atomic_fetch=contract.USE_ATOMIC_FETCH,
            perf_map=PERF_MAP, scratch_map=SCRATCH_MAP,
            header_lines=[f"probec_e->{f.name} = {HEADER_C[f.name].format(index=ev.index)};"
                          for f in contract.EVENT_HEADER],
            seen_slot=self.health.add("event_seen", ev.name),
            limited_slot=self.health.add("event_rate_limited", ev.name),
            lost_slot=self.health.add("events_lost"), field_lines=field_lines)

    # -- whole program -------------------------------------------------------------------------
    def probe_program(self, p: ir.Probe, program: ir.Program) -> tuple[str, CExpression]:
        # The BPF stack a program needs is checked in lowering (E351), for both backends.
        kind = self.PROBES[p.kind]
        em = self.expression_class(p, self)
        actions: list[str] = []
        for a in p.actions:
            actions += self.action(a, em, program)
        text = self.render(
            "probe.bpf.c.j2", comment=(p.spec_text or p.id) + (" (tp_btf: typed arguments)" if em.typed else ""),
            section=self.section(p), name=p.id, ctx_type="__u64 *" if em.typed else kind.ctx_type,
            now="now" in em.needs,
            comm="comm" in em.needs, pid_tgid="id" in em.needs,
            pid_tgid_value="probec_id" if "id" in em.needs else "bpf_get_current_pid_tgid()",
            cgroup_map=ir.CGROUP_MAP, cgroup_path_bit=ir.CGROUP_PATH_BIT,
            tp_strings=[{"name": f"probec_tp_{f.name}", "size": f.size, "source": em.field_place(f)}
                        for f in sorted(em.tp_strings.values(), key=lambda f: f.offset)],
            actions=["\t" + line if line else "" for line in em.prelude + ([""] if em.prelude else []) + actions])
        return text.rstrip("\n"), em

    def section(self, p: ir.Probe) -> str:
        if p.id in self.typed_probes:
            return f"tp_btf/{p.name}"
        return self.PROBES[p.kind].section.format(category=p.category, name=p.name)

    def typed_variant(self, p: ir.Probe, em: CExpression) -> ir.Probe | None:
        """The tp_btf twin of tracepoint probe `p` (whose classic program read the fields in `em`),
        where every field it reads has a typed form and it is not already one of a group's variants."""
        typed = TYPED_TRACEPOINTS.get((p.category, p.name)) if p.kind == "tracepoint" and not p.group else None
        if typed is None or not set(em.tp_fields) <= set(typed):
            return None
        return replace(p, id=p.id + TYPED_SUFFIX, group=TYPED_GROUP, variant=0)

    def edge_tables(self, program: ir.Program) -> list[dict]:
        tables = []
        for m in program.metrics:
            if not METRIC_KINDS[m.kind].buckets:
                continue
            steps = bucket_steps(len(m.edges))
            padded = list(m.edges) + [U64_MAX] * ((1 << steps) - len(m.edges))
            tables.append({"name": f"probec_edges_{m.name}", "size": len(padded),
                           "edges": ", ".join(c_u64(v) for v in padded)})
        return tables

    def map_type(self, mp: ir.MapSpec) -> tuple[str, int]:
        """The BPF map type that holds a logical map here, and its max_entries: a metric's maps
        per CPU (no two CPUs add to one slot). (Thread-keyed begin times also get a TASK_STORAGE
        map beside theirs, task_map_name(): map_definitions.)"""
        if mp.shape in ("ring", "stacks"):
            return {"ring": "RINGBUF", "stacks": "STACK_TRACE"}[mp.shape], mp.max_entries
        per_cpu = "PERCPU_" if mp.purpose in ("metric", "metric_overflow") else ""
        return per_cpu + ("ARRAY" if mp.shape == "slots" else "HASH"), mp.max_entries

    def map_infos(self, program: ir.Program) -> tuple[contract.MapInfo, ...]:
        """The maps as the manifest lists them: each as map_type() makes it, and the TASK_STORAGE
        map beside a thread-keyed span's begin map (no key layout: a slot per thread)."""
        out = []
        for mp in program.maps:
            out.append(map_info(mp, *self.map_type(mp)))
            if mp.name in self.task_maps:
                out.append(contract.MapInfo(task_map_name(self.task_spans_by_map[mp.name]), "TASK_STORAGE", 0,
                                            contract.MapPurpose(mp.purpose), None, out[-1].value))
        return tuple(out)

    def map_definitions(self, program: ir.Program) -> list[dict]:
        out = []
        for mp in program.maps:
            map_type, entries = self.map_type(mp)
            d = {"name": mp.name, "type": map_type, "max_entries": entries, "key": "", "value": "",
                 "key_size": "", "value_size": "", "flags": ""}
            if mp.name in self.task_maps:
                # beside the begin map, one slot per thread, made on first use; sized by the threads,
                # not by max_entries. The loader keeps one of the two (probec_use_task_storage).
                out.append(dict(d, name=task_map_name(self.task_spans_by_map[mp.name]), type="TASK_STORAGE",
                                max_entries=0, key="int", value="__u64", flags="BPF_F_NO_PREALLOC"))
            if map_type == "STACK_TRACE":
                d["key_size"], d["value_size"] = "sizeof(__u32)", f"{STACK_DEPTH} * sizeof(__u64)"
            elif mp.shape == "slots":
                # the kernel wants an array's key typed as a 32-bit int (the layout's one __u32)
                d["key"] = "__u32"
                d["value"] = f"struct {self.struct_name(mp.value)}" if mp.value is not None else "__u64"
            elif map_type != "RINGBUF":
                d["key"] = f"struct {self.struct_name(mp.key)}" if mp.key is not None else "__u64"
                d["value"] = f"struct {self.struct_name(mp.value)}" if mp.value is not None else "__u64"
            out.append(d)
            if map_type == "RINGBUF":
                # the perf buffer used instead where the kernel has no ring buffer (one slot per
                # CPU, sized by libbpf), and the per-CPU record an event is built in for it
                out.append(dict(d, name=PERF_MAP, type="PERF_EVENT_ARRAY", max_entries=0,
                                key_size="sizeof(__u32)", value_size="sizeof(__u32)"))
                out.append(dict(d, name=SCRATCH_MAP, type="PERCPU_ARRAY", max_entries=1, key_size="sizeof(__u32)",
                                value_size=str(max(e.record.size for e in program.events))))
        return out

    def layouts(self, program: ir.Program) -> list[dict]:
        seen: dict[str, ir.Layout] = {}
        events = {e.record.name for e in program.events}
        for mp in program.maps:
            for lay in (mp.key, mp.value):
                if lay is not None:
                    seen.setdefault(lay.name, lay)
        for e in program.events:
            seen.setdefault(e.record.name, e.record)
        out = []
        for lay in seen.values():
            is_event = lay.name in events
            members = []
            for i, f in enumerate(lay.fields):
                member = c_member(f, is_event and i >= len(HEADER_FIELDS))
                members.append({"ctype": field_ctype(f), "name": member,
                                "array": f"[{f.length}]" if f.kind == "bytes" else "", "offset": f.offset})
            # 8-byte alignment lets clang copy strings into keys a word at a time; the layouts are
            # multiples of 8 already, so it changes no size (arrays' 4-byte keys stay 4)
            out.append({"struct": self.struct_name(lay), "size": lay.size, "members": members,
                        "align": 8 if lay.size % 8 == 0 else 4})
        return out

    def build(self, program: ir.Program) -> Bundle:
        self.strings, self.health, self.records = StringTable(), HealthSlots(), {}
        self.program = program
        self.task_spans = self.thread_keyed_spans(program) if self.task_storage else set()
        self.task_spans_by_map = {s.begin_map.name: s.name for s in program.spans if s.name in self.task_spans}
        self.task_maps = frozenset(self.task_spans_by_map)
        name = program.name
        programs_meta = []
        probe_texts = []
        tp_checks = []
        probes: list[ir.Probe] = []
        self.typed_probes = set()
        for p in program.probes:
            text, em = self.probe_program(p, program)
            typed = self.typed_variant(p, em)
            if typed is not None:       # the typed program first: the variant tried first
                self.typed_probes.add(typed.id)
                typed_text, _ = self.probe_program(typed, program)
                probe_texts.append(typed_text)
                programs_meta.append({"probe": typed.id, "program": typed.id, "section": self.section(typed),
                                      "kind": typed.kind})
                probes.append(typed)
                p = replace(p, group=TYPED_GROUP, variant=1)
            probes.append(p)
            probe_texts.append(text)
            programs_meta.append({"probe": p.id, "program": p.id, "section": self.section(p), "kind": p.kind})
            for f in sorted(em.tp_fields.values(), key=lambda f: f.offset):
                member = em.tp_members[f.name]
                tp_checks.append({"probe": p.id, "tracepoint": f"{p.category}:{p.name}", "field": f.name,
                                  "offset": f.offset, "size": f.size,
                                  "btf_type": p.record_type if member else "", "member": member})
        if self.typed_probes:
            program = replace(program, probes=tuple(probes),
                              variant_groups=program.variant_groups + ((TYPED_GROUP, TYPED_LABELS),))
            self.program = program
        edge_tables = self.edge_tables(program)
        ringbuf = next((mp for mp in program.maps if mp.shape == "ring"), None)
        wakeup = max(1, program.ringbuf_bytes // 4) if ringbuf else 0
        settings = [{"name": "probec_target_pid", "ctype": "__u32", "size": 4, "value": 0},
                    {"name": contract.USE_TASK_BTF, "ctype": "__u32", "size": 4, "value": 1},
                    {"name": "probec_filter_cgroup", "ctype": "__u32", "size": 4, "value": 0}]
        if self.task_spans:
            settings.append({"name": contract.USE_TASK_STORAGE, "ctype": "__u32", "size": 4, "value": 1})
        if ringbuf is not None:
            settings.append({"name": contract.USE_RINGBUF, "ctype": "__u32", "size": 4, "value": 1})
            settings.append({"name": "probec_wakeup_bytes", "ctype": "__u64", "size": 8, "value": wakeup})
        for e in program.events:
            settings.append({"name": f"probec_sample_every_{e.name}", "ctype": "__u64", "size": 8,
                             "value": e.sample_every})
            settings.append({"name": f"probec_max_per_second_{e.name}", "ctype": "__u64", "size": 8,
                             "value": e.max_per_second})
        if program.events:      # the sampling ticket and the rate count
            settings.append({"name": contract.USE_ATOMIC_FETCH, "ctype": "__u32", "size": 4, "value": 1})
        if not self.health.slots:
            self.health.add("unused")
        has_usdt = any(p.kind == "usdt" for p in program.probes)
        header_name, source_name, object_name = f"{name}.h", f"{name}.bpf.c", f"{name}.bpf.o"
        source = self.render(
            "program.bpf.c.j2", source=program.source, name=name, header=header_name, usdt=has_usdt,
            settings=settings, maps=self.map_definitions(program), health_slots=len(self.health.slots),
            edge_tables=edge_tables, strings=self.strings.definitions(),
            records=[{"name": name + RECORD_FLAVOUR, "members": list(members.values())}
                     for name, members in sorted(self.records.items()) if members],
            rates=[e.name for e in program.events], programs=probe_texts)
        header = self.render("header.h.j2", source=program.source, name=name,
                             guard=f"PROBEC_{name.upper()}_H", layouts=self.layouts(program),
                             slots=[{"text": f"{s['slot']}: {s['kind']} {s['name']}".rstrip()}
                                    for s in self.health.slots])
        loader = self.render("loader.py.j2", source=program.source, name=name)
        shared = resources.files("probec.templates").joinpath("core", "probec.bpf.h").read_bytes()
        files = {source_name: source.encode(), header_name: header.encode(), "probec.bpf.h": shared,
                 "loader.py": loader.encode()}
        file_roles = {"source": source_name, "header": header_name, "helpers": "probec.bpf.h", "loader": "loader.py"}
        if self.compile and not self.d.has_errors():
            obj = self.compile_object(files, source_name, object_name)
            if obj is not None:
                files[object_name] = obj
                file_roles["object"] = object_name
        manifest = self.base_manifest(
            program, file_roles, maps=self.map_infos(program),
            sum_slots={m.name: sum_slot(m) for m in program.metrics if METRIC_KINDS[m.kind].buckets},
            task_maps=self.task_maps, core=contract.CoreSection(
            object=file_roles.get("object"),
            programs=tuple(contract.CoreProgram(**p) for p in programs_meta),
            settings=tuple(contract.CoreSetting(s["name"], s["size"], s["value"]) for s in settings),
            health_map=contract.HealthMap("probec_health", len(self.health.slots)),
            health=tuple(contract.HealthSlotInfo(s["slot"], contract.HealthSlot(s["kind"]), s["name"])
                         for s in self.health.slots),
            tracepoint_fields=tuple(contract.TracepointCheck(**c) for c in tp_checks),
            ringbuf=contract.RingBufferInfo(ringbuf.name, ringbuf.max_entries, wakeup, PERF_MAP, SCRATCH_MAP)
            if ringbuf else None,
            stack_map=next((mp.name for mp in program.maps if mp.shape == "stacks"), None),
            stack_depth=STACK_DEPTH,
            value_signed=signed_metrics(program),
        ))
        return Bundle(name, self.name, files, manifest)

    def compile_object(self, files: dict[str, bytes], source_name: str, object_name: str) -> bytes | None:
        try:
            result = toolchain.compile_object(files, source_name, object_name)
        except toolchain.ToolchainError as exc:
            self.d.warning("W521", f"wrote the C source but no {object_name}: {exc}", None,
                           "build the bundle where clang and bpftool exist; 'probec run' needs the object")
            return None
        if result.object is None:
            lines = result.error.splitlines()
            self.d.error("E520", f"clang rejected the generated C for {source_name} (a probec bug; please report it)",
                         None, *lines[:12])
            return None
        return result.object
