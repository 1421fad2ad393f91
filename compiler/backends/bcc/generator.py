"""The bcc backend: IR -> one Python program that BCC compiles on the host at load time, against
its kernel headers, for hosts without BTF where a compiler may run.

It writes the core backend's C (the same probe bodies, span, metric and event templates, the
same `probec.bpf.h`, the same layouts and health slots) in BCC's dialect:

- maps are BCC tables (`BPF_TABLE`), and BCC relocates a map only where it is called by name
  (`m.lookup(k)`, never inside a macro): every map helper the shared code calls through a map
  pointer (`bpf_map_lookup_elem(&m, k)`) is a dispatch function here, one comparison per map,
  which clang folds away once the pointer is a constant;
- BCC loads no `.rodata` or `.bss`: settings are macros, string constants compound literals,
  histogram edges a search written out as comparisons, and an event's sampling and rate state a
  slot of an array map; the target pid is read from a one-slot array (`probec_target`) the runtime
  writes, so `probec run --pid-file` follows a new process without compiling again (without a
  target the runtime passes `-Dprobec_target_pid=0`, and the test costs nothing);
- no BTF: begin times of thread-keyed spans live in the HASH begin map (no task storage), there are
  no fentry/fexit programs (a group falls back to its next variant), and `socket(fd)` reads
  kernel structs through the installed headers, which must be the running kernel's;
- of the mechanisms a core object chooses at load, BCC chooses one at load too, as it compiles:
  events go through the ring buffer where the kernel has one, else (before 5.8) through a perf
  buffer (the runtime passes `-Dprobec_use_ringbuf=0`, and the program declares that map instead
  of the ring); the other two are fixed (BCC_MECHANISMS): span begin times in the HASH, the
  current task through bpf_get_current_task.

The C text sits in the program as one Python string literal (`escaping.python_text`); the runtime
(`runtime/bcc_runner.py`) reads it from there, compiles it with BCC and attaches it.
"""

from __future__ import annotations

from importlib import resources

from ....host import elf
from ....host.headers import KernelHeaders, find_kernel_headers
from ...diagnostics import Diagnostics, SourceSpan
from ...ir import nodes as ir
from ...kinds import METRIC_KINDS
from ..base import Bundle, template_environment
from ..core.generator import (PERF_MAP, SCRATCH_MAP, STACK_DEPTH, CExpression, CoreBackend, c_u64, signed_metrics,
                              sum_slot)
from ..manifest import contract, map_info

# BCC table kinds by the BPF map types the core backend chooses
TABLE_KINDS = {"HASH": "hash", "PERCPU_HASH": "percpu_hash", "ARRAY": "array", "PERCPU_ARRAY": "percpu_array"}
# BCC's C type of a USDT argument of each size (its readarg refuses a destination of another size)
USDT_CTYPES = {(1, True): "__s8", (1, False): "__u8", (2, True): "__s16", (2, False): "__u16",
               (4, True): "__s32", (4, False): "__u32", (8, True): "__s64", (8, False): "__u64"}
NO_BTF_KINDS = ("fentry", "fexit")
PAGE = 4096
# The core object's load-time choices, as the program is written: the ring buffer unless the
# runtime passes -Dprobec_use_ringbuf=0 as it compiles; the others fixed (the runtime's Mechanisms
# for bcc say the same: runtime/bcc_runner.py)
BCC_MECHANISMS = {contract.USE_RINGBUF: 1, contract.USE_TASK_STORAGE: 0, contract.USE_TASK_BTF: 0,
                  contract.USE_ATOMIC_FETCH: 1}
TARGET_MAP = "probec_target"     # slot 0: the pid traced, 0 for every process (the runtime writes it)


class BccExpression(CExpression):
    """The core backend's C expressions, with USDT arguments read BCC's way."""

    def value(self, e: ir.IRExpr) -> str:
        if not (isinstance(e, ir.Arg) and self.probe.kind == "usdt"):
            return super().value(e)
        ctype = self.backend.usdt_argument_type(self.probe, e.index)
        if ctype is None:
            return "0"
        # BCC rewrites bpf_usdt_readarg() in the probe's own function into a reader it generates
        # from the binary's note (for a destination of the argument's own size), so the call is
        # written out here, not in a helper or a macro
        return (f"({{ {ctype} probec_a = 0; bpf_usdt_readarg({e.index + 1}, ctx, &probec_a); "
                f"(__s64)probec_a; }})")


class BccBackend(CoreBackend):
    name = "bcc"
    expression_class = BccExpression
    # What BCC attaches: the core backend's kinds but fentry/fexit, which need kernel BTF (a
    # `kernel:` span falls back to its kprobe, or to the spec's fallback). USDT arguments are read
    # BCC's way (BccExpression).
    PROBES = {kind: how for kind, how in CoreBackend.PROBES.items() if kind not in NO_BTF_KINDS}

    def __init__(self, diags: Diagnostics, spec_span: SourceSpan | None = None,
                 headers: KernelHeaders | None = None, check_headers: bool = True, **_ignored):
        # No BTF on the hosts this backend is for: thread-keyed spans use the HASH begin map.
        super().__init__(diags, compile=False, spec_span=spec_span, task_storage=False)
        self.env = template_environment("bcc", "core")
        self.check_headers = check_headers
        self.headers = headers if headers is not None or not check_headers else find_kernel_headers()

    def record_member(self, probe: ir.Probe, f: ir.TracepointField) -> str:
        """None: BCC compiles against headers, not BTF, so tracepoint fields are read at their
        offsets (checked against the host's tracefs before load, as core does without BTF)."""
        return ""

    def supports(self, program: ir.Program) -> bool:
        """The core backend's checks, with fentry/fexit variants of a group left to its other
        variants (only one with none is refused)."""
        kept = self.probes_for_bcc(program)
        before = self.d.error_count
        if program.cgroup_sets:
            attribute, value = program.cgroup_sets[0]
            self.cannot("filters on container and pod names", f"{attribute} == \"{value}\"",
                        "they test a map the core and bpftrace runtimes fill; use one of those backends "
                        "(cgroup labels work under bcc)", None)
        ok = super().supports(_with_probes(program, kept))
        return ok and self.d.error_count == before

    @staticmethod
    def generated_names(kind: str, name: str, histogram: bool = False) -> tuple[str, ...]:
        names = CoreBackend.generated_names(kind, name, histogram)
        if kind == "metric" and histogram:
            names += (f"probec_bucket_{name}",)
        return names

    # -- what differs from the core backend's C --------------------------------------------------
    def bucket_call(self, m: ir.Metric, signed: bool) -> str:
        return f"probec_bucket_{m.name}(probec_v)"

    def bucket_function(self, m: ir.Metric, signed: bool) -> dict:
        """The bucket of v for `m`'s edges as nested comparisons with constants: the number of
        edges below v, as probec_bucket_u64 computes it from a table (BCC loads no tables)."""
        lines: list[str] = []

        def search(lo: int, hi: int, depth: int) -> None:
            pad = "\t" * depth
            if lo == hi:
                lines.append(f"{pad}return {lo};")
                return
            mid = (lo + hi) // 2
            lines.append(f"{pad}if (v <= {c_u64(m.edges[mid])}) {{")
            search(lo, mid, depth + 1)
            lines.append(f"{pad}}} else {{")
            search(mid + 1, hi, depth + 1)
            lines.append(f"{pad}}}")

        search(0, len(m.edges), 1)
        return {"name": f"probec_bucket_{m.name}", "signed": signed, "lines": lines}

    def usdt_argument_type(self, probe: ir.Probe, index: int) -> str | None:
        try:
            notes = [p for p in elf.usdt_probes(probe.binary) if p.provider == probe.provider and p.name == probe.name]
        except (elf.ElfError, OSError):
            notes = []
        args = [n.args[index] for n in notes if index < len(n.args)]
        if not args:
            self.cannot("USDT arguments of this binary", f"{probe.spec_text}: arg{index}",
                        "its USDT notes cannot be read here, and BCC needs each argument's size", probe.span)
            return None
        widest = max(args, key=lambda a: a.size)
        return USDT_CTYPES.get((widest.size, widest.signed), "__s64")

    def kernel_struct_reads(self, program: ir.Program) -> list[str]:
        """Where the program reads kernel structs through the headers (`socket(fd)`), by probe."""
        return [p.spec_text or p.id for p in program.probes
                if any(isinstance(node, ir.FdSocket) for node in ir.walk(p.actions))]

    def check_kernel_structs(self, program: ir.Program) -> tuple[str, ...]:
        reads = self.kernel_struct_reads(program)
        if not reads or not self.check_headers:
            return tuple(reads)
        h = self.headers
        reason = h.mismatch() if h is not None and not h.matches else \
            "BCC finds no kernel headers on this host (install linux-headers for the running kernel)" if h is None else ""
        if reason:
            spans = {p.spec_text or p.id: p.span for p in program.probes}
            for where in reads:
                self.cannot("socket(fd) with these kernel headers", where, reason, spans.get(where))
        return tuple(reads)

    def header_warning(self) -> None:
        h = self.headers
        if not self.check_headers:
            return
        if h is None:
            self.d.warning("W531", "BCC finds no kernel headers on this host: the bundle will not compile "
                           "here at load time", self.spec_span,
                           "install the headers of the running kernel (Debian: linux-headers-$(uname -r))")
        elif not h.matches:
            self.d.warning("W530", h.mismatch(), self.spec_span,
                           "tracepoint fields, uprobe and USDT arguments and helpers do not depend on the "
                           "headers and work; probec refuses constructs that read kernel structs (socket(fd))")

    def probes_for_bcc(self, program: ir.Program) -> list[ir.Probe]:
        """Probes this backend writes programs for: every one but fentry/fexit variants, whose
        group then starts at its next variant (kprobe, or the spec's fallback)."""
        groups: dict[str, list[ir.Probe]] = {}
        for p in program.probes:
            if p.group:
                groups.setdefault(p.group, []).append(p)
        out = []
        for p in program.probes:
            if p.kind in NO_BTF_KINDS and any(q.kind not in NO_BTF_KINDS for q in groups.get(p.group, [])):
                continue       # its group has a variant BCC attaches
            out.append(p)      # a lone fentry/fexit stays, for supports() to refuse
        return out

    # -- the program -----------------------------------------------------------------------------
    def table_declarations(self, program: ir.Program) -> list[dict]:
        out = []
        for mp in program.maps:
            map_type, entries = self.map_type(mp)
            key = f"struct {self.struct_name(mp.key)}" if mp.key is not None else "__u64"
            value = f"struct {self.struct_name(mp.value)}" if mp.value is not None else "__u64"
            if mp.shape == "slots":
                key = "__u32"
            d = {"name": mp.name, "type": map_type, "kind": TABLE_KINDS.get(map_type, ""), "key": key, "value": value,
                 "max_entries": entries, "pages": 0}
            if map_type == "RINGBUF":
                pages = entries // PAGE
                if pages < 1 or pages & (pages - 1):
                    self.cannot("ring buffers this small", f"{entries} bytes",
                                "BCC sizes a ring buffer in whole pages, a power of two of them", None)
                    pages = 1
                d["pages"] = pages
            out.append(d)
        return out

    def build(self, program: ir.Program) -> Bundle:
        self.strings, self.health = type(self.strings)(), type(self.health)()
        self.program = program
        self.task_spans, self.task_maps = set(), frozenset()
        self.header_warning()
        struct_reads = self.check_kernel_structs(program)
        name = program.name
        probe_texts, programs_meta, tp_checks = [], [], []
        for p in self.probes_for_bcc(program):
            built = self.probe_program(p, program)
            if built is None:
                continue
            text, em = built
            probe_texts.append(text)
            programs_meta.append({"probe": p.id, "program": p.id, "section": p.kind, "kind": p.kind})
            for f in sorted(em.tp_fields.values(), key=lambda f: f.offset):
                tp_checks.append({"probe": p.id, "tracepoint": f"{p.category}:{p.name}", "field": f.name,
                                  "offset": f.offset, "size": f.size, "btf_type": "", "member": ""})
        signed = signed_metrics(program)
        buckets = []
        for m in program.metrics:
            if METRIC_KINDS[m.kind].buckets:
                buckets.append(self.bucket_function(m, signed[m.name]))
        if not self.health.slots:
            self.health.add("unused")
        ringbuf = next((mp for mp in program.maps if mp.shape == "ring"), None)
        stacks = next((mp for mp in program.maps if mp.shape == "stacks"), None)
        # the target pid is read from TARGET_MAP (or -Dprobec_target_pid=0 without a target); the
        # rest are the spec's. No `probec run --cgroup` under bcc (the runtime refuses it): the
        # probes' cgroup test is dead
        settings = [{"name": "probec_target_pid", "ctype": "__u32", "size": 4, "value": 0,
                     "expr": "probec_target_pid_now()"},
                    {"name": "probec_filter_cgroup", "ctype": "__u32", "size": 4, "value": 0},
                    {"name": contract.USE_TASK_BTF, "ctype": "__u32", "size": 4,
                     "value": BCC_MECHANISMS[contract.USE_TASK_BTF]}]
        if ringbuf is not None:
            settings.append({"name": contract.USE_RINGBUF, "ctype": "__u32", "size": 4,
                             "value": BCC_MECHANISMS[contract.USE_RINGBUF]})
            # BCC 0.26 has no ringbuf_query: the kernel wakes the reader as it sees fit (flags 0)
            settings.append({"name": "probec_wakeup_bytes", "ctype": "__u64", "size": 8, "value": 0})
        for e in program.events:
            settings.append({"name": f"probec_sample_every_{e.name}", "ctype": "__u64", "size": 8,
                             "value": e.sample_every})
            settings.append({"name": f"probec_max_per_second_{e.name}", "ctype": "__u64", "size": 8,
                             "value": e.max_per_second})
        if program.events:
            settings.append({"name": contract.USE_ATOMIC_FETCH, "ctype": "__u32", "size": 4,
                             "value": BCC_MECHANISMS[contract.USE_ATOMIC_FETCH]})
        tables = self.table_declarations(program)
        header = self.render("header.h.j2", source=program.source, name=name,
                             guard=f"PROBEC_{name.upper()}_H", layouts=self.layouts(program),
                             slots=[{"text": f"{s['slot']}: {s['kind']} {s['name']}".rstrip()}
                                    for s in self.health.slots])
        helpers = resources.files("probec.templates").joinpath("core", "probec.bpf.h").read_text()
        scratch = max((e.record.size for e in program.events), default=0)
        if ringbuf is not None:    # the per-CPU record an event is built in for the perf buffer
            tables.append({"name": SCRATCH_MAP, "type": "PERCPU_ARRAY", "kind": "percpu_array", "key": "__u32",
                           "value": "struct probec_scratch_record", "max_entries": 1, "pages": 0})
        lookups = [t["name"] for t in tables if t["type"] not in ("RINGBUF", "STACK_TRACE")] + ["probec_health"]
        if program.events:
            lookups += ["probec_sampled", "probec_rates"]
        source = self.render(
            "program.c.j2", lookups=lookups,
            arrays={t["name"] for t in tables if t["type"] in ("ARRAY", "PERCPU_ARRAY")} |
            {"probec_health", "probec_sampled", "probec_rates"}, source=program.source, name=name, header=header, helpers=helpers,
            tables=tables, health_slots=len(self.health.slots), settings=settings,
            events=[{"name": e.name, "index": i} for i, e in enumerate(program.events)],
            buckets=buckets, strings=self.strings.definitions(), socket=bool(struct_reads),
            perf_map=PERF_MAP if ringbuf is not None else None, scratch_words=(scratch + 7) // 8,
            target_map=TARGET_MAP,
            unused_maps=[] if any(t["name"] == ir.CGROUP_MAP for t in tables) else [ir.CGROUP_MAP],
            programs=probe_texts)
        program_name = f"{name}.py"
        text = self.render("program.py.j2", source=program.source, name=name, program=source)
        files = {program_name: text.encode()}
        file_roles = {"program": program_name}
        manifest = self.base_manifest(
            program, file_roles, maps=tuple(map_info(mp, *self.map_type(mp)) for mp in program.maps),
            sum_slots={m.name: sum_slot(m) for m in program.metrics if METRIC_KINDS[m.kind].buckets},
            core=contract.CoreSection(
            object=None,
            programs=tuple(contract.CoreProgram(**p) for p in programs_meta),
            settings=tuple(contract.CoreSetting(s["name"], s["size"], s["value"]) for s in settings),
            health_map=contract.HealthMap("probec_health", len(self.health.slots)),
            health=tuple(contract.HealthSlotInfo(s["slot"], contract.HealthSlot(s["kind"]), s["name"])
                         for s in self.health.slots),
            tracepoint_fields=tuple(contract.TracepointCheck(**c) for c in tp_checks),
            # the perf buffer where the kernel has no ring buffer (the runtime chooses as BCC compiles)
            ringbuf=contract.RingBufferInfo(ringbuf.name, ringbuf.max_entries, 0, PERF_MAP, SCRATCH_MAP)
            if ringbuf else None,
            stack_map=stacks.name if stacks else None,
            stack_depth=STACK_DEPTH,
            value_signed=signed,
        ), bcc=contract.BccSection(program=program_name, kernel_struct_reads=struct_reads))
        return Bundle(name, self.name, files, manifest)


def _with_probes(program: ir.Program, probes: list[ir.Probe]) -> ir.Program:
    import dataclasses
    return dataclasses.replace(program, probes=tuple(probes))
