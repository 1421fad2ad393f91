"""Resolving a spec's probe addresses against the spec and the host: binaries, symbols, USDT
notes, kernel functions, tracepoints and the mechanisms this kernel has, into one IR probe per
address, whose actions lowering then fills.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ...host import containers, elf
from ..diagnostics import did_you_mean, shown
from ..escaping import bpftrace_address_part, visible
from ..kinds import PROBE_KINDS
from ..spec.model import ProbeAddress
from .nodes import TID, Action, IRExpr, Probe
from .typecheck import ProbeContext


SYSCALL_ARGS_NOTE = "syscall:NAME is the sys_enter_NAME tracepoint; syscallret:NAME is sys_exit_NAME"


@dataclass
class ProbeBuild:
    """A probe being lowered: the actions of every span, metric and event that runs at it."""
    probe: Probe
    actions: list[Action]
    ctx: ProbeContext


class ProbeResolution:
    """Lowering's probes: a part of Lowering (lowering.py), sharing its state."""

    def binary_path(self, addr: ProbeAddress) -> str | None:
        """The absolute path of a probe's binary; each binary's problems are reported once."""
        if addr.target not in self.binaries:
            self.binaries[addr.target] = self._binary_path(addr)
        return self.binaries[addr.target]

    def _binary_path(self, addr: ProbeAddress) -> str | None:
        target = addr.target
        b = self.spec.binaries.get(target)
        if b is not None and (b.pid or b.container):
            return self.container_binary(b)
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

    def container_binary(self, b) -> str | None:
        """A binary as a container sees it: `/proc/PID/root/PATH` of the process `pid`, or of a
        process of the container named `container` (found through the kubelet's pod list at
        PROBEC_KUBELET where the spec is built; the runtime attaches to every process of it)."""
        if not self.host.enabled:
            return containers.in_container_root(b.pid, b.path) if b.pid else b.path
        where = f"process {b.pid}" if b.pid else f"container '{b.container}'"
        try:
            if b.pid:
                return containers.resolve_in_root(b.pid, b.path)
            url = os.environ.get("PROBEC_KUBELET")
            if not url:
                raise OSError("PROBEC_KUBELET is not set, so no process of the container can be found")
            pids = containers.container_processes(b.container, containers.fetch_pod_list(url))
            if not pids:
                raise OSError(f"no process on this host runs in a container named '{b.container}'")
            failure: OSError | None = None
            for pid in pids:
                try:
                    return containers.resolve_in_root(pid, b.path)
                except OSError as exc:
                    failure = exc
            raise failure
        except (OSError, ValueError) as exc:
            report = self.d.warning if b.optional else self.d.error
            hint = "probes on it are left out of this build" if b.optional else \
                "build on the node while the process runs: the symbols are read from its file" if b.pid else \
                "build on the node while the container runs, with PROBEC_KUBELET set to the kubelet's pod list " \
                "(http://127.0.0.1:10255/pods): the symbols are read from the file of one of its processes"
            report("W302" if b.optional else "E302", f"binary '{b.alias}' in {where} not found: "
                   f"{getattr(exc, 'strerror', None) or exc}", b.span, hint)
            if b.optional:
                self.left_out_binaries.add(b.alias)
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
        mechanism = PROBE_KINDS[kind].mechanism
        if mechanism == "kprobes":
            return self.host.has_kprobes
        if mechanism == "fentry":
            if self.opt.backend == "bpftrace" and self.host.has_fentry:
                return self.host.bpftrace_kfunc        # bpftrace's own answer (0.17: no on 5.10)
            return self.host.has_fentry
        return True

    def probe(self, addr: ProbeAddress, kind: str | None = None, group: str = "", variant: int = 0
              ) -> ProbeBuild | None:
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
        declared = self.spec.binaries.get(addr.target) if binary else None
        probe = Probe(pid, kind, category, name if kind != "usdt" else addr.name, binary, symbol, offset,
                      provider, addr.rate, (), group, variant, addr.text,
                      past_endbr64=bool(offset) and addr.offset is None, span=addr.span,
                      container=declared.container if declared else "",
                      path_in_container=declared.path if declared and declared.container else "",
                      record_type=(self.host.tracepoint_type(category, name) or "") if kind == "tracepoint" else "")
        if kind == "tracepoint" and fields is None and self.host.enabled and self.host.tracepoints is not None:
            fields = {}
        ctx = ProbeContext(ctx_kind, addr.text if addr.kind != "kernel" else f"{kind}:{addr.name}", fields,
                           has_fields, arg_count)
        build = ProbeBuild(probe, [], ctx)
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

    def context_for(self, build: ProbeBuild, duration: bool, ending: str = "", ending_key: IRExpr | None = None
                    ) -> ProbeContext:
        c = build.ctx
        return ProbeContext(c.kind, c.description, c.fields, c.has_fields, c.arg_count, duration, ending,
                            self.span_within, self.counted_within, c.notes, ending_key or TID, self.thread_spans)
