"""Runs a core bundle: loads its BPF object through libbpf, attaches every probe or none, reads the
maps into the MetricStore, drains the ring buffer into the event sink, and detaches on stop.

Everything it knows about the object comes from the bundle's manifest (`core` section, written by
the core backend from the same IR as the C): program names, settings, map layouts, health slots
and the tracepoint field offsets the C reads, which are checked against this kernel before load.
It never imports the compiler, clang or bpftool. The checks before load are in core_preflight.py,
loading and attaching in core_attach.py, and decoding maps and records in core_decode.py. Events are
read from the ring in bulk (libbpf.RingReader) and decoded and written in batches.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
import struct
import threading
import time
from pathlib import Path

from .core_attach import ProbeAttacher, _destroy, _libbpf
from .core_decode import EventDecoder, MetricReader, StackSymbols, _percpu_total, decode_block, decode_records
from .core_preflight import check_tracepoint_fields, check_uprobe_placement
from ..host.containers import container_processes, mapped_inode, resolve_in_root
from .cgroups import CgroupMap
from .events import EventOutput, EventSink
from .manifest import Bundle, BundleError, CoreProgram, HealthSlot, MapPurpose
from .store import MetricStore
from .watch import FileIdentity, inodes_mapped

BPF_STATS_SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"
EVENT_POLL_MS = 50          # the reader drains the ring at least this often (the kernel wakes it
                            # only once a quarter of the ring is waiting)
EVENT_READ_BYTES = 1 << 20  # at most this much of the ring is copied out and decoded at once


# --- the runner ----------------------------------------------------------------------------------
class CoreRunner:
    def __init__(self, bundle: Bundle, store: MetricStore, sink: EventOutput | EventSink | None, log=print,
                 pid: int = -1, bpf_stats: bool | None = None, btf_path: str | None = None,
                 cgroup_map: CgroupMap | None = None):
        self.bundle = bundle
        self.store = store
        self.sink = sink
        self.log = log
        self.manifest = bundle.manifest
        core = self.manifest.core
        if core is None:
            raise BundleError(f"{bundle.path} has no 'core' section in its manifest: rebuild it with "
                              "'probec build SPEC --backend core'")
        self.core = core
        if btf_path is not None and not os.path.isfile(btf_path):
            raise BundleError(f"--btf {btf_path}: no such file")
        self.cgroup_map = cgroup_map
        self.attacher = ProbeAttacher(self.manifest, log, pid if pid and pid > 0 else -1, btf_path,
                                      cgroup_filter=cgroup_map is not None and cgroup_map.path is not None)
        self.failure: str | None = None
        self.bpf_stats = os.environ.get("PROBEC_BPF_STATS") == "1" if bpf_stats is None else bpf_stats
        try:
            self.probes = self.attacher.probes
            maps = {m.name: m for m in self.manifest.maps}
            signed = core.value_signed
            self.readers = [MetricReader(m, maps[m.map], bool(signed.get(m.name)))
                            for m in self.manifest.metrics]
            self.decoders = {e.index: EventDecoder(e) for e in self.manifest.events}
            sets = {m.name for m in self.manifest.maps if m.purpose == MapPurpose.METRIC_SETS}
            for reader in self.readers:
                reader.sets_map = f"{reader.map}_sets" if f"{reader.map}_sets" in sets else None
            # the size RingReader hands over in blocks: the commonest record size (one event: its own)
            sizes = collections.Counter(d.size for d in self.decoders.values())
            self.block_decoder = next((d for d in self.decoders.values() if d.size == sizes.most_common(1)[0][0]),
                                      None) if sizes else None
        except (KeyError, TypeError, ValueError, struct.error) as exc:
            raise BundleError(f"{bundle.path}/manifest.json is damaged or from another probec version "
                              f"({type(exc).__name__}: {exc}); rebuild the bundle") from None
        self.obj = None
        self.links: dict[str, object] = {}
        # Probes on a file inside containers: (container, path) -> probe ids; the files attached to
        # so far, by the inode the processes map; and those links.
        self.container_files: dict[tuple[str, str], list[str]] = {}
        for p in self.manifest.probes:
            if p.container:
                self.container_files.setdefault((p.container, p.path_in_container), []).append(p.id)
        self.container_inodes: dict[tuple[str, str], set] = {}
        self.container_links: list = []
        self.container_failed: set = set()
        # Links left on a binary's old inode after it was replaced on disk, kept while a process
        # still maps that inode (it keeps running the old code, and is counted): (dev, ino), link
        self.retired: list[tuple[tuple[int, int], object]] = []
        self.active: list[CoreProgram] = []
        self.stats_base: dict[str, tuple[int, int, int]] = {}   # program stats of objects retargeting replaced
        self.ring = None
        self.stacks: StackSymbols | None = None
        self.thread: threading.Thread | None = None
        self.events_stop = threading.Event()
        self.stats_fd: int | None = None
        self.stopped = False

    @property
    def pid(self) -> int:
        return self.attacher.pid

    # -- start ---------------------------------------------------------------------------------
    def object_path(self) -> Path:
        name = self.core.object
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
        check_tracepoint_fields(self.core.tracepoint_fields)
        self.find_container_files()
        check_uprobe_placement(self.probes.values())
        L = _libbpf()
        L.libbpf_version()   # a missing or old libbpf says so here, before anything else
        self.obj, self.links, self.active = self.attacher.load_and_attach(path)
        for (name, inside), ids in self.container_files.items():     # the file the build found
            built = self.probes[ids[0]].binary
            key = _file_key(built, inside)
            if key is not None:
                self.container_inodes.setdefault((name, inside), set()).add(key)
        self.sync_cgroups()
        self.after_attach()

    def after_attach(self) -> None:
        """Once attached: health, BPF stats, stacks, the event reader, a first read."""
        L = _libbpf()
        health = self.store.health
        # and for each group, the variant attached (span_NAME: fentry:F, kprobe:F or the fallback;
        # sched_tracepoints: tp_btf or tracepoint)
        health.mechanisms = self.attacher.mechanisms.describe(self.manifest) | self.attacher.variants
        # the probes of the variants not chosen are not probes of this run (not "detached")
        active = {p.probe for p in self.active}
        health.attached = {pid: int(pid in self.links) for pid, p in self.probes.items()
                           if not p.group or pid in active}
        unused = {s.map if self.in_task_storage(s) else s.task_map for s in self.manifest.spans}
        if self.core.ringbuf and not self.attacher.mechanisms.ring_buffer:
            unused.add(self.core.ringbuf.map)
        for m in self.manifest.maps:
            # task-local storage has a slot per thread, no capacity; maps of mechanisms not taken stand by
            if m.type != "TASK_STORAGE" and m.name not in unused:
                health.map_capacity[m.name] = m.max_entries
        hm = self.core.health_map
        health.map_capacity[hm.name] = hm.slots
        if self.bpf_stats:
            try:
                self.stats_fd = L.enable_stats()
            except L.BpfError as exc:
                self.log(f"warning: cannot turn on BPF run-time stats: {exc}")
        if self.core.stack_map:
            self.stacks = StackSymbols(self.obj.map(self.core.stack_map), self.core.stack_depth)
        if self.core.ringbuf:
            self.ring = self.event_reader(self.obj)
            self.thread = threading.Thread(target=self.drain_events, name="probec-events", daemon=True)
            self.thread.start()
        self.read()
        health.up = 1

    # -- reading -------------------------------------------------------------------------------
    def read(self) -> None:
        """One read of every map into the store and the health counters."""
        if self.obj is None:
            return
        started = time.monotonic()
        health = self.store.health
        self.sync_cgroups()
        for reader in self.readers:
            bmap = self.obj.map(reader.map)
            items = bmap.items_batch()
            if reader.cgroup_fields and self.store.cgroups is not None:
                items = self.forget_expired(reader, items)
            health.map_entries[reader.map] = len(items)
            overflow, folded = None, 0
            if reader.overflow_map:
                overflow = reader.decode_overflow(self.obj.map(reader.overflow_map).items_batch())
                folded = len(self.obj.map(reader.folded_map).items_batch())
                health.map_entries[reader.folded_map] = folded
            self.store.replace(reader.name, reader.decode(items), overflow, folded)
        for span in self.manifest.spans:
            if not self.in_task_storage(span):   # task-local storage cannot be listed; it has no capacity
                health.map_entries[span.map] = len(self.obj.map(span.map).items_batch())
        if self.core.stack_map:
            health.map_entries[self.core.stack_map] = self.obj.map(self.core.stack_map).count_entries()
        self.read_health()
        self.read_program_stats()
        health.last_read_seconds = time.monotonic() - started
        health.reads += 1
        self.store.remember()

    def find_container_files(self) -> None:
        """Where the process the build read a container's file from has gone, the same file of
        another process of that container (the probes attach to one at start, then follow)."""
        resolver = self.store.cgroups
        for (name, inside), ids in self.container_files.items():
            if os.path.exists(self.probes[ids[0]].binary):
                continue
            pods = resolver.kubelet.pods if resolver is not None and resolver.kubelet is not None else None
            for pid in (container_processes(name, pods) if pods is not None else []):
                try:
                    full = resolve_in_root(pid, inside)
                except OSError:
                    continue
                for probe_id in ids:
                    self.probes[probe_id] = dataclasses.replace(self.probes[probe_id], binary=full)
                break
            else:
                raise BundleError(f"no process of a container named '{name}' has {inside} now"
                                  + ("" if pods is not None else " (pass --kubelet URL to find them)")
                                  + ": start the container first")

    def follow_containers(self) -> None:
        """Probes on a file of a container (`binaries: {X: {path: P, container: NAME}}`): attached
        to that file of every process in a container so named, once per file (by the inode the
        process maps: containers of one image share it), as new containers start."""
        resolver = self.store.cgroups
        if not self.container_files or self.obj is None or resolver is None or resolver.kubelet is None:
            return
        L = _libbpf()
        pods = resolver.kubelet.pods
        for (name, inside), ids in self.container_files.items():
            seen = self.container_inodes.setdefault((name, inside), set())
            for pid in container_processes(name, pods):
                try:
                    full = resolve_in_root(pid, inside)
                except OSError:
                    continue            # exited, or not this file
                key = _file_key(full, inside)
                if key is None or key in seen:
                    continue
                links = []
                try:
                    for p in self.active:
                        if p.probe in ids:
                            probe = dataclasses.replace(self.probes[p.probe], binary=full)
                            links.append(self.attacher.attach(self.obj, p.program, probe))
                except L.BpfError as exc:
                    for link in links:
                        _destroy(link)
                    if key not in self.container_failed:
                        self.container_failed.add(key)
                        self.log(f"error: cannot attach to {inside} of container '{name}' (process {pid}): {exc}")
                    continue
                seen.add(key)
                self.container_links += links
                health = self.store.health
                health.container_files[name] = health.container_files.get(name, 0) + 1
                self.log(f"attached {', '.join(ids)} to {inside} of container '{name}' (process {pid}, "
                         f"inode {key[1]})")

    def sync_cgroups(self) -> None:
        """The kernel's cgroup map as the spec's container and pod filters and --cgroup say now."""
        if self.cgroup_map is None or self.obj is None:
            return
        cmap = self.obj.map(self.cgroup_map.section.map)
        self.cgroup_map.sync(lambda cgid, bits: cmap.update(cgid.to_bytes(8, "little"), bits.to_bytes(8, "little")),
                             lambda cgid: cmap.delete(cgid.to_bytes(8, "little")))
        self.store.health.cgroups_marked = len(self.cgroup_map.written)

    def forget_expired(self, reader: MetricReader, items: list) -> list:
        """Series of cgroups gone past the grace period: handed to the store once more (which
        counts and drops them), and deleted from the kernel's maps, where they would hold a place
        under limits.series for good."""
        resolver = self.store.cgroups
        stale = {k for k, _ in items if any(resolver.expired(c) for c in reader.cgroup_ids(k))}
        if not stale:
            return items
        # (not from the folded map: the label sets folded there are counted, and a count never goes down)
        for name in (reader.map, reader.sets_map):
            if not name:
                continue
            bmap = self.obj.map(name)
            for key in (stale if name == reader.map else
                        [k for k, _ in bmap.items_batch() if any(resolver.expired(c) for c in reader.cgroup_ids(k))]):
                bmap.delete(key)
        return items

    def read_health(self) -> None:
        hm = self.core.health_map
        items = self.obj.map(hm.name).items_batch()
        totals = {int.from_bytes(k[:4], "little"): _percpu_total(v) for k, v in items}
        health = self.store.health
        health.map_entries[hm.name] = hm.slots
        lost = full = 0
        for slot in self.core.health:
            value = totals.get(slot.slot, 0)
            kind = slot.kind
            if kind == HealthSlot.SPAN_OVERFLOW:
                health.span_overflows[slot.name] = value
            elif kind == HealthSlot.SPAN_OUTSIDE:
                health.span_outside[slot.name] = value
            elif kind == HealthSlot.EVENTS_LOST:
                lost += value
            elif kind == HealthSlot.EVENT_SEEN:
                health.events_emitted[slot.name] = value
            elif kind == HealthSlot.EVENT_RATE_LIMITED:
                health.events_rate_limited[slot.name] = value
            elif kind == HealthSlot.METRIC_MAP_FULL:
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
                info = L.program_info(self.obj.program(p.program))
            except L.BpfError:
                continue
            # A program is skipped when another one runs on its CPU (a task preempted inside a
            # uprobe program, say): a span can lose its begin or its end.
            missed, runs, ns = self.stats_base.get(p.probe, (0, 0, 0))
            health.program_missed[p.probe] = missed + info.recursion_misses
            if stats:
                health.program_run_ns[p.probe] = ns + info.run_time_ns
                health.program_runs[p.probe] = runs + info.run_cnt

    def poll(self) -> None:
        if self.stopped or self.obj is None or self.failure:
            return
        self.follow_containers()
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
        try:
            new = self.attacher.attach_to_new_file(self.obj, self.active, path)
        except BaseException:
            for probe_id in self.attacher.probes_in(self.active, path):   # still on the old file only:
                self.store.health.attached[probe_id] = 0                    # new processes are not counted
            raise
        return self.take_new_links(new, old)

    def take_new_links(self, new: dict, old: FileIdentity | None) -> list[str]:
        """The links just attached to a replaced file's new inode take their probes' places; the
        old inode's links retire until no process runs the old file. Returns the probes, sorted."""
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
        self.attacher.pid = pid if pid > 0 else -1
        obj, links = self.attacher.reload(path, self.obj, self.active)
        self.read_program_stats()       # the old programs' last counts become the base
        health = self.store.health
        self.stats_base = {p.probe: (health.program_missed.get(p.probe, 0), health.program_runs.get(p.probe, 0),
                                        health.program_run_ns.get(p.probe, 0)) for p in self.active}
        old, self.obj = self.obj, obj
        for link in reversed(list(self.links.values()) + [link for _, link in self.retired]):
            _destroy(link)
        self.links, self.retired = links, []
        if self.ring is not None:        # the ring is the same map: hand it to a reader on the new object
            self.events_stop.set()
            if self.thread is not None:
                self.thread.join(5)
            self.read_events()
            self.ring.close()
            self.ring = self.event_reader(obj)
            self.events_stop.clear()
            self.thread = threading.Thread(target=self.drain_events, name="probec-events", daemon=True)
            self.thread.start()
        if self.stacks is not None:
            self.stacks.map = obj.map(self.core.stack_map)
        old.close()

    # -- mechanisms chosen at load -------------------------------------------------------------
    def in_task_storage(self, span) -> bool:
        return bool(span.task_map) and self.attacher.mechanisms.task_storage

    def event_reader(self, obj):
        """The ring buffer, or the perf buffer where the kernel has none (as the object was loaded)."""
        L = _libbpf()
        ring = self.core.ringbuf
        if self.attacher.mechanisms.ring_buffer:
            return L.RingReader(obj.map(ring.map), EVENT_READ_BYTES)
        return L.PerfBuffer(obj.map(ring.perf_map))

    def describe(self) -> str:
        """The mechanisms in use, for the start line: 'events: perf_buffer, ...'."""
        return ", ".join(f"{k}: {v}" for k, v in self.store.health.mechanisms.items())

    # -- events --------------------------------------------------------------------------------
    def drain_events(self) -> None:
        try:
            while not self.events_stop.is_set():
                self.ring.wait(EVENT_POLL_MS)
                self.read_events()    # also records that arrived without a wakeup
        except Exception as exc:
            self.failure = f"reading events failed: {exc}"

    def read_events(self) -> None:
        """Everything the ring holds now, in batches: runs of the commonest record size decoded
        in one call each, other records one by one."""
        size = self.block_decoder.size if self.block_decoder else 0
        while True:
            block, count, others = self.ring.read(size)
            if count:
                decode_block(self.decoders, self.block_decoder, block, self.stacks, self.sink, self.store.health)
            if others:
                decode_records(self.decoders, others, self.stacks, self.sink, self.store.health)
            if not count and not others:
                return

    def on_record(self, data: bytes) -> None:
        """One record, as the ring handed it over."""
        decode_records(self.decoders, [data], self.stacks, self.sink, self.store.health)

    # -- stop ----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Detach everything, read the maps one last time, close. Safe to call twice."""
        if self.stopped:
            return
        self.stopped = True
        self.events_stop.set()
        if self.thread is not None:
            self.thread.join(5)
        for link in reversed(list(self.links.values()) + [link for _, link in self.retired] + self.container_links):
            _destroy(link)
        self.links, self.retired, self.container_links = {}, [], []
        if self.ring is not None:
            try:
                self.read_events()
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


def _file_key(full: str, inside: str) -> tuple[int, int] | None:
    """The file a uprobe at `full` (/proc/PID/root/...) sits in: the inode that process maps at
    `inside` (overlayfs maps its lower file, which every container of an image shares), else the
    inode found at the path; None when it is gone."""
    m = re.match(r"/proc/(\d+)/root/", full)
    mapped = mapped_inode(int(m.group(1)), inside) if m else None
    if mapped is not None:
        return mapped
    try:
        st = os.stat(full)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _stats_enabled() -> bool:
    try:
        with open(BPF_STATS_SYSCTL) as f:
            return f.read().strip() == "1"
    except OSError:
        return False

