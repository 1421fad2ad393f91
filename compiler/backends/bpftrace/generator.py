"""The bpftrace backend: IR -> one bpftrace script plus the manifest the runtime reads."""

from __future__ import annotations

import re

from ...diagnostics import Diagnostics, SourceSpan
from ...escaping import bpftrace_address_part, bpftrace_string, visible
from ...ir import nodes as ir
from ...kinds import METRIC_KINDS
from ..base import Backend, Bundle, template_environment
from ..manifest import contract

SEPARATOR = "\\037"          # ASCII unit separator between printf fields: never in a number
EVENT_MARK = "E"
READY_MARK = "probec: all probes attached"
DUMP_MARK = "probec: dump end"     # printed after the last map of each periodic dump, with its epoch
# Metric maps carry an epoch (0 or 1) as their first key, which each dump flips before printing: the
# epoch it leaves takes no more updates, so every map printed is read at the same instant, the flip.
EPOCH = "@__probec_epoch"
READY_MAP = "@__probec_ready"      # set once, by the probe written last: every probe is attached


class ExpressionEmitter:
    """Renders IR expressions as bpftrace for one probe."""

    def __init__(self, probe: ir.Probe, version: tuple[int, int]):
        self.probe = probe
        self.version = version
        self.prelude: list[str] = []                # statements the probe runs first
        self.hoisted: dict[ir.IRExpr, str] = {}     # expressions computed once, in the prelude

    def reads_args(self) -> bool:
        """Whether the probe reads tracepoint args (args->NAME) anywhere."""
        return self.probe.kind == "tracepoint" and any(
            isinstance(n, (ir.TracepointField, ir.Retval)) for n in ir.walk(self.probe.actions))

    def args_field(self, name: str) -> str:
        return f"args.{name}" if self.version >= (0, 20) else f"args->{name}"

    def emit(self, e: ir.IRExpr) -> str:
        if isinstance(e, ir.Context):
            return e.name
        if isinstance(e, ir.Arg):
            return f"arg{e.index}"
        if isinstance(e, ir.Retval):
            return self.args_field("ret") if self.probe.kind == "tracepoint" else "retval"
        if isinstance(e, ir.TracepointField):
            text = self.args_field(e.name)
            if e.type.render == "ipv4":
                return f"ntop({text})"    # bpftrace renders the address itself, as a string
            if e.type.kind == "int" and e.size == 8 and not e.type.signed:
                return f"(uint64){text}"    # pointers (skaddr) are numbers here, as in map keys
            return text   # fixed char[N] fields are strings already; __data_loc ones are refused in typing
        if isinstance(e, ir.Duration):
            return "$duration"
        if isinstance(e, ir.SpanTotal):
            total, count = ir.accumulator_maps(e.span)
            return f"@{total if e.field == 'total' else count}[{self.emit(e.key)}]"
        if isinstance(e, ir.ActiveSpan):
            # the first listed span open on this thread wins: (a open ? 1 : (b open ? 2 : 0))
            text = "0"
            for i in reversed(range(len(e.spans))):
                text = f"(@span_{e.spans[i]}_begin[{self.emit(e.key)}] != 0 ? {i + 1} : {text})"
            return text
        if isinstance(e, ir.FdSocket):
            # files->fdt->fd[fd], if fd is in the table and its file is a socket (S_IFSOCK): its
            # sock. Computed once, at the top of the probe: the fd table is the same throughout.
            if e not in self.hoisted:
                fd = f"(uint64){self.emit(e.fd)}"
                fdt = "curtask->files->fdt"
                file = f"(*({fdt}->fd + {fd}))"
                if not self.reads_args():
                    # bpftrace 0.17 knows struct file's members only once the probe has loaded
                    # kernel types for tracepoint args; elsewhere the type must be named
                    file = f"((struct file *)*({fdt}->fd + {fd}))"
                name = f"$__socket{len(self.hoisted)}"
                self.hoisted[e] = name
                self.prelude.append(f"{name} = ({fd} < (uint64){fdt}->max_fds && ({file}->f_inode->i_mode & 0xf000)"
                                    f" == 0xc000 ? (uint64)((struct socket *){file}->private_data)->sk : 0);")
            return self.hoisted[e]
        if isinstance(e, ir.Const):
            return str(e.value)
        if isinstance(e, ir.StrConst):
            return bpftrace_string(e.value)
        if isinstance(e, ir.BinOp):
            return f"({self.emit(e.left)} {e.op} {self.emit(e.right)})"
        if isinstance(e, (ir.Cmp, ir.StrEq, ir.Logic)):
            return f"({self.emit(e.left)} {e.op} {self.emit(e.right)})"
        if isinstance(e, ir.Not):
            return f"!{self.emit(e.operand)}"
        if isinstance(e, ir.Neg):
            return f"(0 - {self.emit(e.operand)})"
        raise AssertionError(type(e))  # pragma: no cover


def uprobe_address(backend: "BpftraceBackend", p: ir.Probe) -> str | None:
    # Checked here, after resolution: the spec's spelling was checked at load, but a symlink, the
    # spec's folder, ${VARIABLE} or a library look-up can lead anywhere.
    binary = backend.address_part(p, "binary after resolution", p.binary)
    symbol = binary and backend.address_part(p, "symbol", p.symbol)
    return f"{p.kind}:{binary}:{symbol}" if binary and symbol else None


def usdt_address(backend: "BpftraceBackend", p: ir.Probe) -> str | None:
    binary = backend.address_part(p, "binary after resolution", p.binary)
    return f"usdt:{binary}:{p.provider}:{p.name}" if binary else None


def function_address(backend: "BpftraceBackend", p: ir.Probe) -> str:
    word = p.kind if backend.version >= (0, 19) else {"fentry": "kfunc", "fexit": "kretfunc"}[p.kind]
    return f"{word}:{p.name}"


class BpftraceBackend(Backend):
    name = "bpftrace"
    # How each probe kind of compiler/kinds.py is written as a bpftrace probe address.
    PROBES = {
        "tracepoint": lambda backend, p: f"tracepoint:{p.category}:{p.name}",
        "uprobe": uprobe_address,
        "uretprobe": uprobe_address,
        "usdt": usdt_address,
        "kprobe": lambda backend, p: f"kprobe:{p.name}",
        "kretprobe": lambda backend, p: f"kretprobe:{p.name}",
        "fentry": function_address,
        "fexit": function_address,
        "profile": lambda backend, p: f"profile:hz:{p.rate}",
        "interval": lambda backend, p: f"interval:ms:{max(1, p.rate // 1_000_000)}",
    }
    # The template of each way a metric is updated (compiler/kinds.py MetricKind.update).
    UPDATES = {"add": "metric_update.bt.j2", "buckets": "metric_update.bt.j2"}

    def __init__(self, diags: Diagnostics, version: tuple[int, int] = (0, 17), interval_ms: int = 1000,
                 spec_span: SourceSpan | None = None):
        super().__init__(diags, spec_span)
        self.version = version
        self.interval_ms = interval_ms
        self.env = template_environment("bpftrace")
        self.counter = 0

    # -- names ---------------------------------------------------------------------------------
    @staticmethod
    def generated_names(kind: str, name: str, histogram: bool = False) -> tuple[str, ...]:
        total, count = ir.accumulator_maps(name)
        if kind == "span":
            return (f"@span_{name}_begin", outside_counter(name), overflow_counter(name), "@" + total, "@" + count)
        if kind == "metric":
            return (f"@m_{name}", "@" + count) + ((f"@m_{name}_sum",) if histogram else ())
        return tuple(event_maps(name).values())

    def var(self, stem: str) -> str:
        self.counter += 1
        return f"$__{stem}{self.counter}"

    @staticmethod
    def map_name(name: str) -> str:
        return "@" + name

    def address_part(self, p: ir.Probe, what: str, text: str) -> str | None:
        """A resolved path or ELF symbol as bpftrace can read it: as it is, or quoted. Lowering
        refuses the ones bpftrace cannot name (E503), so that check accepts only what builds."""
        part = bpftrace_address_part(text)
        if part is None:
            self.d.error("E520", f"a probec bug: the {what} '{visible(text)}' reached the bpftrace backend "
                         "unchecked", p.span)
        return part

    def address(self, p: ir.Probe) -> str | None:
        return self.PROBES[p.kind](self, p)

    # -- actions -------------------------------------------------------------------------------
    def guard(self, g: ir.Guard, em: ExpressionEmitter) -> str:
        parts = [f"{self.map_name('span_' + w.span + '_begin')}[{em.emit(w.key)}] != 0" for w in g.within]
        if g.filter is not None:
            parts.insert(0, em.emit(g.filter))
        return " && ".join(f"({p})" for p in parts) if len(parts) > 1 else (parts[0] if parts else "")

    def render(self, template: str, **values) -> list[str]:
        return self.env.get_template(template).render(**values).rstrip("\n").split("\n")

    def action(self, a: ir.Action, em: ExpressionEmitter, program: ir.Program) -> list[str]:
        if isinstance(a, ir.SpanBegin):
            resets = [self.map_name(m) for inner in a.resets for m in program.accumulators(inner)]
            guard = self.guard(a.guard, em)
            begin_map, key = self.map_name(f"span_{a.span}_begin"), em.emit(a.key)
            if not a.restart:      # keep the first begin: only while the span is not open on this key
                first = f"{begin_map}[{key}] == 0"
                guard = f"({guard}) && ({first})" if guard else first
            return self.render("span_begin.bt.j2", guard=guard, map=begin_map, key=key, resets=resets,
                               overflow=overflow_counter(a.span))
        if isinstance(a, ir.SpanEnd):
            then = [line for t in a.then for line in self.action(t, em, program)]
            total, count = (self.map_name(m) for m in ir.accumulator_maps(a.span))
            inside = self.guard(ir.Guard(within=(a.inside,)), em) if a.inside else ""
            return self.render("span_end.bt.j2", start=self.var("start"), map=self.map_name(f"span_{a.span}_begin"),
                               key=em.emit(a.key), then=then, inside=inside, pad="  " if inside else "",
                               outside=outside_counter(a.span),
                               accumulate=a.accumulate_into is not None,
                               outer_key=em.emit(a.accumulate_into.key) if a.accumulate_into else "",
                               total=total, count=count,
                               clears=[self.map_name(m) for inner in a.clears for m in program.accumulators(inner)])
        if isinstance(a, ir.MetricUpdate):
            m = program.metric(a.metric)
            labels = [em.emit(lab) for lab in a.labels]
            hist = METRIC_KINDS[m.kind].buckets
            edges = [{"index": i, "value": v} for i, v in enumerate(m.edges)]
            epoch = f"$__epoch = {EPOCH};"      # read once per firing: all its updates in one epoch
            if epoch not in em.prelude:
                em.prelude.append(epoch)
            labels = ["$__epoch"] + labels
            guard = self.guard(a.guard, em)
            return self.render(
                self.UPDATES[METRIC_KINDS[m.kind].update], guard=guard, ind="  " if guard else "", histogram=hist,
                var=self.var("value"), bucket=self.var("bucket"),
                value=em.emit(a.value) if a.value is not None else "", edges=list(m.edges),
                edges_descending=list(reversed(edges)), map=self.map_name(m.map.name),
                key_prefix="".join(f"{lab}, " for lab in labels),
                key=f"[{', '.join(labels)}]",
                sum_map=self.map_name(m.map.name + "_sum"),
                sum_key=f"[{', '.join(labels)}]",
                counted=self.map_name(ir.accumulator_maps(a.metric)[1]) if a.accumulate_into else "",
                counted_key=em.emit(a.accumulate_into.key) if a.accumulate_into else "")
        if isinstance(a, ir.EmitEvent):
            ev = program.event(a.event)
            formats, args = [EVENT_MARK, str(ev.index), "%llu", "%d", "%d", "%d"], ["nsecs", "pid", "tid", "cpu"]
            for f in ev.fields:
                if f.stack:
                    formats.append("%s")
                    args.append("ustack" if f.stack == "user" else "kstack")
                elif f.is_string or f.expr.type.render == "ipv4":    # ntop(): bpftrace's own text
                    formats.append("%s")
                    args.append(em.emit(f.expr))
                else:
                    formats.append("%lld" if f.expr.type.signed else "%llu")
                    args.append(em.emit(f.expr))
            cond = self.guard(ir.Guard(a.when, a.guard.within), em) or "1"
            maps = event_maps(ev.name)
            return self.render("emit_event.bt.j2", condition=cond, seen=maps["seen"], tick=maps["tick"],
                               sample_every=ev.sample_every, max_per_second=ev.max_per_second,
                               window=maps["window"], in_window=maps["in_window"],
                               limited=maps["limited"], format=SEPARATOR.join(formats),
                               arguments=", ".join(args))
        raise AssertionError(type(a))  # pragma: no cover

    # -- the script ----------------------------------------------------------------------------
    def build(self, program: ir.Program) -> Bundle:
        chosen = dict(program.host_variants)
        if self.version < (0, 18) and any(f.stack == "user" for e in program.events for f in e.fields):
            self.d.warning("W504", f"bpftrace {self.version[0]}.{self.version[1]} can exit while it symbolises the "
                           "user stack of a thread or process that has just exited; probec run restarts it and carries "
                           "the counts over, but counts since its last dump and spans and events in flight "
                           "are lost. "
                           "The core backend has no such limit.", None)
        probes_text = []
        used_probes = []
        for p in program.probes:
            if p.group and chosen.get(p.group, 0) != p.variant:
                continue
            if p.offset and not p.past_endbr64:      # refused in check (E502)
                self.d.error("E520", f"a probec bug: {p.spec_text} reached the bpftrace backend with an offset "
                             f"(+{p.offset})", None)
                continue
            if p.offset and p.kind == "uprobe":
                self.d.warning("W502", f"{p.spec_text}: bpftrace {self.version[0]}.{self.version[1]} cannot probe "
                               f"past endbr64 (+{p.offset}); the prototype probes the entry, which costs a "
                               "single-step trap per call. The core backend places it past endbr64.", None)
            # (A return probe placed past endbr64 goes to the entry too: that changes its cost only.)
            address = self.address(p)
            if address is None:
                continue
            em = ExpressionEmitter(p, self.version)
            lines = []
            for a in p.actions:
                lines += self.action(a, em, program)
            lines = em.prelude + lines
            probes_text.append(self.render("probe.bt.j2", address=address,
                                           actions=["  " + line if line else line for line in lines]))
            used_probes.append(p)
        # The maps the runtime reads, named here once: the script prints them and the manifest
        # tells the runtime what each one holds.
        metric_maps = []
        for m in program.metrics:
            metric_maps.append(contract.BpftraceMetricMap(self.map_name(m.map.name), m.name, contract.MetricMapRole.MAIN))
            if METRIC_KINDS[m.kind].buckets:
                metric_maps.append(contract.BpftraceMetricMap(self.map_name(m.map.name + "_sum"), m.name,
                                                              contract.MetricMapRole.SUM))
        printed = [mm.map for mm in metric_maps]
        epoch_maps = list(printed)
        cleared = [self.map_name(m.name) for m in program.maps if m.purpose in ("span_begin", "accumulator")]
        cleared.append(EPOCH)
        printed += [outside_counter(span) for span in program.checked_at_end()]
        printed += [overflow_counter(s.name) for s in program.spans]
        counters = [contract.BpftraceCounter(outside_counter(span), contract.HealthSlot.SPAN_OUTSIDE, span)
                    for span in program.checked_at_end()]
        counters += [contract.BpftraceCounter(overflow_counter(s.name), contract.HealthSlot.SPAN_OVERFLOW, s.name)
                     for s in program.spans]
        for e in program.events:
            maps = event_maps(e.name)
            counters += [contract.BpftraceCounter(maps["seen"], contract.HealthSlot.EVENT_SEEN, e.name),
                         contract.BpftraceCounter(maps["limited"], contract.HealthSlot.EVENT_RATE_LIMITED, e.name)]
            printed.append(maps["seen"])
            if e.sample_every > 1:
                cleared.append(maps["tick"])
            if e.max_per_second:     # these maps exist only where the script rate-limits
                printed.append(maps["limited"])
                cleared += [maps["window"], maps["in_window"]]
        script = "\n".join(self.env.get_template("script.bt.j2").render(
            source=program.source, version=f"{self.version[0]}.{self.version[1]}", name=program.name,
            probes=[("\n".join(t)).rstrip() for t in probes_text], interval_ms=self.interval_ms,
            printed_maps=printed, cleared_maps=cleared, ready_mark=READY_MARK,
            dump_mark=DUMP_MARK, epoch=EPOCH, ready_map=READY_MAP).split("\n"))
        script_name = f"{program.name}.bt"
        keys_max = max([m.max_entries for m in program.maps if m.shape in ("slots", "table")] + [4096])
        manifest = self.base_manifest(program, {"script": script_name}, bpftrace=contract.BpftraceSection(
            version=f"{self.version[0]}.{self.version[1]}", interval_ms=self.interval_ms,
            map_keys_max=2 * keys_max,      # two epochs of each label set
            metric_maps=tuple(metric_maps), epoch_maps=tuple(epoch_maps), counters=tuple(counters),
            ready_map=READY_MAP, separator="\x1f", event_mark=EVENT_MARK, ready_mark=READY_MARK,
            dump_mark=DUMP_MARK, probes=tuple(p.id for p in used_probes),
        ))
        return Bundle(program.name, self.name, {script_name: script.encode()}, manifest)


def event_maps(event: str) -> dict[str, str]:
    """The bpftrace maps of one event: conditions met, the sampling tick, the rate window."""
    return {role: f"@__ev_{event}_{role}" for role in ("seen", "tick", "window", "in_window", "limited")}


def outside_counter(span: str) -> str:
    """The bpftrace count of a span's ends dropped for outliving their `within` span."""
    return f"@__span_{span}_outside"


def overflow_counter(span: str) -> str:
    """The bpftrace count of a span's begins dropped because its begin map was full."""
    return f"@__span_{span}_overflow"


def parse_version(text: str) -> tuple[int, int] | None:
    m = re.search(r"v?(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None
