"""Attaching a core bundle's programs: the first working variant of every group, every probe or
none, again on a binary replaced on disk, and the whole object again for another process."""

from __future__ import annotations

import collections
import errno
import re
from pathlib import Path

from .core_preflight import check_uprobe_placement
from .core_mechanisms import PRETEND_ENV, Mechanisms, choose, pretended_missing, rewrite_atomic_fetch, shape_maps
from .manifest import BundleError, CoreProgram, Manifest, ProbeInfo, TracepointCheck

_PROG_IN_LOG = re.compile(r"prog '([^']+)'")
KERNEL_BTF = Path("/sys/kernel/btf/vmlinux")


def _libbpf():
    from . import libbpf
    return libbpf


# --- what this kernel can do (for messages) ------------------------------------------------------
def kernel_alternatives() -> str:
    from ..host.features import kprobes_available, probe_fentry
    works = ["tracepoints (tracepoint:, syscall:)", "uprobes", "USDT"]
    if kprobes_available():
        works.append("kprobes")
    if probe_fentry():
        works.append("fentry/fexit")
    return "what attaches on this kernel: " + ", ".join(works)


def attach_hint(kind: str, err: int | None) -> str:
    from ..host.features import kprobes_available
    if kind in ("kprobe", "kretprobe") and not kprobes_available():
        why = "this kernel has no kprobes (CONFIG_KPROBES off)"
    elif kind in ("fentry", "fexit"):
        why = "this kernel refuses BPF function tracing (fentry/fexit)" if err == errno.EPERM else \
            "the kernel function may be missing or not traceable"
    elif kind in ("uprobe", "uretprobe", "usdt") and err == errno.ENOENT:
        why = "the binary, symbol or USDT note is not where the bundle says: rebuild the bundle against " \
              "this host's binary"
    elif kind == "tracepoint" and err == errno.ENOENT:
        why = "this kernel has no such tracepoint (or tracefs is not mounted)"
    elif err == errno.EPERM or err == errno.EACCES:
        from ..host.capabilities import run_privileges
        why = f"not permitted: this needs {', '.join(run_privileges({kind}).needed)} ('probec doctor' lists them)"
    else:
        why = "the kernel refused it"
    return f"{why}; {kernel_alternatives()}"


# How each probe kind is attached: (program, probe, pid to trace or -1) -> link. The kinds are
# compiler/kinds.py's (tests/test_kinds.py checks that every one is here); the runtime keeps its
# own table because it never imports the compiler.
ATTACH = {
    "tracepoint": lambda prog, p, pid: prog.attach_tracepoint(p.category, p.name),
    "uprobe": lambda prog, p, pid: prog.attach_uprobe(p.binary, p.symbol, p.offset, retprobe=False, pid=pid),
    "uretprobe": lambda prog, p, pid: prog.attach_uprobe(p.binary, p.symbol, p.offset, retprobe=True, pid=pid),
    "usdt": lambda prog, p, pid: prog.attach_usdt(p.binary, p.provider, p.name, pid=pid),
    "kprobe": lambda prog, p, pid: prog.attach_kprobe(p.name, retprobe=False),
    "kretprobe": lambda prog, p, pid: prog.attach_kprobe(p.name, retprobe=True),
    "fentry": lambda prog, p, pid: prog.attach(),
    "fexit": lambda prog, p, pid: prog.attach(),
    "profile": lambda prog, p, pid: prog.attach_cpu_clock(p.rate),
    "interval": lambda prog, p, pid: prog.attach_interval(p.rate),
}


class ProbeAttacher:
    """Loads a core bundle's object and attaches its programs, as its manifest says."""

    def __init__(self, manifest: Manifest, log=print, pid: int = -1, btf_path: str | None = None,
                 cgroup_filter: bool = False):
        self.manifest = manifest
        self.core = manifest.core
        self.probes = {p.id: p for p in manifest.probes}
        self.log = log
        self.pid = pid
        self.cgroup_filter = cgroup_filter     # --cgroup: only tasks whose cgroup the runtime marked
        self.btf_path = btf_path               # CO-RE against this BTF instead of the kernel's
        self.mechanisms: Mechanisms | None = None   # chosen at the first load
        self.variants: dict[str, str] = {}           # group -> the label of the variant attached
        # programs that attach to a tracepoint's typed raw form (tp_btf/ sections)
        self.typed = {p.program for p in self.core.programs if p.section.startswith("tp_btf/")}

    def settings(self) -> list[tuple[str, bytes]]:
        chosen = self.mechanisms.settings() if self.mechanisms else {}
        out = []
        for s in self.core.settings:
            value = chosen.get(s.name, s.value)
            if s.name == "probec_target_pid" and self.pid > 0:
                value = self.pid
            elif s.name == "probec_filter_cgroup":
                value = int(self.cgroup_filter)
            out.append((s.name, int(value).to_bytes(s.size, "little")))
        return out

    def open(self, path: Path):
        """The object opened and configured for this kernel (settings, mechanisms' maps), not loaded."""
        L = _libbpf()
        if self.mechanisms is None:
            self.mechanisms = choose(self.manifest)
        obj = L.BpfObject.open(path, self.btf_path)
        try:
            for name, value in self.settings():
                try:
                    obj.set_rodata(name, value)
                except (KeyError, ValueError) as exc:
                    raise BundleError(f"{path.name} does not match its manifest ({exc}); rebuild the bundle") from None
            shape_maps(obj, self.manifest, self.mechanisms)
            rewrite_atomic_fetch(obj, self.manifest, self.mechanisms)
        except BaseException:
            obj.close()
            raise
        return obj

    def groups(self) -> dict[str, list[int]]:
        out: dict[str, set[int]] = {}
        for p in self.probes.values():
            if p.group:
                out.setdefault(p.group, set()).add(p.variant)
        return {g: sorted(v) for g, v in out.items()}

    def load_and_attach(self, path: Path):
        """Load with the first working variant of every group and attach all probes, or nothing.

        A variant is skipped when one of its programs fails to load or attach; any other failure
        detaches what was attached and raises a BpfError naming the probe, why, and what works.
        """
        L = _libbpf()
        groups = self.groups()
        chosen = {g: vs[0] for g, vs in groups.items()}
        tried: dict[str, list[str]] = collections.defaultdict(list)
        programs = self.core.programs

        def label(group: str, variant: int) -> str:
            labels = self.manifest.groups.get(group, ())
            return labels[variant] if variant < len(labels) else f"variant {variant}"

        def skip(group: str, probe: ProbeInfo, stage: str, exc) -> None:
            passed_over(group, probe, f"{stage} of {probe.address or probe.id}: {_short(exc)}",
                        getattr(exc, "errno", None))

        def passed_over(group: str, probe: ProbeInfo, why: str, err: int | None) -> None:
            tried[group].append(f"{label(group, chosen[group])} ({why})")
            rest = [v for v in groups[group] if v > chosen[group]]
            if not rest:
                raise L.BpfError(
                    f"no variant of {group} works on this kernel (tried {'; '.join(tried[group])})",
                    err, [], f"{attach_hint(probe.kind, err)}; add a 'fallback' to the span")
            chosen[group] = rest[0]

        if "fentry" in pretended_missing():
            # As on a kernel that refuses fentry/fexit: the variants that need them are passed
            # over (and said so), and a probe that needs them outside a group does not load.
            for p in programs:
                probe = self.probes[p.probe]
                if probe.kind not in ("fentry", "fexit"):
                    continue
                if not probe.group:
                    raise L.BpfError(f"probe '{probe.address or probe.id}' (program {p.program}) needs "
                                     f"fentry/fexit, which {PRETEND_ENV}=fentry takes away; nothing is attached",
                                     None, [], kernel_alternatives())
                if chosen[probe.group] == probe.variant:
                    passed_over(probe.group, probe, f"not tried: {PRETEND_ENV}=fentry", None)

        # tp_btf needs the kernel's own BTF (and libbpf, missing it, fails the whole object, not the
        # program): without it, or as asked, the tp_btf variants are passed over for the classic ones
        no_typed = f"not tried: {PRETEND_ENV}=tp_btf" if "tp_btf" in pretended_missing() else \
            "not tried: no kernel BTF" if not KERNEL_BTF.exists() else ""
        for p in programs:
            probe = self.probes[p.probe]
            if no_typed and p.program in self.typed and chosen[probe.group] == probe.variant:
                passed_over(probe.group, probe, no_typed, None)

        while True:
            active = [p for p in programs
                      if not self.probes[p.probe].group
                      or chosen[self.probes[p.probe].group] == self.probes[p.probe].variant]
            obj = self.open(path)
            links: dict[str, object] = {}
            try:
                names = {p.program for p in active}
                for p in programs:
                    obj.set_autoload(p.program, p.program in names)
                try:
                    obj.load()
                except L.BpfError as exc:
                    blamed = next((n for n in _PROG_IN_LOG.findall("\n".join(exc.log)) if n in names), None)
                    probe = next((self.probes[p.probe] for p in active if p.program == blamed), None)
                    relocation = failed_relocation(exc.log, self.core.tracepoint_fields, blamed)
                    if relocation:
                        raise BundleError(relocation) from None
                    if probe is not None and probe.group:
                        skip(probe.group, probe, "load", exc)
                        obj.close()
                        continue
                    where = f"probe '{probe.address or probe.id}' (program {blamed})" if probe else path.name
                    raise L.BpfError(f"{where} failed to load; nothing is attached", exc.errno, _useful(exc.log),
                                     attach_hint(probe.kind, exc.errno) if probe else exc.hint) from None
                retry = False
                for p in active:
                    probe = self.probes[p.probe]
                    try:
                        links[probe.id] = self.attach(obj, p.program, probe)
                    except L.BpfError as exc:
                        for link in reversed(list(links.values())):
                            _destroy(link)
                        links = {}
                        if probe.group:
                            skip(probe.group, probe, "attach", exc)
                            retry = True
                            break
                        raise L.BpfError(
                            f"probe '{probe.address or probe.id}' (program {p.program}) failed to attach; "
                            "nothing is left attached", exc.errno, _useful(exc.log),
                            attach_hint(probe.kind, exc.errno)) from None
                if retry:
                    obj.close()
                    continue
                self.variants = {group: label(group, variant) for group, variant in chosen.items()}
                for group, variant in sorted(chosen.items()):
                    if variant != groups[group][0]:
                        self.log(f"{group}: using {label(group, variant)} on this kernel "
                                 f"(not {'; '.join(tried[group])})")
                return obj, links, active
            except BaseException:
                for link in links.values():
                    _destroy(link)
                obj.close()
                raise

    def attach(self, obj, program: str, probe: ProbeInfo):
        if program in self.typed:       # the tracepoint's raw form: libbpf finds it from the section
            return obj.program(program).attach()
        how = ATTACH.get(probe.kind)
        if how is None:
            raise BundleError(f"manifest names a probe kind this runtime cannot attach: {probe.kind}")
        return how(obj.program(program), probe, self.pid)

    def attach_to_new_file(self, obj, active: list[CoreProgram], path: str) -> dict[str, object]:
        """Links of the probes of `active` that sit in the binary at `path`, attached to the file
        now there; nothing stays attached when one fails."""
        mine = [(p, self.probes[p.probe]) for p in active
                if self.probes[p.probe].binary == path
                and self.probes[p.probe].kind in ("uprobe", "uretprobe", "usdt")]
        new: dict[str, object] = {}
        try:
            check_uprobe_placement([probe for _, probe in mine])
            for p, probe in mine:
                new[probe.id] = self.attach(obj, p.program, probe)
        except BaseException:
            for link in new.values():
                _destroy(link)
            raise
        return new

    def probes_in(self, active: list[CoreProgram], path: str) -> list[str]:
        return [p.probe for p in active if self.probes[p.probe].binary == path
                and self.probes[p.probe].kind in ("uprobe", "uretprobe", "usdt")]

    def reload(self, path: Path, old_obj, active: list[CoreProgram]):
        """The object loaded again with this attacher's settings, reusing every map of `old_obj`
        (the counts go on where they were), and `active`'s programs attached: (obj, links)."""
        obj = self.open(path)
        links: dict[str, object] = {}
        try:
            names = {p.program for p in active}
            for p in self.core.programs:
                obj.set_autoload(p.program, p.program in names)
            for name, bmap in obj.maps.items():
                if ".rodata" not in name and ".kconfig" not in name:
                    bmap.reuse_fd(old_obj.map(name))
            obj.load()
            for p in active:
                probe = self.probes[p.probe]
                links[probe.id] = self.attach(obj, p.program, probe)
        except BaseException:
            for link in links.values():
                _destroy(link)
            obj.close()
            raise
        return obj, links


def _destroy(link) -> None:
    try:
        link.destroy()
    except Exception:
        pass


def _useful(log: list[str]) -> list[str]:
    """libbpf's log without its 'raise ulimit -l' advice, which is wrong on cgroup-charged kernels."""
    return [line for line in log if "ulimit -l" not in line]


def _short(exc) -> str:
    name = getattr(exc, "errno_name", None)
    return name or str(exc).split("\n", 1)[0]


# libbpf (0.8+) rewrites the verifier's complaint about an instruction it poisoned because a CO-RE
# relocation found no target in the kernel's BTF into:
#   failed to resolve CO-RE relocation <byte_off> [49] struct trace_event_raw_x___probec.comm (0:0 @ offset 0)
_RELO_FAILED = re.compile(r"failed to resolve CO-RE relocation <[^>]+> \[\d+\] (?:struct|union) "
                          r"([A-Za-z0-9_]+?)(?:___[A-Za-z0-9_]+)?\.([A-Za-z0-9_.\[\]]+)")


def failed_relocation(log: list[str], fields: tuple[TracepointCheck, ...], program: str | None) -> str:
    """The tracepoint field whose CO-RE relocation found nothing in this kernel's BTF, said in the
    spec's words, from libbpf's log of the failed load; "" when no relocation failed."""
    found = next((m for m in map(_RELO_FAILED.search, log) if m), None)
    if found is None:
        return ""
    struct, member = found.groups()
    field = next((c for c in fields if c.btf_type == struct and c.member == member
                  and (program is None or c.probe == program)), None)
    what = f"tracepoint {field.tracepoint} field '{field.field}'" if field else "a kernel type it reads"
    return (f"probe {program or '?'} reads {what} as {struct}.{member}, which this kernel's BTF does not "
            "have (its CO-RE relocation found no target); nothing is attached"
            "\n  help: this kernel's tracepoint differs from the build host's: rebuild the bundle for it; or, "
            "with --btf, pass this kernel's own BTF")
