"""Lowering: the typed spec becomes the IR, resolving every name against the spec and the host."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace

from ...host import elf
from ...runtime.manifest import EVENT_HEADER
from ..diagnostics import Diagnostics, did_you_mean, shown
from ..escaping import bpftrace_address_part, visible
from ..expr import ast
from ..spec.limits import BPFTRACE_PRINTF_HEADER, BPFTRACE_STACK_BYTES, MAX_PROBES, STACK_BUDGET
from ..spec.model import EventSpec, MetricSpec, ProbeAddress, SpanEndRef, SpanSide, SpanSpec, Spec, WithinRef
from .host import HostInfo
from .layout import struct_layout, u32_key, u64_value
from .nodes import (INT, TID, Action, Const, Context, EmitEvent, Event, EventField, Guard, IRExpr, Label,
                    MapSpec, Metric, MetricUpdate, Probe, Program, SpanBegin, SpanEnd, SpanInfo, TracepointField,
                    ValueType, Within, kept_accumulators, walk)
from .typecheck import ProbeContext, TypeChecker

# Label sets folded into __overflow__ that the core backend's kernel side tells apart (and counts)
# per metric; past that many, probec_series_dropped_total stops growing (a lower bound).
FOLDED_TRACKED = 1024
SYSCALL_ARGS_NOTE = "syscall:NAME is the sys_enter_NAME tracepoint; syscallret:NAME is sys_exit_NAME"


@dataclass
class LoweringOptions:
    host: HostInfo = field(default_factory=HostInfo)
    kernel: str = "host"            # host: mechanisms must exist on this kernel; any: do not check
    placement: str = "auto"         # auto: probe past endbr64; entry: always at the symbol


@dataclass
class _ProbeBuild:
    probe: Probe
    actions: list[Action]
    ctx: ProbeContext


class Lowering:
    def __init__(self, spec: Spec, diags: Diagnostics, options: LoweringOptions):
        self.spec = spec
        self.d = diags
        self.opt = options
        self.host = options.host
        self.types = TypeChecker(diags)
        self.probes: dict[tuple, _ProbeBuild] = {}
        self.used_ids: set[str] = set()
        self.groups: dict[str, tuple[str, ...]] = {}
        self.chosen: dict[str, int] = {}
        self.symbols: dict[tuple, tuple[str, int] | None] = {}
        self.failed_symbols: set[tuple[str, str]] = set()
        self.warned_no_tracefs = False
        self.binaries: dict[str, str | None] = {}
        # What `INNER.total` / `COUNTER.count` may name: spans and counters and the span each is within.
        self.span_within = {n: (s.within.name if s.within else "") for n, s in spec.spans.items()}
        self.counted_within = {n: m.within.name for n, m in spec.metrics.items()
                               if m.kind == "counter" and m.value is None and m.within}
        self.thread_spans = frozenset(n for n, s in spec.spans.items() if s.begin.key is None and s.end.key is None
                                      and (s.fallback is None or (s.fallback[0].key is None and
                                                                  s.fallback[1].key is None)))
        self.left_out_binaries: set[str] = set()   # optional binaries that are missing here
        self.unnameable: set[str] = set()          # resolved paths and symbols reported with E503
        self.span_ends: dict[str, list[tuple]] = {}   # span -> [(probe key, end key expr, ctx)]
        self.span_maps: dict[str, MapSpec] = {}
        self.needs_stacks = False
        self.notes: list[str] = []

    # -- probes --------------------------------------------------------------------------------
    def binary_path(self, addr: ProbeAddress) -> str | None:
        """The absolute path of a probe's binary; each binary's problems are reported once."""
        if addr.target not in self.binaries:
            self.binaries[addr.target] = self._binary_path(addr)
        return self.binaries[addr.target]

    def _binary_path(self, addr: ProbeAddress) -> str | None:
        target = addr.target
        b = self.spec.binaries.get(target)
        path = b.path if b else target
        optional = b.optional if b else False
        if b is None and "/" not in target and not target.startswith("lib"):
            self.d.error("E301", f"'{target}' is neither a binary declared under 'binaries' nor a path",
                         addr.span, did_you_mean(target, self.spec.binaries) or
                         "declare it: 'binaries: {NAME: /path/to/file}'")
            return None
        if "${" in path:
            from ..spec.loader import ENV_REFERENCE, SAFE_PATH
            if not self.host.enabled:
                return path     # the variable is a fact of the machine that builds: not checked here
            unset = [v for v in ENV_REFERENCE.findall(path) if v not in os.environ]
            if unset:
                report = self.d.warning if optional else self.d.error
                report("W303" if optional else "E303", f"binary '{target}': environment variable "
                       f"{unset[0]} is not set", b.span if b else addr.span,
                       f"set it where the spec is built, e.g. {unset[0]}=/path/to/folder")
                if optional:
                    self.left_out_binaries.add(target)
                return None
            path = ENV_REFERENCE.sub(lambda m: os.environ[m.group(1)], path)
            if not SAFE_PATH.match(path):
                self.d.error("E111", f"binary '{target}' expands to '{path}', which has characters probec "
                             "does not accept in a path", b.span if b else addr.span)
                return None
        if "/" in path and not path.startswith("/"):
            # Relative paths are relative to the spec file, so a spec and its workload travel together.
            path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(self.spec.file)), path))
        if not self.host.enabled:
            return path
        try:
            return elf.resolve_binary(path)
        except elf.ElfError as exc:
            report = self.d.warning if optional else self.d.error
            report("E302" if not optional else "W302", f"binary for '{addr.text}' not found: {exc}",
                   (b.span if b else addr.span),
                   "mark it 'optional: true' under binaries to make this a warning" if not optional else
                   "probes on it are left out of this build")
            if optional:
                self.left_out_binaries.add(target)
            return None

    def resolve_symbol(self, addr: ProbeAddress, path: str) -> tuple[str, int] | None:
        if addr.offset:
            # Whatever check accepts, every backend builds: Debian's bpftrace 0.17 is built without
            # the disassembler that checks an offset lands on an instruction, and refuses them all.
            self.d.error("E502", f"'{shown(addr.text)}': the bpftrace backend cannot probe inside a function "
                         f"(+{addr.offset}): Debian's bpftrace 0.17 has no uprobe offset support", addr.span,
                         "probe the function's entry (probec places it past endbr64 where that is cheaper), "
                         "or a USDT note at that point")
            return None
        key = (path, addr.name, addr.offset, addr.kind == "uretprobe")
        if key not in self.symbols:
            self.symbols[key] = self._resolve_symbol(addr, path)
        return self.symbols[key]

    def _resolve_symbol(self, addr: ProbeAddress, path: str) -> tuple[str, int] | None:
        if (path, addr.name) in self.failed_symbols:
            return None
        if not self.host.enabled:
            return addr.name, addr.offset or 0
        try:
            ef = self.host.binary(path)
            found = elf.find_function(path, addr.name)
        except elf.ElfError as exc:
            self.d.error("E303", f"cannot read '{path}': {exc}", addr.span)
            return None
        if not found or len(found) > 1:
            self.failed_symbols.add((path, addr.name))
        if not found:
            close = elf.close_names(path, addr.name)
            self.d.error("E304", f"'{path}' has no function '{addr.name}'", addr.span,
                         ("did you mean " + " or ".join(f"'{c}'" for c in close) + "?") if close
                         else "list its functions with: nm -D --defined-only --demangle " + path)
            return None
        if len(found) > 1:
            names = [getattr(s, "demangled", "") or s.name for s in found]
            self.d.error("E305", f"'{addr.name}' is ambiguous in '{path}': {len(found)} functions match", addr.span,
                         "write one of: " + ", ".join(f"'{n}'" for n in names[:6]))
            return None
        sym = found[0]
        offset = addr.offset or 0
        if addr.offset is not None and sym.size and offset >= sym.size:
            self.d.error("E313", f"'{addr.name}' in '{path}' is {sym.size} bytes long; +{offset} is past its end",
                         addr.span, f"an offset inside the function: +0 .. +{sym.size - 1}")
            return None
        # Past endbr64 unless the spec wrote an offset itself (`+0` keeps the entry).
        if addr.offset is None and self.opt.placement == "auto" and addr.kind in ("uprobe", "uretprobe"):
            try:
                if ef.starts_with_endbr64(sym):
                    offset = 4
            except elf.ElfError:
                pass
        return sym.name, offset

    def usdt_args(self, addr: ProbeAddress, path: str) -> int | None:
        if not self.host.enabled:
            return None
        try:
            probes = elf.usdt_probes(path)
        except elf.ElfError as exc:
            self.d.error("E303", f"cannot read '{path}': {exc}", addr.span)
            return -1
        match = [p for p in probes if p.provider == addr.provider and p.name == addr.name]
        if not match:
            names = sorted({f"{p.provider}:{p.name}" for p in probes})
            self.d.error("E306", f"'{path}' has no USDT probe '{addr.provider}:{addr.name}'", addr.span,
                         did_you_mean(f"{addr.provider}:{addr.name}", names) or
                         ("its probes: " + ", ".join(names[:8]) if names else "it has no USDT probes at all"))
            return -1
        counts = {len(p.args) for p in match}
        return min(counts)

    def kernel_function(self, addr: ProbeAddress) -> bool:
        funcs = self.host.kernel_functions
        if funcs is None or addr.name in funcs:
            return True
        cands = [f for f in funcs if f[:3] == addr.name[:3]]
        self.d.error("E307", f"the kernel has no function '{addr.name}'", addr.span, did_you_mean(addr.name, cands))
        return False

    def check_tracepoint(self, addr: ProbeAddress, category: str, name: str) -> bool:
        tps = self.host.tracepoints
        if tps is None:
            known = self.host.btf_tracepoints
            if known is None:
                if self.host.enabled and not self.warned_no_tracefs:
                    self.warned_no_tracefs = True
                    self.d.warning("W313", "tracefs and kernel BTF are not readable: tracepoint names and "
                                   "fields were not checked", addr.span,
                                   "run as root, or mount tracefs: mount -t tracefs nodev /sys/kernel/tracing")
                return True
            if name not in known:
                self.d.error("E308", f"unknown tracepoint '{addr.text}' (kernel BTF has no btf_trace_{name})",
                             addr.span, did_you_mean(name, known))
                return False
            return True
        if f"{category}:{name}" in tps:
            return True
        if addr.kind in ("syscall", "syscallret"):
            names = [t.split(":sys_enter_")[1] for t in tps if ":sys_enter_" in t]
            close = did_you_mean(addr.name, names)
            self.d.error("E308", f"unknown syscall '{addr.name}' (no tracepoint {category}:{name})", addr.span,
                         close.replace("'", f"'{addr.kind}:", 1) if close else SYSCALL_ARGS_NOTE)
            return False
        hint = did_you_mean(f"{category}:{name}", tps)
        self.d.error("E308", f"unknown tracepoint '{addr.text}'", addr.span,
                     hint.replace("'", "'tracepoint:", 1) if hint else "list them: probec doctor, or "
                     "/sys/kernel/tracing/available_events")
        return False

    def mechanism_available(self, kind: str) -> bool | None:
        if self.opt.kernel == "any" or not self.host.enabled:
            return None
        if kind in ("kprobe", "kretprobe"):
            return self.host.has_kprobes
        if kind in ("fentry", "fexit"):
            return self.host.has_fentry
        return True

    def probe(self, addr: ProbeAddress, kind: str | None = None, group: str = "", variant: int = 0
              ) -> _ProbeBuild | None:
        """The probe for an address (one per address: actions of every user are merged)."""
        kind = kind or addr.kind
        category, name, binary, symbol, offset, provider, arg_count = "", addr.name, "", "", 0, "", None
        fields, has_fields = None, False
        if kind in ("syscall", "syscallret"):
            category, name = "syscalls", ("sys_enter_" if kind == "syscall" else "sys_exit_") + addr.name
            if not self.check_tracepoint(addr, category, name):
                return None
            fields, has_fields = self.host.tracepoint_format(category, name), True
            ctx_kind = kind
            kind = "tracepoint"
        elif kind == "tracepoint":
            category = addr.target
            if not self.check_tracepoint(addr, category, name):
                return None
            fields, has_fields = self.host.tracepoint_format(category, name), True
            ctx_kind = kind
        elif kind in ("uprobe", "uretprobe"):
            binary = self.binary_path(addr)
            if binary is None:
                return None
            resolved = self.resolve_symbol(addr, binary)
            if resolved is None:
                return None
            symbol, offset = resolved
            if not (self.nameable(addr, "binary after resolution", binary) and self.nameable(addr, "symbol", symbol)):
                return None
            ctx_kind = kind
        elif kind == "usdt":
            binary = self.binary_path(addr)
            if binary is None or not self.nameable(addr, "binary after resolution", binary):
                return None
            arg_count = self.usdt_args(addr, binary)
            if arg_count == -1:
                return None
            provider = addr.provider
            ctx_kind = kind
        elif kind in ("kprobe", "kretprobe", "fentry", "fexit"):
            if not self.kernel_function(addr):
                return None
            ctx_kind = kind
        else:
            ctx_kind = kind
        key = (kind, category, name, binary, symbol, offset, provider, addr.rate, group, variant)
        if key in self.probes:
            return self.probes[key]
        pid = self.probe_id(kind, name or symbol or provider or str(addr.rate))
        probe = Probe(pid, kind, category, name if kind != "usdt" else addr.name, binary, symbol, offset,
                      provider, addr.rate, (), group, variant, addr.text,
                      past_endbr64=bool(offset) and addr.offset is None, span=addr.span,
                      record_type=(self.host.tracepoint_type(category, name) or "") if kind == "tracepoint" else "")
        if kind == "tracepoint" and fields is None and self.host.enabled and self.host.tracepoints is not None:
            fields = {}
        ctx = ProbeContext(ctx_kind, addr.text if addr.kind != "kernel" else f"{kind}:{addr.name}", fields,
                           has_fields, arg_count)
        build = _ProbeBuild(probe, [], ctx)
        self.probes[key] = build
        return build

    def nameable(self, addr: ProbeAddress, what: str, text: str) -> bool:
        """Whether every backend can write a resolved path or ELF symbol: what check accepts, every
        backend builds, and bpftrace 0.17 cannot name some of them in a probe address (the core
        backend passes any path to libbpf). Each one is reported once."""
        if not self.host.enabled or bpftrace_address_part(text) is not None:
            return True         # without the host, nothing was resolved: the spelling was checked at load
        if text not in self.unnameable:
            self.unnameable.add(text)
            self.d.error("E503", f"{addr.text}: the {what} is '{visible(text)}', which the bpftrace backend "
                         "cannot name in a probe address", addr.span,
                         "bpftrace reads ':', '\\', '*', '?', '[', ']', '$', control characters and non-ASCII "
                         "there as something else; reach the file through folders without them (symlinks "
                         "are resolved first)")
        return False

    def probe_id(self, kind: str, name: str) -> str:
        stem = re.sub(r"[^A-Za-z0-9_]", "_", f"{kind}_{name}")[:48]
        candidate, n = stem, 1
        while candidate in self.used_ids:
            n += 1
            candidate = f"{stem}_{n}"
        self.used_ids.add(candidate)
        return candidate

    def context_for(self, build: _ProbeBuild, duration: bool, ending: str = "", ending_key: IRExpr | None = None
                    ) -> ProbeContext:
        c = build.ctx
        return ProbeContext(c.kind, c.description, c.fields, c.has_fields, c.arg_count, duration, ending,
                            self.span_within, self.counted_within, c.notes, ending_key or TID, self.thread_spans)

    # -- spans ---------------------------------------------------------------------------------
    def span_variants(self, s: SpanSpec) -> list[tuple[tuple[str, str], SpanSide, SpanSide]]:
        """(begin kind, end kind) choices for a span, in order of preference."""
        kinds = (s.begin.probe.kind, s.end.probe.kind)
        if "kernel" not in kinds and "kernelret" not in kinds:
            return [((s.begin.probe.kind, s.end.probe.kind), s.begin, s.end)]
        out = []
        for mech in (("fentry", "fexit"), ("kprobe", "kretprobe")):
            b = mech[0] if s.begin.probe.kind == "kernel" else mech[1] if s.begin.probe.kind == "kernelret" else s.begin.probe.kind
            e = mech[1] if s.end.probe.kind == "kernelret" else mech[0] if s.end.probe.kind == "kernel" else s.end.probe.kind
            out.append(((b, e), s.begin, s.end))
        if s.fallback:
            fb, fe = s.fallback
            out.append(((fb.probe.kind, fe.probe.kind), fb, fe))
        return out

    def lower_span(self, s: SpanSpec) -> None:
        variants = self.span_variants(s)
        available = []
        for (bk, ek), bside, eside in variants:
            ok = [self.mechanism_available(k) for k in (bk, ek)]
            available.append(None if None in ok else all(ok))
        if len(variants) > 1:
            if self.opt.kernel == "host" and self.host.enabled and not any(a for a in available):
                has = "kprobes" if self.host.has_kprobes else "neither kprobes nor fentry"
                self.d.error("E310", f"span '{s.name}': {self.host.which} has {has}, so 'kernel:{s.begin.probe.name}' "
                             "cannot attach here", s.begin.probe.span,
                             "add 'fallback: syscall:NAME' or 'fallback: {begin: tracepoint:..., end: ...}': "
                             f"tracepoints, syscalls, uprobes and USDT work on {self.host.which}")
                return
            group = f"span_{s.name}"
            labels = [f"{bk}:{bside.probe.name}" if bk in ("fentry", "kprobe") else bside.probe.text
                      for (bk, _ek), bside, _eside in variants]
            self.groups[group] = tuple(labels)
            self.chosen[group] = 0
            if self.opt.kernel == "host" and self.host.enabled:
                chosen = next(i for i, a in enumerate(available) if a)
                self.chosen[group] = chosen
                if chosen:
                    self.d.warning("W311", f"span '{s.name}' uses its fallback '{labels[chosen]}' on {self.host.which} "
                                   f"({', '.join(labels[:chosen])} cannot attach here)", s.span)
        else:
            group = ""
            (bk, ek), _, _ = variants[0]
            for kind, side in ((bk, s.begin), (ek, s.end)):
                if self.mechanism_available(kind) is False:
                    alt = "tracepoint:..., syscall:NAME, uprobe: or usdt:"
                    self.d.error("E309", f"{kind} probes are not available on {self.host.which} "
                                 f"({'no CONFIG_KPROBES' if 'kprobe' in kind else 'BPF function tracing is locked down'})",
                                 side.probe.span, f"use kernel:{side.probe.name} with a 'fallback', or {alt}; "
                                 "build with --kernel any to target another kernel")
                    return
        begin_map = MapSpec(f"span_{s.name}_begin", "HASH", None, None, 2 * self.spec.limits.concurrency, "span_begin")
        self.span_maps[s.name] = begin_map
        for i, ((bk, ek), bside, eside) in enumerate(variants):
            b = self.probe(bside.probe, bk, group, i)
            e = self.probe(eside.probe, ek, group, i)
            if b is None or e is None:
                continue
            bctx = self.context_for(b, False)
            bkey = self.key_expr(bside.key, bctx, f"span '{s.name}' begin key")
            ekey = self.key_expr(eside.key, self.context_for(e, False), f"span '{s.name}' end key")
            filt = self.types.condition(s.filter, bctx, f"span '{s.name}' filter") if s.filter else None
            within = self.within(s.within, s.name, bctx)
            if bkey is None or ekey is None or (s.filter is not None and filt is None):
                continue
            if s.within is not None and not within:
                continue
            b.actions.append(SpanBegin(s.name, bkey, Guard(filt, within), restart=s.restart))
            self.span_ends.setdefault(s.name, []).append((e, ekey))

    def key_expr(self, expr: ast.Expr | None, ctx: ProbeContext, what: str):
        if expr is None:
            return Context("tid", INT)
        return self.types.value(expr, ctx, what, allow_address=True)

    def within(self, ref: WithinRef | None, owner: str, ctx: ProbeContext) -> tuple[Within, ...]:
        """The `within` guard where `ctx` runs: the outer span, and its key computed here."""
        if ref is None:
            return ()
        name, span = ref.name, ref.span
        if name not in self.spec.spans:
            self.d.error("E330", f"'within' names unknown span '{name}'", span, did_you_mean(name, self.spec.spans))
            return ()
        if name == owner:
            self.d.error("E330", f"span '{owner}' cannot be within itself", span)
            return ()
        if ref.key is None:
            if name not in self.thread_spans:
                self.d.error("E331", f"'within: {name}' needs the key of '{name}' here: '{name}' is not keyed "
                             "by thread", span, f"write 'within: {{span: {name}, key: EXPR}}' with an expression "
                             f"that gives the same key as span '{name}' (a socket: args.skaddr, say)")
                return ()
            return (Within(name),)
        key = self.key_expr(ref.key, ctx, f"'within: {name}' key")
        return (Within(name, key),) if key is not None else ()

    # -- metrics -------------------------------------------------------------------------------
    def where(self, on, what: str) -> list[tuple[_ProbeBuild, object, bool]]:
        """The probes an update runs at: (probe, span end key or None, inside a span end)."""
        if isinstance(on, SpanEndRef):
            if on.span_name not in self.spec.spans:
                self.d.error("E320", f"{what}: unknown span '{on.span_name}'", on.span,
                             did_you_mean(on.span_name, self.spec.spans))
                return []
            return [(b, key, True) for b, key in self.span_ends.get(on.span_name, [])]
        if on.kind in ("kernel", "kernelret"):
            self.d.error("E312", f"{what}: '{on.kind}:' picks a mechanism for spans only", on.span,
                         "use it in a span with a fallback, or name tracepoint:/kprobe:/fentry: directly")
            return []
        if self.mechanism_available(on.kind) is False:
            self.d.error("E309", f"{on.kind} probes are not available on {self.host.which}", on.span,
                         f"tracepoints, syscalls, uprobes and USDT work on {self.host.which}; "
                         "build with --kernel any to target another kernel")
            return []
        b = self.probe(on)
        return [(b, None, False)] if b else []

    def lower_metric(self, m: MetricSpec) -> Metric | None:
        what = f"metric '{m.name}'"
        sites = self.where(m.on, what)
        if not sites:
            return None
        labels: list[Label] | None = None
        value_type: ValueType | None = None
        updates = []
        part_type = ValueType("int", render="enum", names=tuple(p[0] for p in m.parts))
        for build, end_key, in_span in sites:
            ctx = self.context_for(build, in_span, m.on.span_name if in_span else "", end_key)
            these = []
            for lab in m.labels:
                ir = self.types.value(lab.expr, ctx, f"label '{lab.name}'", allow_string=True, allow_address=True)
                if ir is not None:
                    these.append(Label(lab.name, ir))
            if len(these) < len(m.labels):
                return None
            if m.parts:
                these.insert(0, Label("part", Const(0, part_type)))
            labels = labels if labels is not None else these
            values: list[tuple[IRExpr | None, tuple[IRExpr, ...]]] = []
            if m.parts:
                for i, (part, expr, _span) in enumerate(m.parts):
                    value = self.types.value(expr, ctx, f"{what} part '{part}'")
                    if value is None:
                        return None
                    if value_type is not None and value.type.dimension != value_type.dimension:
                        self.d.error("E321", f"{what}: part '{part}' is {value.type.describe()} but an earlier "
                                     f"part is {value_type.describe()}", expr.span, "the parts share one histogram")
                        return None
                    value_type = value.type
                    values.append((value, (Const(i, part_type),) + tuple(lab.expr for lab in these[1:])))
            else:
                value = None
                if m.value is not None:
                    value = self.types.value(m.value, ctx, f"{what} value")
                    if value is None:
                        return None
                    value_type = value.type
                values.append((value, tuple(lab.expr for lab in these)))
            filt = self.types.condition(m.filter, ctx, f"{what} filter") if m.filter else None
            if m.filter is not None and filt is None:
                return None
            within = self.within(m.within, "", ctx)
            if m.within is not None and not within:     # reported by within()
                return None
            for value, label_exprs in values:
                updates.append((build, in_span, MetricUpdate(m.name, value, Guard(filt, within), label_exprs)))
        if value_type is not None and value_type.dimension == "none" and m.buckets:
            value_type = ValueType("int", m.buckets.dimension)   # a plain count with byte buckets is bytes
        unit, scale = self.metric_unit(m, value_type)
        edges = m.buckets.edges if m.buckets else ()
        if m.buckets and value_type is not None and "none" not in (m.buckets.dimension, value_type.dimension) \
                and value_type.dimension != m.buckets.dimension:
            self.d.error("E321", f"{what}: buckets are {m.buckets.dimension}s but the value is "
                         f"{value_type.describe()}", m.buckets.span)
            return None
        self.naming(m, unit)
        self.cardinality(m, labels or [], len(edges))
        members = [(f"l_{lab.name}", lab.expr.type if lab.expr.type.kind == "str" else
                    ValueType("int", signed=lab.expr.type.signed), lab.name) for lab in labels or []]
        hist = m.kind == "histogram"
        if members:
            key = struct_layout(f"{m.name}_key", members, bucket=hist)
            entries = self.spec.limits.series * ((len(edges) + 2) if hist else 1)
            mtype = "PERCPU_HASH"
        else:
            key = u32_key(f"{m.name}_key")
            entries = len(edges) + 2 if hist else 1
            mtype = "PERCPU_ARRAY"
        mp = MapSpec(f"m_{m.name}", mtype, key, u64_value(f"{m.name}_value"), entries, "metric")
        fold: dict[str, MapSpec] = {}
        if members:
            # Past limits.series label sets, updates go to a per-CPU array that is the __overflow__
            # series, and the label set is remembered (up to FOLDED_TRACKED of them) to be counted.
            fold["overflow_map"] = MapSpec(f"m_{m.name}_overflow", "PERCPU_ARRAY", u32_key(f"{m.name}_overflow_key"),
                                           u64_value(f"{m.name}_value"), len(edges) + 2 if hist else 1,
                                           "metric_overflow")
            fold["folded_map"] = MapSpec(f"m_{m.name}_folded", "HASH", key, u64_value(f"{m.name}_value"),
                                         FOLDED_TRACKED, "metric_folded")
            if hist:
                # a histogram's label set takes a slot per bucket used: admit label sets, not slots
                fold["sets_map"] = MapSpec(f"m_{m.name}_sets", "HASH", key, u64_value(f"{m.name}_value"),
                                           self.spec.limits.series, "metric_sets")
        for build, in_span, upd in updates:
            if in_span:
                self.pending_end.setdefault(id(build), []).append((m.on.span_name, upd))
            else:
                build.actions.append(upd)
        return Metric(m.name, m.kind, m.help or f"{m.kind} from {m.on.span_name + '.end' if isinstance(m.on, SpanEndRef) else m.on.text}",
                      unit, scale, tuple(labels or ()), edges, mp, self.spec.limits.series, **fold)

    def metric_unit(self, m: MetricSpec, vt: ValueType | None) -> tuple[str, float]:
        dim = vt.dimension if vt is not None else "none"
        if m.unit == "none":
            return "", 1.0
        if dim == "time" or m.unit == "seconds":
            return "seconds", 1e-9
        if dim == "size" or m.unit == "bytes":
            return "bytes", 1.0
        return "", 1.0

    def naming(self, m: MetricSpec, unit: str) -> None:
        if m.kind == "counter" and not m.name.endswith("_total"):
            self.d.warning("W401", f"counter '{m.name}' should end in '_total' (Prometheus convention)", m.span)
        base = m.name[:-6] if m.name.endswith("_total") else m.name
        if unit and not base.endswith("_" + unit):
            self.d.warning("W402", f"metric '{m.name}' is in {unit}; Prometheus names end in '_{unit}'", m.span,
                           f"e.g. '{base}_{unit}{'_total' if m.kind == 'counter' else ''}'")

    # Labels that take a value per thread, process, argument or address: fine for a few, a series
    # explosion on a busy host.
    UNBOUNDED_LABELS = ("pid", "tid", "cgroup", "uid")
    MAP_BYTES_WARNING = 64 << 20

    def cardinality(self, m: MetricSpec, labels: list[Label], n_edges: int) -> None:
        series = self.spec.limits.series
        for lab, spec_label in zip(labels, m.labels):
            e = lab.expr
            unbounded = (isinstance(e, Context) and e.name in self.UNBOUNDED_LABELS) or \
                type(e).__name__ in ("Arg", "Retval", "SpanTotal", "FdSocket") or \
                (type(e).__name__ == "TracepointField" and e.type.kind == "int" and e.type.render != "ipv4"
                 and e.name.endswith(("pid", "addr", "ino", "len", "size", "count", "bytes")))
            if unbounded:
                self.d.warning("W403", f"metric '{m.name}': label '{lab.name}' can take a new value per "
                               f"{'thread or process' if isinstance(e, Context) else 'event'}; past "
                               f"limits.series ({series}) label sets fold into '__overflow__'", spec_label.span,
                               "label by something with few values (comm, a state), or raise limits.series "
                               "knowingly")
        if labels:
            slots = series * ((n_edges + 2) if m.kind == "histogram" else 1)
            cpus = os.cpu_count() or 1
            key_bytes = 8 * len(labels) + 16 * sum(1 for lab in labels if lab.expr.type.kind == "str") + 8
            approx = slots * (key_bytes + 8 * cpus + 64)
            if approx > self.MAP_BYTES_WARNING:
                self.d.warning("W404", f"metric '{m.name}': its map holds {slots:,} entries "
                               f"(limits.series {series} x {n_edges + 2} slots), about {approx >> 20} MiB of "
                               f"kernel memory on {cpus} CPUs", m.span,
                               "lower limits.series or use fewer buckets")

    # -- events --------------------------------------------------------------------------------
    def lower_event(self, ev: EventSpec, index: int) -> Event | None:
        what = f"event '{ev.name}'"
        sites = self.where(ev.on, what)
        if not sites:
            return None
        fields: list[EventField] | None = None
        emits = []
        for build, end_key, in_span in sites:
            ctx = self.context_for(build, in_span, ev.on.span_name if in_span else "", end_key)
            these = []
            for f in ev.fields:
                if f.stack:
                    these.append(EventField(f.name, None, f.stack))
                    self.needs_stacks = True
                    continue
                ir = self.types.value(f.expr, ctx, f"field '{f.name}'", allow_string=True, allow_address=True)
                if ir is None:
                    return None
                these.append(EventField(f.name, ir, "", ir.type.kind == "str"))
            fields = fields if fields is not None else these
            when = self.types.condition(ev.when, ctx, f"{what} condition") if ev.when else None
            if ev.when is not None and when is None:
                return None
            emits.append((build, in_span, EmitEvent(ev.name, when, Guard())))
        names = [f.name for f in fields]
        for dup in {n for n in names if names.count(n) > 1}:
            self.d.error("E340", f"{what}: field '{dup}' appears twice", ev.span)
        members = []
        for f in fields:
            if f.stack:
                members.append((f.name, ValueType("int", signed=True), ""))
            else:
                t = f.expr.type
                members.append((f.name, t if t.kind == "str" else ValueType("int", signed=t.signed), ""))
        header = [(f.name, f.ctype, f.size, f.code) for f in EVENT_HEADER]
        record = struct_layout(f"event_{ev.name}", members, header=header)
        for build, in_span, emit in emits:
            if in_span:
                self.pending_end.setdefault(id(build), []).append((ev.on.span_name, emit))
            else:
                build.actions.append(emit)
        return Event(ev.name, index, tuple(fields), ev.sample_every, ev.max_per_second, record)

    # -- the whole program ---------------------------------------------------------------------
    def run(self) -> Program | None:
        self.pending_end: dict[int, list] = {}
        for s in self.spec.spans.values():
            self.lower_span(s)
        metrics = [m for m in (self.lower_metric(m) for m in self.spec.metrics.values()) if m]
        events = [e for e in (self.lower_event(e, i) for i, e in enumerate(self.spec.events.values())) if e]
        for span, ends in self.span_ends.items():
            for build, key in ends:
                then = tuple(upd for name, upd in self.pending_end.get(id(build), []) if name == span)
                build.actions.append(SpanEnd(span, key, then))
        if self.left_out_binaries and not self.d.has_errors():
            metrics, events = self.leave_out(metrics, events)
        self.check_inside_at_end()
        accumulators = self.accumulate_totals()
        probes = []
        for build in self.probes.values():
            if not build.actions:
                continue
            probes.append(replace(build.probe, actions=tuple(build.actions)))
            if build.ctx.notes and self.host.enabled:     # --no-host: nothing was to be checked
                self.d.warning("W313", f"{build.ctx.description}: tracefs is not readable, so fields "
                               f"{', '.join(sorted({name for name, _ in build.ctx.notes}))} were not checked "
                               "(BTF names tracepoints but not their fields)", build.ctx.notes[0][1],
                               "mount tracefs (mount -t tracefs nodev /sys/kernel/tracing) or run as root")
        self.unused_spans()
        if not self.d.has_errors():
            self.check_budgets(probes, metrics, events)
        if self.d.has_errors():
            return None
        spans = tuple(SpanInfo(n, self.span_maps[n]) for n in self.spec.spans if n in self.span_maps)
        maps = [s.begin_map for s in spans] + accumulators + [m.map for m in metrics]
        maps += [mp for m in metrics for mp in (m.sets_map, m.overflow_map, m.folded_map) if mp is not None]
        if events:
            maps.append(MapSpec("events", "RINGBUF", None, None, self.spec.limits.ringbuf_bytes, "event"))
        if self.needs_stacks:
            maps.append(MapSpec("stacks", "STACK_TRACE", None, None, 1024, "stacks"))
        return Program(self.spec.name, self.spec.file.rsplit("/", 1)[-1], self.spec.description, tuple(probes),
                       spans, tuple(metrics), tuple(events), tuple(maps), self.spec.limits.ringbuf_bytes,
                       self.needs_stacks, tuple(self.groups.items()), tuple(self.chosen.items()),
                       tuple(self.notes))

    def check_budgets(self, probes: list[Probe], metrics: list[Metric], events: list[Event]) -> None:
        """What clang and bpftrace would refuse for size, found here with the spec's places: the BPF
        stack a probe's program needs in either backend, and the number of probes."""
        if len(probes) > MAX_PROBES:
            self.d.error("E350", f"the spec needs {len(probes)} probes; bpftrace attaches at most {MAX_PROBES}",
                         self.spec.span, "split it into several specs")
        by_metric = {m.name: m for m in metrics}
        by_event = {e.name: e for e in events}
        for p in probes:
            nodes = list(walk(p.actions))
            updates = [n for n in nodes if isinstance(n, MetricUpdate)]
            emits = [n for n in nodes if isinstance(n, EmitEvent)]
            # core: strings read from the tracepoint, comm, and the largest map key (probe.bpf.c.j2)
            strings = sum({n.name: n.size for n in nodes if isinstance(n, TracepointField) and n.type.kind == "str"}
                          .values())
            comm = 16 if any(isinstance(n, Context) and n.name == "comm" for n in nodes) else 0
            # bpftrace: each map key and each printf record on the stack, one at a time
            needs: list[tuple[int, int, str, object]] = []    # (core bytes, bpftrace bytes, what, span)
            for upd in updates:
                m = by_metric[upd.metric]
                if not m.labels:
                    continue
                key = sum(8 if lab.expr.type.kind != "str" else lab.expr.type.length for lab in m.labels)
                needs.append((strings + comm + m.map.key.size, key + (8 if m.kind == "histogram" else 0),
                              f"metric '{m.name}'", self.spec.metrics[m.name].span))
            for emit in emits:
                ev = by_event[emit.event]
                record = BPFTRACE_PRINTF_HEADER + sum(
                    BPFTRACE_STACK_BYTES if f.stack else f.expr.type.length if f.is_string else 8 for f in ev.fields)
                needs.append((strings + comm, record, f"event '{ev.name}'", self.spec.events[ev.name].span))
            for core, bpftrace, what, span in needs:
                worst = max(core, bpftrace)
                if worst > STACK_BUDGET:
                    self.d.error("E351", f"{what} needs about {worst} bytes of BPF stack at {p.spec_text or p.id} "
                                 f"({'bpftrace' if bpftrace >= core else 'core'}); at most {STACK_BUDGET} are "
                                 "available", span, "use fewer or shorter string labels and event fields "
                                 "(comm is 16 bytes, a number 8)")
                    break

    def leave_out(self, metrics: list[Metric], events: list[Event]) -> tuple[list[Metric], list[Event]]:
        """Leave out, with a warning, what lost its probes to a missing optional binary: spans
        that never begin, then whatever is `within` them or runs at their end (repeatedly, since
        a span within a left-out span is left out too), then metrics and events with no update left."""
        missing = ", ".join(sorted(self.left_out_binaries))
        gone: set[str] = set()
        while True:
            begun = {a.span for b in self.probes.values() for a in b.actions if isinstance(a, SpanBegin)}
            newly = set(self.span_maps) - begun - gone
            if not newly:
                break
            gone |= newly
            for build in self.probes.values():
                kept = []
                for a in build.actions:
                    if isinstance(a, SpanEnd):
                        if a.span in gone:
                            continue
                        a = replace(a, then=tuple(t for t in a.then if not {w.span for w in t.guard.within} & gone))
                    elif {w.span for w in a.guard.within} & gone:
                        continue
                    kept.append(a)
                build.actions[:] = kept
        for name in self.spec.spans:
            if name in gone:
                del self.span_maps[name]
                self.d.warning("W304", f"span '{name}' is left out of this build: its probes, or a span it "
                               f"is within, need missing optional binaries ({missing})", self.spec.spans[name].span)
        updated, emitted = set(), set()
        for build in self.probes.values():
            for a in build.actions:
                for x in (a.then if isinstance(a, SpanEnd) else (a,)):
                    if isinstance(x, MetricUpdate):
                        updated.add(x.metric)
                    elif isinstance(x, EmitEvent):
                        emitted.add(x.event)
        for kind, items, active in (("metric", self.spec.metrics, updated), ("event", self.spec.events, emitted)):
            for name, item in items.items():
                if name not in active:
                    self.d.warning("W304", f"{kind} '{name}' is left out of this build: every probe it needs "
                                   f"is on a missing optional binary ({missing})", item.span)
        return [m for m in metrics if m.name in updated], [e for e in events if e.name in emitted]

    def check_inside_at_end(self) -> None:
        """A span `within` S is checked again where it ends: S must still be open there, at the
        end key (`end_key`, else `key`, else the thread ending it). A begin whose end the kernel
        never delivered (a lost sched_switch, say) otherwise ends much later, outside S, and
        lands in the span's metrics though not in S's totals. Where the key cannot be computed at
        the end the check is left out, unless `INNER.total` needs it (then it is an error)."""
        for inner, span in self.spec.spans.items():
            ref = span.within
            if ref is None or ref.name not in self.span_maps:
                continue
            report = inner in self.types.totals_used
            for build in self.probes.values():
                for i, a in enumerate(build.actions):
                    if isinstance(a, SpanEnd) and a.span == inner:
                        build.actions[i] = replace(a, inside=self.inside_at_end(ref, inner, build, a, report))

    def inside_at_end(self, ref: WithinRef, inner: str, build: _ProbeBuild, end: SpanEnd,
                      report: bool) -> Within | None:
        outer = ref.name
        if not ref.key and end.key != TID:
            if report:
                self.d.error("E332", f"span '{inner}' ends at another thread's key, so '{inner}.total' "
                             f"cannot be added to the current thread's '{outer}'", ref.span,
                             f"say which thread's '{outer}' it belongs to where '{inner}' begins and "
                             f"where it ends: 'within: {{span: {outer}, key: EXPR, end_key: EXPR}}'")
            return None
        if not ref.key:
            return Within(outer)
        mark = len(self.d.items)
        at_end = self.within(replace(ref, key=ref.end_key or ref.key), inner, self.context_for(build, False))
        if at_end:
            return at_end[0]
        if report:
            self.d.note_last(f"'{inner}.total' and '{inner}.count' add up where span '{inner}' ends, "
                             f"so the key of 'within: {outer}' must be known there too: give it "
                             "as 'end_key' if it is computed otherwise there")
        else:
            del self.d.items[mark:]     # not needed here: the end goes unchecked
        return None

    def accumulate_totals(self) -> list[MapSpec]:
        """Wire up `INNER.total` / `INNER.count`: the outer span's begin resets them, the inner
        span's end adds to them while the outer is open, the outer's end reads then drops them."""
        maps: list[MapSpec] = []
        for inner in sorted(self.types.totals_used):
            is_span = inner in self.spec.spans
            outer = (self.spec.spans[inner] if is_span else self.spec.metrics[inner]).within.name
            if outer not in self.span_maps:
                continue
            for build in self.probes.values():
                new = []
                for a in build.actions:
                    if isinstance(a, SpanBegin) and a.span == outer:
                        a = replace(a, resets=a.resets + (inner,))
                    elif isinstance(a, SpanEnd) and a.span == inner and is_span:
                        if a.inside is None:      # reported by check_inside_at_end
                            continue
                        a = replace(a, accumulate_into=a.inside)
                    elif isinstance(a, MetricUpdate) and a.metric == inner and not is_span:
                        a = replace(a, accumulate_into=a.guard.within[0])
                    elif isinstance(a, SpanEnd) and a.span == outer:
                        a = replace(a, clears=a.clears + (inner,))
                    new.append(a)
                build.actions[:] = new
            capacity = self.span_maps[outer].max_entries
            maps += [MapSpec(name, "HASH", None, None, capacity, "accumulator")
                     for name in kept_accumulators(inner, is_span)]
        return maps

    def unused_spans(self) -> None:
        used = set()
        for m in self.spec.metrics.values():
            if isinstance(m.on, SpanEndRef):
                used.add(m.on.span_name)
            if m.within:
                used.add(m.within.name)
        for e in self.spec.events.values():
            if isinstance(e.on, SpanEndRef):
                used.add(e.on.span_name)
        for s in self.spec.spans.values():
            if s.within:
                used.add(s.within.name)
        used |= self.types.totals_used | self.types.active_used
        for name, s in self.spec.spans.items():
            if name not in used:
                self.d.warning("W320", f"span '{name}' is measured but no metric or event uses it", s.span,
                               f"add e.g. 'histogram: {name}.duration' to a metric")


def lower(spec: Spec, diags: Diagnostics, options: LoweringOptions | None = None) -> Program | None:
    return Lowering(spec, diags, options or LoweringOptions()).run()
