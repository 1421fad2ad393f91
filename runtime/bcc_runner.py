"""Runs a bcc bundle: BCC compiles its program at start against this host's kernel headers, then
every probe is attached (the first working variant of each group) or none. Reading the maps, the
health counters and the ring buffer is the core runner's, over the fds of the maps BCC made: the
two backends share one C, one manifest section and so one reader.

BCC's Python module: `import bcc` where it is importable; else Debian's python3-bpfcc, which
installs it for Debian's own Python only (/usr/lib/python3/dist-packages). It is pure Python over
ctypes (libbcc.so.0), so this runtime loads that one package from there (PROBEC_BCC_PATH names
another folder), without putting the rest of Debian's dist-packages on sys.path, where its
modules would shadow the ones this Python has installed. Running the program under Debian's
Python instead would need the probec runtime installed there too.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import struct
import sys
import time
from pathlib import Path

from ..host.headers import KernelHeaders, find_kernel_headers, joined_tree
from .core_attach import _destroy, attach_hint
from .core_mechanisms import Mechanisms, choose
from .core_preflight import check_tracepoint_fields, check_uprobe_placement
from .core_runner import CoreRunner
from .manifest import BundleError, CoreProgram, ProbeInfo

BCC_DIST_PACKAGES = "/usr/lib/python3/dist-packages"
HEADER_TREES = Path(os.environ.get("PROBEC_CACHE", "/var/cache/probec")) / "bcc-headers"
PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_CLOCK = 1, 0
TARGET_MAP = "probec_target"       # the program's one-slot array: the pid traced, 0 for all


def bcc_mechanisms(manifest) -> Mechanisms:
    """What a bcc program uses. Events: the ring buffer where the kernel has one (and
    $PROBEC_PRETEND_MISSING does not take it away), else the perf buffer (kernels before 5.8),
    chosen as BCC compiles the program (-Dprobec_use_ringbuf=0 declares the perf buffer instead of
    the ring), probed as core probes it. Fixed (no BTF): the HASH for span begin times (no task
    storage), bpf_get_current_task. Atomic fetch-and-add where the kernel has it, else compiled
    out (-Dprobec_use_atomic_fetch=0: the add then the read, before 5.12)."""
    chosen = choose(manifest)
    return Mechanisms(ring_buffer=chosen.ring_buffer, task_storage=False, task_btf=False,
                      atomic_fetch=chosen.atomic_fetch)


def import_bcc():
    """BCC's Python module (see the module's docstring for where it comes from)."""
    if "bcc" in sys.modules:
        return sys.modules["bcc"]
    try:
        import bcc  # noqa: F401
        return sys.modules["bcc"]
    except ImportError:
        pass
    folder = Path(os.environ.get("PROBEC_BCC_PATH") or BCC_DIST_PACKAGES) / "bcc"
    init = folder / "__init__.py"
    if not init.is_file():
        raise BundleError(f"BCC's Python module is not installed ({folder} has none): install it (Debian: "
                          "apt-get install python3-bpfcc), set PROBEC_BCC_PATH to the folder that holds bcc/, "
                          "or build the bundle for the core backend")
    spec = importlib.util.spec_from_file_location("bcc", init, submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["bcc"] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules["bcc"]
        raise BundleError(f"BCC's Python module in {folder} does not load here: {exc}") from None
    return module


def program_text(path: Path) -> str:
    """The C of a bcc bundle's program: its PROGRAM string, read without running the file."""
    try:
        tree = ast.parse(path.read_text(), str(path))
    except (OSError, SyntaxError, ValueError) as exc:
        raise BundleError(f"cannot read the bcc program {path}: {exc}; rebuild the bundle") from None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "PROGRAM" for t in node.targets):
            value = node.value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                return value.value
    raise BundleError(f"{path} has no PROGRAM string; rebuild the bundle")


class BccLink:
    """One attachment BCC made, detached through BCC."""

    def __init__(self, detach):
        self.detach = detach

    def destroy(self) -> None:
        detach, self.detach = self.detach, None
        if detach is not None:
            detach()


def usdt_link(bpf, ctx, attach: bool = False) -> BccLink:
    """The uprobes of one USDT context (BCC attached them as it compiled the program, or they are
    attached here), detached together by their event names (found while the process lives: BCC's
    detach_uprobe looks the process up again)."""
    places = ctx.enumerate_active_probes()      # (path, program, address, pid)
    names = []
    try:
        for path, fn, addr, pid in places:
            if attach:
                bpf.attach_uprobe(name=path, fn_name=fn, addr=addr, pid=pid)
            names.append(bpf._get_uprobe_evname(b"p", *bpf._check_path_symbol(path, b"", addr, pid), pid))
    except Exception as exc:
        _detach_events(bpf, names)
        raise BundleError(f"cannot attach the USDT probe for process {places[0][3] if places else '?'}: "
                          f"{exc}") from None
    return BccLink(lambda: _detach_events(bpf, names))


def _detach_events(bpf, names: list[bytes]) -> None:
    for name in names:
        if name in bpf.uprobe_fds:
            bpf.detach_uprobe_event(name)


class BccObject:
    """What the core runner reads from a loaded object, over a BCC `BPF`: maps by name (as FdMaps)
    and program fds by name."""

    def __init__(self, bpf):
        from . import libbpf
        self.bpf = bpf
        self.libbpf = libbpf
        self.maps: dict[str, object] = {}

    def map(self, name: str):
        if name not in self.maps:
            self.maps[name] = self.libbpf.FdMap(self.bpf.get_table(name.encode()).map_fd, name)
        return self.maps[name]

    def program(self, name: str) -> int:
        fn = self.bpf.funcs.get(name.encode())
        if fn is None:
            raise self.libbpf.BpfError(f"program {name} is not loaded")
        return fn.fd

    def close(self) -> None:
        bpf, self.bpf = self.bpf, None
        if bpf is not None:
            bpf.cleanup()


class BccRunner(CoreRunner):
    def __init__(self, bundle, store, sink, log=print, pid: int = -1, bpf_stats: bool | None = None):
        super().__init__(bundle, store, sink, log=log, pid=pid, bpf_stats=bpf_stats)
        if self.manifest.bcc is None:
            raise BundleError(f"{bundle.path} has no 'bcc' section in its manifest: rebuild it with "
                              "'probec build SPEC --backend bcc'")
        self.compile_seconds = 0.0
        self.events_made = 0
        self.bcc = None
        self.headers: KernelHeaders | None = None
        self.usdt: dict[str, object] = {}       # probe id -> its BCC USDT context (for the target pid)

    def object_path(self) -> Path:
        return self.bundle.file("program")

    # -- start ---------------------------------------------------------------------------------
    def check_headers(self) -> KernelHeaders:
        headers = find_kernel_headers()
        if headers is None:
            raise BundleError("BCC compiles the bundle at start and finds no kernel headers: install the headers "
                              f"of {os.uname().release} (Debian: linux-headers-$(uname -r)) or set BCC_KERNEL_SOURCE")
        reads = self.manifest.bcc.kernel_struct_reads
        if not headers.matches:
            if reads:
                raise BundleError(f"{', '.join(reads)} read kernel structs (socket(fd)), and {headers.mismatch()}; "
                                  "nothing is attached")
            self.log(f"warning: {headers.mismatch()}; this bundle reads no kernel structs, so it runs")
        return headers

    def start(self) -> None:
        check_tracepoint_fields(self.core.tracepoint_fields)
        check_uprobe_placement(self.probes.values())
        self.headers = self.check_headers()
        text = program_text(self.object_path())
        if f" {TARGET_MAP}, 1);" not in text:
            raise BundleError(f"{self.object_path()} was built by an earlier probec (its program has no {TARGET_MAP} "
                              "map); rebuild the bundle with this probec")
        # health and the start line say what BCC uses
        self.attacher.mechanisms = mech = bcc_mechanisms(self.manifest)
        self.bcc = bcc = import_bcc()
        if "BCC_KERNEL_SOURCE" not in os.environ and not self.headers.found_by_bcc:
            try:
                tree = joined_tree(self.headers, HEADER_TREES)
            except OSError as exc:
                raise BundleError(f"cannot join the kernel headers for BCC under {HEADER_TREES}: {exc}; "
                                  "set PROBEC_CACHE to a writable folder") from None
            os.environ["BCC_KERNEL_SOURCE"] = str(tree)
        # with a target, the probes read its pid from TARGET_MAP (retarget() writes a new one there);
        # without, the test is compiled out
        cflags = [] if self.pid > 0 else ["-Dprobec_target_pid=0"]
        if not mech.ring_buffer:
            cflags.append("-Dprobec_use_ringbuf=0")
        if not mech.atomic_fetch:       # before 5.12: the fetch is compiled out (add then read)
            cflags.append("-Dprobec_use_atomic_fetch=0")
        self.usdt = usdt = self.usdt_contexts(bcc, self.pid)
        started = time.monotonic()
        try:
            bpf = bcc.BPF(text=text.encode(), cflags=cflags, usdt_contexts=list(usdt.values()))
        except Exception as exc:
            raise BundleError(f"BCC could not compile {self.object_path().name} against the kernel headers in "
                              f"{os.environ.get('BCC_KERNEL_SOURCE') or self.headers.build}: {exc} (its messages "
                              "are above)") from None
        self.obj = BccObject(bpf)
        try:
            if self.pid > 0:
                self.write_target(self.pid)
            self.links, self.active = self.attach_all(bcc, usdt)
            self.compile_seconds = time.monotonic() - started
        except BaseException:
            self.obj.close()
            self.obj = None
            raise
        self.log(f"BCC compiled and attached the program in {self.compile_seconds:.2f} s")
        self.after_attach()

    def write_target(self, pid: int) -> None:
        self.obj.map(TARGET_MAP).update(struct.pack("<I", 0), struct.pack("<I", max(pid, 0)))

    def usdt_contexts(self, bcc, pid: int) -> dict[str, object]:
        """One BCC USDT context per USDT probe, made before the program is compiled (BCC writes each
        probe's argument readers into it), for the process `pid` (or every process)."""
        return {p.probe: self.usdt_context(bcc, self.probes[p.probe], p.program, pid)
                for p in self.core.programs if self.probes[p.probe].kind == "usdt"}

    @staticmethod
    def usdt_context(bcc, probe: ProbeInfo, program: str, pid: int):
        try:
            # BCC's USDT takes str (it encodes them as ASCII; check refuses other paths)
            path = probe.binary
            ctx = bcc.USDT(path=path, pid=pid) if pid > 0 else bcc.USDT(path=path)
            ctx.enable_probe(probe=f"{probe.provider}:{probe.name}", fn_name=program)
        except Exception as exc:
            raise BundleError(f"probe '{probe.address or probe.id}' cannot be enabled: {exc}; "
                              f"{attach_hint('usdt', None)}") from None
        return ctx

    def attach_all(self, bcc, usdt: dict) -> tuple[dict, list[CoreProgram]]:
        """Every probe attached, with the first working variant of each group, or none."""
        links: dict[str, BccLink] = {}
        active: list[CoreProgram] = []
        by_group: dict[str, dict[int, list[CoreProgram]]] = {}
        for p in self.core.programs:
            probe = self.probes[p.probe]
            if probe.group:
                by_group.setdefault(probe.group, {}).setdefault(probe.variant, []).append(p)
        done: set[str] = set()
        try:
            for p in self.core.programs:
                probe = self.probes[p.probe]
                if probe.id in usdt:         # BCC attached it when it compiled the program
                    links[probe.id] = usdt_link(self.obj.bpf, usdt[probe.id])
                    active.append(p)
                    continue
                if not probe.group:
                    links[probe.id] = self.attach(bcc, p.program, probe)
                    active.append(p)
                    continue
                if probe.group in done:
                    continue
                done.add(probe.group)
                labels = self.manifest.groups.get(probe.group, ())
                # variants the program has none for (fentry/fexit: BTF), said as core says a fallback
                tried = [f"{label} (needs kernel BTF, which bcc does not use)"
                         for label in labels[:min(by_group[probe.group])]]
                for variant, programs in sorted(by_group[probe.group].items()):
                    made: dict[str, BccLink] = {}
                    try:
                        for q in programs:
                            made[q.probe] = self.attach(bcc, q.program, self.probes[q.probe])
                    except BundleError as exc:
                        for link in made.values():
                            _destroy(link)
                        tried.append(str(exc))
                        continue
                    links.update(made)
                    active.extend(programs)
                    if tried:       # as core says it (tests and the kernel matrix read which one ran)
                        label = labels[variant] if variant < len(labels) else f"variant {variant}"
                        self.log(f"{probe.group}: using {label} on this kernel (not {'; '.join(tried)})")
                    break
                else:
                    raise BundleError(f"no variant of {probe.group} works on this kernel (tried {'; '.join(tried)})")
        except BaseException:
            for link in reversed(list(links.values())):
                _destroy(link)
            raise
        return links, active

    def attach(self, bcc, program: str, probe: ProbeInfo, pid: int | None = None) -> BccLink:
        b = self.obj.bpf
        kind = probe.kind
        fn = program.encode()          # BCC takes names as bytes (str is deprecated there)
        pid = self.pid if pid is None else pid
        pid = pid if pid > 0 else -1
        try:
            if kind == "tracepoint":
                tp = f"{probe.category}:{probe.name}".encode()
                b.attach_tracepoint(tp=tp, fn_name=fn)
                return BccLink(lambda: b.detach_tracepoint(tp=tp))
            if kind in ("uprobe", "uretprobe"):
                return self.attach_uprobe(bcc, program, probe, pid)
            if kind in ("kprobe", "kretprobe"):
                attach = b.attach_kprobe if kind == "kprobe" else b.attach_kretprobe
                detach = b.detach_kprobe if kind == "kprobe" else b.detach_kretprobe
                attach(event=probe.name.encode(), fn_name=fn)
                return BccLink(lambda: detach(event=probe.name.encode()))
            if kind in ("profile", "interval"):
                if kind == "profile":
                    b.attach_perf_event(ev_type=PERF_TYPE_SOFTWARE, ev_config=PERF_COUNT_SW_CPU_CLOCK,
                                        fn_name=fn, sample_freq=probe.rate)
                else:   # once a period on one CPU, as bpftrace and the core backend do
                    from .libbpf import online_cpus
                    b.attach_perf_event(ev_type=PERF_TYPE_SOFTWARE, ev_config=PERF_COUNT_SW_CPU_CLOCK,
                                        fn_name=fn, sample_period=probe.rate, cpu=online_cpus()[0])
                return BccLink(lambda: b.detach_perf_event(ev_type=PERF_TYPE_SOFTWARE,
                                                           ev_config=PERF_COUNT_SW_CPU_CLOCK))
        except Exception as exc:
            err = getattr(exc, "errno", None)
            raise BundleError(f"probe '{probe.address or probe.id}' (program {program}) failed to load or attach: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                              f"{attach_hint(kind, err)}") from None
        raise BundleError(f"manifest names a probe kind the bcc runtime cannot attach: {kind}")

    def attach_uprobe(self, bcc, program: str, probe: ProbeInfo, pid: int) -> BccLink:
        """BCC's attach_uprobe names the event by path and address, so a second program on one
        function fails; each attachment here gets a name of its own (as libbpf's do)."""
        path, addr = bcc.BPF._check_path_symbol(probe.binary.encode(), probe.symbol.encode(), None, pid,
                                                probe.offset)
        fn = self.obj.bpf.load_func(program.encode(), bcc.BPF.KPROBE)
        self.events_made += 1
        event = f"probec_{os.getpid()}_{self.events_made}".encode()
        fd = bcc.lib.bpf_attach_uprobe(fn.fd, 1 if probe.kind == "uretprobe" else 0, event, path, addr, pid)
        if fd < 0:
            raise OSError(-fd if fd < -1 else 0, f"cannot attach {program} to {probe.binary}")

        def detach():
            bcc.lib.bpf_close_perf_event_fd(fd)
            bcc.lib.bpf_detach_uprobe(event)     # a uprobe_events entry, where BCC had to make one
        return BccLink(detach)

    # -- following changes ---------------------------------------------------------------------
    def reattach(self, path: str, old) -> list[str]:
        """`path` is a new file (a deploy replaced it): its probes are attached to it too (each
        attachment has an event name of its own). The links on the old inode stay while processes
        still run the old file (the core runner's poll() takes them off after the last one)."""
        new: dict[str, BccLink] = {}
        try:
            for p in self.active:
                probe = self.probes[p.probe]
                if probe.binary == path and probe.kind in ("uprobe", "uretprobe"):
                    new[probe.id] = self.attach(self.bcc, p.program, probe)
        except BaseException:
            for link in new.values():
                _destroy(link)
            for p in self.active:        # still on the old file only: new processes are not counted
                if self.probes[p.probe].binary == path:
                    self.store.health.attached[p.probe] = 0
            raise
        return self.take_new_links(new, old)

    def retarget(self, pid: int) -> None:
        """Follow another process (--pid-file) without compiling again: the uprobes and USDT probes,
        which the kernel fires for the old process only, are attached for the new one, then its pid
        goes into TARGET_MAP (which every probe tests), and only then are the old attachments taken
        off. The maps, and so the counts, go on."""
        new: dict[str, BccLink] = {}
        contexts: dict[str, object] = {}
        try:
            for p in self.active:
                probe = self.probes[p.probe]
                if probe.kind in ("uprobe", "uretprobe"):
                    new[probe.id] = self.attach(self.bcc, p.program, probe, pid)
                elif probe.kind == "usdt":
                    ctx = self.usdt_context(self.bcc, probe, p.program, pid)
                    new[probe.id] = usdt_link(self.obj.bpf, ctx, attach=True)
                    contexts[probe.id] = ctx
        except BaseException:
            for link in new.values():
                _destroy(link)
            raise
        self.attacher.pid = pid if pid > 0 else -1
        self.write_target(pid)
        for link in [self.links[i] for i in new if i in self.links] + [link for _, link in self.retired]:
            _destroy(link)           # the old process's (and those on files it ran before a deploy)
        self.links.update(new)
        self.usdt.update(contexts)
        self.retired = []
