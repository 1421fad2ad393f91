"""Runs a core bundle: loads its BPF object through libbpf, attaches every probe or none, reads the
maps into the MetricStore, drains the ring buffer into the event sink, and detaches on stop.

Everything it knows about the object comes from the bundle's manifest (`core` section, written by
the core backend from the same IR as the C): program names, settings, map layouts, health slots
and the tracepoint field offsets the C reads, which are checked against this kernel before load.
It never imports the compiler, clang or bpftool.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import re
import struct
import threading
import time
from pathlib import Path

from .events import EventSink
from .manifest import Bundle, BundleError
from .store import HistogramSeries, MetricStore
from ..host.tracefs import read_format, tracefs_root
from .watch import FileIdentity, inodes_mapped

MASK64 = (1 << 64) - 1
BPF_STATS_SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"
EVENT_POLL_MS = 50          # the reader drains the ring at least this often (the kernel wakes it
                            # only once a quarter of the ring is waiting)
_PROG_IN_LOG = re.compile(r"prog '([^']+)'")


def _libbpf():
    from . import libbpf
    return libbpf


def _signed64(value: int) -> int:
    value &= MASK64
    return value - (1 << 64) if value >> 63 else value


def _percpu_total(values) -> int:
    if isinstance(values, (bytes, bytearray)):
        return int.from_bytes(values[:8], "little")
    return sum(int.from_bytes(v[:8], "little") for v in values) & MASK64


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
        why = "not permitted: run as root (or with CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN)"
    else:
        why = "the kernel refused it"
    return f"{why}; {kernel_alternatives()}"


# --- tracepoint field offsets --------------------------------------------------------------------
def check_tracepoint_fields(checks: list[dict]) -> None:
    """The C reads tracepoint fields at offsets taken on the build host: make sure this kernel's
    tracefs still puts them there, or fail before anything is loaded."""
    if not checks:
        return
    root = tracefs_root()
    if root is None:
        raise BundleError("tracefs is not mounted, so the tracepoint field offsets this bundle reads cannot "
                          "be checked: mount -t tracefs nodev /sys/kernel/tracing")
    formats: dict[str, dict | None] = {}
    problems = []
    for c in checks:
        tp = c["tracepoint"]
        if tp not in formats:
            formats[tp] = read_format(root, *tp.split(":", 1))
        fmt = formats[tp]
        if fmt is None:
            problems.append(f"tracepoint {tp} does not exist on this kernel")
            continue
        here = fmt.get(c["field"])
        if here is None:
            problems.append(f"tracepoint {tp} has no field '{c['field']}' on this kernel")
        elif (here.offset, here.size) != (c["offset"], c["size"]):
            problems.append(f"tracepoint {tp} field '{c['field']}' is at offset {here.offset} size {here.size} on "
                            f"this kernel, but the bundle reads offset {c['offset']} size {c['size']}")
    if problems:
        raise BundleError("the bundle was built for another kernel's tracepoint layout:\n  "
                          + "\n  ".join(sorted(set(problems)))
                          + "\n  help: rebuild the bundle on this kernel (probec build --backend core)")


def check_uprobe_placement(probes) -> None:
    """A uprobe 4 bytes into a function was placed past its endbr64 at build time. If the binary
    changed and the function no longer starts with endbr64, +4 may be the middle of an
    instruction: refuse rather than corrupt the traced process."""
    from ..host import elf
    for p in probes:
        if p["kind"] not in ("uprobe", "uretprobe") or p["offset"] != 4:
            continue
        try:
            ok = elf.open_elf(p["binary"]).starts_with_endbr64(p["symbol"])
        except elf.ElfError:
            continue        # a missing binary or symbol fails at attach, with its own message
        if not ok:
            raise BundleError(f"probe '{p['address']}' sits 4 bytes into {p['symbol']}, past the endbr64 it "
                              f"started with when the bundle was built, but {p['binary']} has changed and "
                              "no longer starts with endbr64 there: rebuild the bundle against this binary")


# --- metrics -------------------------------------------------------------------------------------
class MetricReader:
    """Turns one metric's per-CPU map into a store snapshot."""

    def __init__(self, meta: dict, map_meta: dict, signed: bool):
        self.meta = meta
        self.name = meta["name"]
        self.map = meta["map"]
        self.overflow_map = meta.get("overflow_map")     # labelled metrics: the kernel's __overflow__
        self.folded_map = meta.get("folded_map")         # and the label sets folded into it
        self.histogram = meta["kind"] == "histogram"
        self.nb = len(meta["edges"]) + 1
        self.sum_slot = meta["sum_slot"]
        self.signed = signed
        self.labelled = bool(meta["labels"])
        self.label_fields = []
        self.bucket_at = None
        if self.labelled:
            fields = {f["label"]: f for f in map_meta["key"]["fields"] if f["label"]}
            for lab in meta["labels"]:
                f = fields.get(lab["name"])
                if f is None:
                    raise BundleError(f"manifest: metric '{self.name}' has label '{lab['name']}' but its key "
                                      "layout has no field for it")
                self.label_fields.append((f["offset"], f["size"], f["ctype"]))
            bucket = [f for f in map_meta["key"]["fields"] if f["name"] == "bucket"]
            if self.histogram:
                if not bucket:
                    raise BundleError(f"manifest: histogram '{self.name}' has no bucket in its key layout")
                self.bucket_at = bucket[0]["offset"]

    def total(self, values) -> int:
        raw = _percpu_total(values)
        return _signed64(raw) if self.signed else raw

    def labels(self, key: bytes) -> tuple:
        out = []
        for offset, size, ctype in self.label_fields:
            raw = key[offset:offset + size]
            if ctype == "char":
                out.append(raw.split(b"\0", 1)[0].decode("utf-8", "replace"))
            else:
                out.append(int.from_bytes(raw, "little", signed=ctype.startswith("__s")))
        return tuple(out)

    def decode(self, items) -> dict:
        if not self.labelled:
            slots = {int.from_bytes(k[:4], "little"): v for k, v in items}
            if not self.histogram:
                value = self.total(slots[0]) if 0 in slots else 0
                return {(): value} if value else {}
            buckets = [_percpu_total(slots[i]) if i in slots else 0 for i in range(self.nb)]
            total = self.total(slots[self.sum_slot]) if self.sum_slot in slots else 0
            return {(): HistogramSeries(buckets, total)} if any(buckets) else {}
        out: dict[tuple, object] = {}
        for key, values in items:
            labels = self.labels(key)
            if not self.histogram:
                out[labels] = self.total(values)
                continue
            bucket = int.from_bytes(key[self.bucket_at:self.bucket_at + 4], "little")
            series = out.get(labels)
            if series is None:
                series = out[labels] = HistogramSeries([0] * self.nb)
            if bucket == self.sum_slot:
                series.sum = self.total(values)
            elif bucket < self.nb:
                series.buckets[bucket] += _percpu_total(values)
        return out

    def decode_overflow(self, items):
        """The kernel's __overflow__ series, from its per-CPU array (None while it is empty): the
        same slots as an unlabelled metric's map."""
        slots = {int.from_bytes(k[:4], "little"): v for k, v in items}
        if not self.histogram:
            value = self.total(slots[0]) if 0 in slots else 0
            return value or None
        buckets = [_percpu_total(slots[i]) if i in slots else 0 for i in range(self.nb)]
        if not any(buckets):
            return None
        return HistogramSeries(buckets, self.total(slots[self.sum_slot]) if self.sum_slot in slots else 0)


# --- events --------------------------------------------------------------------------------------
class EventDecoder:
    """Ring-buffer records of one event -> the JSON-lines shape of the bpftrace runner."""

    def __init__(self, meta: dict):
        self.meta = meta
        record = meta["record"]
        self.size = record["size"]
        self.struct = struct.Struct(record["format"])
        names = [f["name"] for f in record["fields"] if not f["name"].startswith("__pad")]
        header = names[:5]
        if header != ["event", "cpu", "ts", "pid", "tid"]:
            raise BundleError(f"manifest: event '{meta['name']}' record does not start with the probec header")
        position = {n: i for i, n in enumerate(names) if i >= 5}
        self.fields = [(f, position[f["name"]]) for f in meta["fields"]]


class StackSymbols:
    """Stack ids from the stack-trace map -> symbolised frames, cached per pid."""

    def __init__(self, stack_map, depth: int):
        self.map = stack_map
        self.depth = depth
        self.recent: collections.OrderedDict[int, tuple[int, ...]] = collections.OrderedDict()
        self.users: collections.OrderedDict[int, object] = collections.OrderedDict()
        try:
            from . import symbolize
            self.symbolize = symbolize
        except Exception:  # symbolisation is optional: raw addresses still say something
            self.symbolize = None

    def addresses(self, stack_id: int) -> tuple[int, ...]:
        key = struct.pack("<I", stack_id & 0xFFFFFFFF)
        raw = self.map.lookup(key)
        if raw is not None:
            addrs = struct.unpack(f"<{len(raw) // 8}Q", raw[: len(raw) // 8 * 8])
            # Free the slot for other stacks; a later event with this id that was taken before
            # the delete finds it in `recent` (the kernel never rewrites an occupied slot).
            self.map.delete(key)
            self.recent[stack_id] = addrs
            while len(self.recent) > 4096:
                self.recent.popitem(last=False)
            return addrs
        return self.recent.get(stack_id, ())

    def user(self, pid: int):
        user = self.users.get(pid)
        if user is None:
            user = self.users[pid] = self.symbolize.UserSymbols(pid)
            while len(self.users) > 64:
                self.users.popitem(last=False)
        else:
            self.users.move_to_end(pid)
        return user

    def frames(self, stack_id: int, pid: int, kernel: bool) -> list[str]:
        if stack_id < 0:
            return []
        addrs = list(self.addresses(stack_id))
        while addrs and not addrs[-1]:
            addrs.pop()
        if self.symbolize is None:
            return [f"{a:#x}" for a in addrs]
        table = self.symbolize.KernelSymbols.shared() if kernel else self.user(pid)
        return [table.symbolize(a, return_address=i > 0) for i, a in enumerate(addrs)]


# --- the runner ----------------------------------------------------------------------------------
class CoreRunner:
    def __init__(self, bundle: Bundle, store: MetricStore, sink: EventSink | None, log=print, pid: int = -1,
                 bpf_stats: bool | None = None):
        self.bundle = bundle
        self.store = store
        self.sink = sink
        self.log = log
        self.pid = pid if pid and pid > 0 else -1
        self.manifest = bundle.manifest
        core = self.manifest.get("core")
        if not isinstance(core, dict):
            raise BundleError(f"{bundle.path} has no 'core' section in its manifest: rebuild it with "
                              "'probec build SPEC --backend core'")
        self.core = core
        self.failure: str | None = None
        self.bpf_stats = os.environ.get("PROBEC_BPF_STATS") == "1" if bpf_stats is None else bpf_stats
        try:
            self.probes = {p["id"]: p for p in self.manifest["probes"]}
            maps = {m["name"]: m for m in self.manifest["maps"]}
            signed = core.get("value_signed", {})
            self.readers = [MetricReader(m, maps[m["map"]], bool(signed.get(m["name"])))
                            for m in self.manifest["metrics"]]
            self.decoders = {e["index"]: EventDecoder(e) for e in self.manifest["events"]}
            missing = [key for key in ("programs", "health", "health_map", "settings") if key not in core]
            if missing:
                raise KeyError(missing[0])
        except (KeyError, TypeError, ValueError, struct.error) as exc:
            raise BundleError(f"{bundle.path}/manifest.json is damaged or from another probec version "
                              f"({type(exc).__name__}: {exc}); rebuild the bundle") from None
        self.obj = None
        self.links: dict[str, object] = {}
        # Links left on a binary's old inode after it was replaced on disk, kept while a process
        # still maps that inode (it keeps running the old code, and is counted): (dev, ino), link
        self.retired: list[tuple[tuple[int, int], object]] = []
        self.active: list[dict] = []
        self.stats_base: dict[str, tuple[int, int, int]] = {}   # program stats of objects retargeting replaced
        self.ring = None
        self.stacks: StackSymbols | None = None
        self.thread: threading.Thread | None = None
        self.events_stop = threading.Event()
        self.stats_fd: int | None = None
        self.stopped = False

    # -- start ---------------------------------------------------------------------------------
    def object_path(self) -> Path:
        name = self.core.get("object")
        if not name:
            raise BundleError(f"{self.bundle.path} holds the C source but no compiled object (it was built with "
                              "--no-compile or where clang was missing): rebuild it on a host with clang")
        path = self.bundle.path / name
        if not path.exists():
            raise BundleError(f"{self.bundle.path} is missing {name}; rebuild it with probec build --backend core")
        return path

    def start(self) -> None:
        path = self.object_path()
        libbpf_log = logging.getLogger("probec.libbpf")
        if not libbpf_log.handlers:
            # libbpf's lines reach the user inside the errors that need them (a fallback variant
            # failing to load is expected, not news)
            libbpf_log.addHandler(logging.NullHandler())
        check_tracepoint_fields(self.core.get("tracepoint_fields", []))
        check_uprobe_placement(self.probes.values())
        L = _libbpf()
        L.libbpf_version()   # a missing or old libbpf says so here, before anything else
        self.obj, self.links, self.active = self.load_and_attach(path)
        health = self.store.health
        health.attached = {pid: int(pid in self.links) for pid in self.probes}
        for m in self.manifest["maps"]:
            if m["type"] != "TASK_STORAGE":
                health.map_capacity[m["name"]] = m["max_entries"]
        hm = self.core["health_map"]
        health.map_capacity[hm["name"]] = hm["slots"]
        if self.bpf_stats:
            try:
                self.stats_fd = L.enable_stats()
            except L.BpfError as exc:
                self.log(f"warning: cannot turn on BPF run-time stats: {exc}")
        if self.core.get("stack_map"):
            self.stacks = StackSymbols(self.obj.map(self.core["stack_map"]), self.core.get("stack_depth", 127))
        ring = self.core.get("ringbuf")
        if ring:
            self.ring = L.RingBuffer(self.obj.map(ring["map"]), self.on_record)
            self.thread = threading.Thread(target=self.drain_events, name="probec-events", daemon=True)
            self.thread.start()
        self.read()
        health.up = 1

    def settings(self) -> list[tuple[str, bytes]]:
        out = []
        for s in self.core.get("settings", []):
            value = s["value"]
            if s["name"] == "probec_target_pid" and self.pid > 0:
                value = self.pid
            out.append((s["name"], int(value).to_bytes(s["size"], "little")))
        return out

    def groups(self) -> dict[str, list[int]]:
        out: dict[str, set[int]] = {}
        for p in self.probes.values():
            if p["group"]:
                out.setdefault(p["group"], set()).add(p["variant"])
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
        programs = self.core["programs"]

        def label(group: str, variant: int) -> str:
            labels = self.manifest.get("groups", {}).get(group, [])
            return labels[variant] if variant < len(labels) else f"variant {variant}"

        def skip(group: str, probe: dict, stage: str, exc) -> None:
            tried[group].append(f"{label(group, chosen[group])} ({stage} of {probe['address'] or probe['id']}: "
                                f"{_short(exc)})")
            rest = [v for v in groups[group] if v > chosen[group]]
            if not rest:
                raise L.BpfError(
                    f"no variant of {group} works on this kernel (tried {'; '.join(tried[group])})",
                    getattr(exc, "errno", None), [],
                    f"{attach_hint(probe['kind'], getattr(exc, 'errno', None))}; add a 'fallback' to the span")
            chosen[group] = rest[0]

        while True:
            active = [p for p in programs
                      if not self.probes[p["probe"]]["group"]
                      or chosen[self.probes[p["probe"]]["group"]] == self.probes[p["probe"]]["variant"]]
            obj = L.BpfObject.open(path)
            links: dict[str, object] = {}
            try:
                names = {p["program"] for p in active}
                for p in programs:
                    obj.set_autoload(p["program"], p["program"] in names)
                for name, value in self.settings():
                    try:
                        obj.set_rodata(name, value)
                    except (KeyError, ValueError) as exc:
                        raise BundleError(f"{path.name} does not match its manifest ({exc}); rebuild the bundle") from None
                try:
                    obj.load()
                except L.BpfError as exc:
                    blamed = next((n for n in _PROG_IN_LOG.findall("\n".join(exc.log)) if n in names), None)
                    probe = next((self.probes[p["probe"]] for p in active if p["program"] == blamed), None)
                    if probe is not None and probe["group"]:
                        skip(probe["group"], probe, "load", exc)
                        obj.close()
                        continue
                    where = f"probe '{probe['address'] or probe['id']}' (program {blamed})" if probe else path.name
                    raise L.BpfError(f"{where} failed to load; nothing is attached", exc.errno, _useful(exc.log),
                                     attach_hint(probe["kind"], exc.errno) if probe else exc.hint) from None
                retry = False
                for p in active:
                    probe = self.probes[p["probe"]]
                    try:
                        links[probe["id"]] = self.attach(obj, p["program"], probe)
                    except L.BpfError as exc:
                        for link in reversed(list(links.values())):
                            _destroy(link)
                        links = {}
                        if probe["group"]:
                            skip(probe["group"], probe, "attach", exc)
                            retry = True
                            break
                        raise L.BpfError(
                            f"probe '{probe['address'] or probe['id']}' (program {p['program']}) failed to attach; "
                            "nothing is left attached", exc.errno, _useful(exc.log),
                            attach_hint(probe["kind"], exc.errno)) from None
                if retry:
                    obj.close()
                    continue
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

    def attach(self, obj, program: str, probe: dict):
        prog = obj.program(program)
        kind = probe["kind"]
        if kind == "tracepoint":
            return prog.attach_tracepoint(probe["category"], probe["name"])
        if kind in ("uprobe", "uretprobe"):
            return prog.attach_uprobe(probe["binary"], probe["symbol"], probe["offset"],
                                      retprobe=kind == "uretprobe", pid=self.pid)
        if kind == "usdt":
            return prog.attach_usdt(probe["binary"], probe["provider"], probe["name"], pid=self.pid)
        if kind in ("kprobe", "kretprobe"):
            return prog.attach_kprobe(probe["name"], retprobe=kind == "kretprobe")
        if kind in ("fentry", "fexit"):
            return prog.attach()
        if kind == "profile":
            return prog.attach_cpu_clock(probe["rate"])
        if kind == "interval":
            return prog.attach_interval(probe["rate"])
        raise BundleError(f"manifest names a probe kind this runtime cannot attach: {kind}")

    # -- reading -------------------------------------------------------------------------------
    def read(self) -> None:
        """One read of every map into the store and the health counters."""
        if self.obj is None:
            return
        started = time.monotonic()
        health = self.store.health
        for reader in self.readers:
            bmap = self.obj.map(reader.map)
            items = bmap.items_batch()
            health.map_entries[reader.map] = len(items)
            overflow, folded = None, 0
            if reader.overflow_map:
                overflow = reader.decode_overflow(self.obj.map(reader.overflow_map).items_batch())
                folded = len(self.obj.map(reader.folded_map).items_batch())
                health.map_entries[reader.folded_map] = folded
            self.store.replace(reader.name, reader.decode(items), overflow, folded)
        for span in self.manifest["spans"]:
            if not span.get("task_storage"):   # task-local storage cannot be listed; it has no capacity
                health.map_entries[span["map"]] = len(self.obj.map(span["map"]).items_batch())
        if self.core.get("stack_map"):
            health.map_entries[self.core["stack_map"]] = self.obj.map(self.core["stack_map"]).count_entries()
        self.read_health()
        self.read_program_stats()
        health.last_read_seconds = time.monotonic() - started
        health.reads += 1
        self.store.remember()

    def read_health(self) -> None:
        hm = self.core["health_map"]
        items = self.obj.map(hm["name"]).items_batch()
        totals = {int.from_bytes(k[:4], "little"): _percpu_total(v) for k, v in items}
        health = self.store.health
        health.map_entries[hm["name"]] = hm["slots"]
        lost = full = 0
        for slot in self.core["health"]:
            value = totals.get(slot["slot"], 0)
            kind = slot["kind"]
            if kind == "span_overflow":
                health.span_overflows[slot["name"]] = value
            elif kind == "span_outside":
                health.span_outside[slot["name"]] = value
            elif kind == "events_lost":
                lost += value
            elif kind == "event_seen":
                health.events_emitted[slot["name"]] = value
            elif kind == "event_rate_limited":
                health.events_rate_limited[slot["name"]] = value
            elif kind == "metric_map_full":
                full += value
        health.events_lost = lost
        health.backend_errors = full

    def read_program_stats(self) -> None:
        """Runs the kernel skipped (always counted), and run counts and time (with BPF stats on)."""
        stats = self.stats_fd is not None or _stats_enabled()
        L = _libbpf()
        health = self.store.health
        for p in self.active:
            try:
                info = L.program_info(self.obj.program(p["program"]))
            except L.BpfError:
                continue
            # A program is skipped when another one runs on its CPU (a task preempted inside a
            # uprobe program, say): a span can lose its begin or its end.
            missed, runs, ns = self.stats_base.get(p["probe"], (0, 0, 0))
            health.program_missed[p["probe"]] = missed + info.recursion_misses
            if stats:
                health.program_run_ns[p["probe"]] = ns + info.run_time_ns
                health.program_runs[p["probe"]] = runs + info.run_cnt

    def poll(self) -> None:
        if self.stopped or self.obj is None or self.failure:
            return
        try:
            self.read()
        except Exception as exc:  # a map read that fails once will keep failing: stop with the reason
            self.failure = f"reading the maps failed: {exc}"
            return
        if self.retired:
            mapped = inodes_mapped({inode for inode, _ in self.retired})
            for inode, link in [r for r in self.retired if r[0] not in mapped]:
                _destroy(link)
            self.retired = [r for r in self.retired if r[0] in mapped]

    # -- following changes ---------------------------------------------------------------------
    def reattach(self, path: str, old: FileIdentity | None) -> list[str]:
        """`path` is a new file (a deploy replaced it): attach the programs of its probes to it too.
        The links on the old inode stay while processes still run the old file (see poll)."""
        mine = [(p, self.probes[p["probe"]]) for p in self.active
                if self.probes[p["probe"]]["binary"] == path
                and self.probes[p["probe"]]["kind"] in ("uprobe", "uretprobe", "usdt")]
        new: dict[str, object] = {}
        try:
            check_uprobe_placement([probe for _, probe in mine])
            for p, probe in mine:
                new[probe["id"]] = self.attach(self.obj, p["program"], probe)
        except BaseException:
            for link in new.values():
                _destroy(link)
            for _, probe in mine:      # still on the old file only: new processes are not counted
                self.store.health.attached[probe["id"]] = 0
            raise
        for probe_id, link in new.items():
            before = self.links.get(probe_id)
            if before is not None and old is not None:
                self.retired.append((old.inode, before))
            elif before is not None:
                _destroy(before)
            self.links[probe_id] = link
            self.store.health.attached[probe_id] = 1
        return sorted(new)

    def retarget(self, pid: int) -> None:
        """Follow another process (--pid-file): the pid is a setting frozen at load, so load the
        object again with the new one, reusing every map of the running object (the counts go on
        where they were), attach it, and only then detach and close the old one."""
        L = _libbpf()
        path = self.object_path()
        self.pid = pid if pid > 0 else -1
        obj = L.BpfObject.open(path)
        links: dict[str, object] = {}
        try:
            names = {p["program"] for p in self.active}
            for p in self.core["programs"]:
                obj.set_autoload(p["program"], p["program"] in names)
            for name, value in self.settings():
                obj.set_rodata(name, value)
            for name, bmap in obj.maps.items():
                if ".rodata" not in name and ".kconfig" not in name:
                    bmap.reuse_fd(self.obj.map(name))
            obj.load()
            for p in self.active:
                probe = self.probes[p["probe"]]
                links[probe["id"]] = self.attach(obj, p["program"], probe)
        except BaseException:
            for link in links.values():
                _destroy(link)
            obj.close()
            raise
        self.read_program_stats()       # the old programs' last counts become the base
        health = self.store.health
        self.stats_base = {p["probe"]: (health.program_missed.get(p["probe"], 0), health.program_runs.get(p["probe"], 0),
                                        health.program_run_ns.get(p["probe"], 0)) for p in self.active}
        old, self.obj = self.obj, obj
        for link in reversed(list(self.links.values()) + [link for _, link in self.retired]):
            _destroy(link)
        self.links, self.retired = links, []
        if self.ring is not None:        # the ring is the same map: hand it to a reader on the new object
            self.events_stop.set()
            if self.thread is not None:
                self.thread.join(5)
            self.ring.consume()
            self.ring.close()
            self.ring = L.RingBuffer(obj.map(self.core["ringbuf"]["map"]), self.on_record)
            self.events_stop.clear()
            self.thread = threading.Thread(target=self.drain_events, name="probec-events", daemon=True)
            self.thread.start()
        if self.stacks is not None:
            self.stacks.map = obj.map(self.core["stack_map"])
        old.close()

    # -- events --------------------------------------------------------------------------------
    def drain_events(self) -> None:
        try:
            while not self.events_stop.is_set():
                self.ring.poll(EVENT_POLL_MS)
                self.ring.consume()   # records that arrived without a wakeup
        except Exception as exc:
            self.failure = f"reading events failed: {exc}"

    def on_record(self, data: bytes) -> None:
        health = self.store.health
        try:
            decoder = self.decoders[int.from_bytes(data[:4], "little")]
            values = decoder.struct.unpack_from(data)
        except (KeyError, struct.error):
            health.decode_errors += 1
            return
        _event, cpu, ts, pid, tid = values[:5]
        record = {"event": decoder.meta["name"], "ts_ns": ts, "pid": pid, "tid": tid, "cpu": cpu}
        for f, at in decoder.fields:
            raw = values[at]
            kind = f["kind"]
            if kind.endswith("stack"):
                try:
                    record[f["name"]] = self.stacks.frames(raw, pid, kind == "kernelstack") if self.stacks else []
                except Exception:
                    health.decode_errors += 1
                    record[f["name"]] = []
            elif kind == "str":
                record[f["name"]] = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
            elif self.sink is not None:
                record[self.sink.field_name(f)] = self.sink.value(f, raw)
            else:
                record[f["name"]] = raw
        if self.sink is not None:
            self.sink.write(record)

    # -- stop ----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Detach everything, read the maps one last time, close. Safe to call twice."""
        if self.stopped:
            return
        self.stopped = True
        self.events_stop.set()
        if self.thread is not None:
            self.thread.join(5)
        for link in reversed(list(self.links.values()) + [link for _, link in self.retired]):
            _destroy(link)
        self.links, self.retired = {}, []
        if self.ring is not None:
            try:
                self.ring.consume()
            except Exception:
                pass
            self.ring.close()
            self.ring = None
        if self.obj is not None:
            try:
                self.read()
            except Exception as exc:
                self.log(f"warning: final map read failed: {exc}")
            self.obj.close()
            self.obj = None
        if self.stats_fd is not None:
            os.close(self.stats_fd)
            self.stats_fd = None
        self.store.health.up = 0


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


def _stats_enabled() -> bool:
    try:
        with open(BPF_STATS_SYSCTL) as f:
            return f.read().strip() == "1"
    except OSError:
        return False
