"""Runs a bpftrace bundle: starts bpftrace with JSON output, feeds its map dumps to the store and
its printf events to the event sink, restarts it if it dies after attaching, and stops it cleanly.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import threading
import time

from .cgroups import CgroupMap, ForeignMap, bpftrace_map_name
from .events import EventFormat, EventOutput, EventSink
from .manifest import BpftraceSection, Bundle, BundleError, HealthSlot, Manifest, MetricInfo, MetricMapRole
from .store import HistogramSeries, MetricStore
from .watch import FileIdentity, inodes_mapped, missing_in, process_start

HARMLESS_STDERR = ("couldn't set RLIMIT_MEMLOCK",)
MAX_RESTARTS = 5             # within RESTART_WINDOW_S; more than that and the runner gives up
RESTART_WINDOW_S = 300
PR_SET_PDEATHSIG = 1


def _libc_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()      # resolved here: the child between fork and exec must not load anything


def die_with_parent(parent: int):
    """A preexec_fn: the child gets SIGKILL when the thread that started it exits, so a `probec run`
    that is itself SIGKILLed leaves no bpftrace attached. (The kernel detaches a killed bpftrace's
    probes when its file descriptors close.) Checks the parent afterwards: one that died before
    the prctl would never send the signal."""
    def set_death_signal() -> None:
        if _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
    return set_death_signal


class BpftraceError(Exception):
    pass


def bpftrace_command() -> str:
    exe = shutil.which("bpftrace")
    if exe is None:
        raise BpftraceError("bpftrace is not installed: apt-get install bpftrace (or use the core backend)")
    return exe


def bpftrace_section(manifest: Manifest) -> BpftraceSection:
    if manifest.bpftrace is None:
        raise BundleError(f"the manifest of '{manifest.name}' has no bpftrace section: rebuild it with "
                          "'probec build SPEC --backend bpftrace'")
    return manifest.bpftrace


class MapDecoder:
    """Turns bpftrace's JSON map dumps into store snapshots, using the manifest's label types."""

    def __init__(self, manifest: Manifest, store: MetricStore):
        self.store = store
        metrics = {m.name: m for m in manifest.metrics}
        self.by_map: dict[str, tuple[MetricInfo, MetricMapRole]] = {
            mm.map: (metrics[mm.metric], mm.role) for mm in bpftrace_section(manifest).metric_maps}
        self.partial: dict[str, dict] = {}   # histogram name -> {"main": data, "sum": data}
        # Counts from earlier bpftrace processes: a restart starts its maps at zero, and adding
        # these keeps every exported counter monotonic across restarts.
        self.carried: dict[str, dict] = {}
        # What install() last handed the store, by metric: label sets as bpftrace keys them (cgroup
        # ids, not the containers and pods they show), so that the store still drops the series of
        # cgroups gone past the grace period after they were carried over a restart.
        self.installed: dict[str, dict] = {}
        self.fresh: set[str] = set()         # the metrics installed since the last whole dump

    def carry_over(self) -> None:
        """Called before a restart: what was installed last becomes the base for the next run, but
        for the series the store dropped for good (their cgroup gone past the grace period)."""
        states = self.store.snapshot()
        for name, series in self.installed.items():
            state = states[name]
            if not state.meta.cumulative:
                continue
            self.carried[name] = {k: (HistogramSeries(list(v.buckets), v.sum) if isinstance(v, HistogramSeries)
                                      else v) for k, v in series.items() if k not in state.expired}
        self.partial.clear()

    def install(self, name: str, series: dict) -> None:
        for labels, base in self.carried.get(name, {}).items():
            mine = series.get(labels)
            if isinstance(base, HistogramSeries):
                mine = mine or HistogramSeries([0] * len(base.buckets))
                series[labels] = HistogramSeries([a + b for a, b in zip(mine.buckets, base.buckets)],
                                                 mine.sum + base.sum)
            else:
                series[labels] = (mine or 0) + base
        self.installed[name] = series
        self.fresh.add(name)
        self.store.replace(name, series)

    def dump_done(self) -> None:
        """After a whole dump. bpftrace prints no empty map: a metric it left out has counted
        nothing since the restart, and shows what was carried over alone (through the store again,
        which drops the series of cgroups gone past the grace period)."""
        for name in [n for n in self.carried if n not in self.fresh]:
            self.install(name, {})
        self.fresh = set()

    def keyless(self, map_name: str) -> bool:
        """A map bpftrace prints as a bare number: a counter or histogram sum with no labels."""
        entry = self.by_map.get(map_name)
        if entry is None:
            return False
        meta, role = entry
        return not meta.labels and not (meta.histogram and role == MetricMapRole.MAIN)

    def split_key(self, key: str, types: list[str]) -> tuple | None:
        """bpftrace joins key parts with ','; a string part may itself hold commas."""
        parts = key.split(",")
        if len(parts) == len(types):
            return tuple(parts)
        strings = [i for i, t in enumerate(types) if t == "str"]
        if len(parts) < len(types) or len(strings) != 1:
            return None
        s = strings[0]
        extra = len(parts) - len(types)
        return tuple(parts[:s] + [",".join(parts[s:s + extra + 1])] + parts[s + extra + 1:])

    def typed(self, parts: tuple, types: list[str]) -> tuple:
        # an "int" that does not parse is a label bpftrace rendered itself (ntop of an address)
        return tuple(int(p) if t == "int" and p.lstrip("-").isdigit() else p for p, t in zip(parts, types))

    def feed(self, map_name: str, data) -> None:
        entry = self.by_map.get(map_name)
        if entry is None:
            return
        meta, role = entry
        label_types = [lab.type for lab in meta.labels]
        if not meta.histogram:
            self.install(meta.name, self.series(data, label_types, meta))
            return
        slot = self.partial.setdefault(meta.name, {})
        slot[role] = data
        if MetricMapRole.MAIN in slot:
            self.install(meta.name, self.histogram(slot[MetricMapRole.MAIN], slot.get(MetricMapRole.SUM),
                                                   label_types, meta))

    def series(self, data, label_types, meta) -> dict:
        if not label_types:
            return {(): int(data)} if not isinstance(data, dict) else {}
        out = {}
        for key, value in data.items():
            parts = self.split_key(key, label_types)
            if parts is None:
                self.store.health.decode_errors += 1
                continue
            try:
                out[self.typed(parts, label_types)] = int(value)
            except ValueError:
                self.store.health.decode_errors += 1
        return out

    def histogram(self, data, sums, label_types, meta) -> dict:
        nb = len(meta.edges) + 1
        out: dict[tuple, HistogramSeries] = {}
        for key, value in (data or {}).items():
            parts = self.split_key(key, label_types + ["int"])
            if parts is None:
                self.store.health.decode_errors += 1
                continue
            try:
                labels, bucket = self.typed(parts[:-1], label_types), int(parts[-1])
            except ValueError:
                self.store.health.decode_errors += 1
                continue
            series = out.setdefault(labels, HistogramSeries([0] * nb))
            if 0 <= bucket < nb:
                series.buckets[bucket] += int(value)
        sum_series = self.series(sums, label_types, meta) if sums is not None else {}
        for labels, total in sum_series.items():
            if labels in out:
                out[labels].sum = total
        return out


class BpftraceRunner:
    def __init__(self, bundle: Bundle, store: MetricStore, sink: EventOutput | EventSink | None, log=print,
                 cgroup_map: CgroupMap | None = None):
        self.bundle = bundle
        self.cgroup_map = cgroup_map
        self.cgroup_fd: ForeignMap | None = None    # bpftrace's cgroup map, through a copy of its fd
        self.store = store
        self.sink = sink
        self.log = log
        self.manifest = bundle.manifest
        self.settings = bpftrace_section(self.manifest)
        self.script = bundle.file("script")
        self.decoder = MapDecoder(self.manifest, store)
        self.proc: subprocess.Popen | None = None
        self.pid = -1                            # -p: bpftrace exits when this process does
        self.attached = threading.Event()
        self.dumped = threading.Condition()      # notified on each whole dump
        self.last_dump = 0.0
        # When the last applied dump froze its epoch (CLOCK_MONOTONIC ns, time.monotonic_ns's
        # clock): what the store shows is every update up to that instant. 0: not said.
        self.flipped_ns = 0
        self.dumps = 0
        # A dump is applied only once its mark arrives (a bundle without a mark: map by map).
        self.dump_mark = self.settings.dump_mark
        self.pending: dict[str, object] = {}     # maps of the dump in progress: name -> data
        # Metric maps keyed by epoch first: what each epoch held when a dump last froze it.
        self.epoch_maps = set(self.settings.epoch_maps)
        self.keys_max = self.settings.map_keys_max   # BPFTRACE_MAP_KEYS_MAX, every map
        self.full_said: set[str] = set()
        self.frozen: dict[int, dict[str, dict]] = {0: {}, 1: {}}
        self.attached_at = 0.0
        self.missed_before = 0                   # skipped runs of bpftrace processes before a restart
        self.stopping = False
        self.failure: str | None = None
        self.stderr_tail: list[str] = []
        self.formats = {e.index: EventFormat(e) for e in self.manifest.events}
        # bpftrace's own counts: map name -> (the Health dict it feeds, its key there)
        health = store.health
        targets = {HealthSlot.EVENT_SEEN: health.events_emitted,
                   HealthSlot.EVENT_RATE_LIMITED: health.events_rate_limited,
                   HealthSlot.SPAN_OUTSIDE: health.span_outside,
                   HealthSlot.SPAN_OVERFLOW: health.span_overflows}
        self.counters: dict[str, tuple[dict[str, int], str]] = {}
        self.counter_base: dict[str, int] = {}   # health counts of earlier bpftrace processes
        for c in self.settings.counters:
            if c.kind not in targets:
                raise BundleError(f"{bundle.path}/manifest.json: bpftrace counts {c.kind} in {c.map}, which this "
                                  "runtime does not read; rebuild the bundle with this probec")
            self.counters[c.map] = (targets[c.kind], c.name)
            if c.kind in (HealthSlot.SPAN_OUTSIDE, HealthSlot.SPAN_OVERFLOW):
                self.counters[c.map][0][c.name] = 0     # shown as 0 from the start, as core shows its slots
        self.thread: threading.Thread | None = None

    # -- process -------------------------------------------------------------------------------
    def start(self, pid: int = -1, timeout: float = 60.0) -> None:
        exe = bpftrace_command()
        env = dict(os.environ)
        env["BPFTRACE_MAP_KEYS_MAX"] = str(self.settings.map_keys_max)
        env.setdefault("BPFTRACE_CACHE_USER_SYMBOLS", "1")
        env.setdefault("BPFTRACE_STRLEN", "64")
        # $1: the script's pid filter; $2: 1 with --cgroup (only the cgroups marked in its cgroup map)
        path_filter = int(self.cgroup_map is not None and self.cgroup_map.path is not None)
        cmd = [exe, "-f", "json", str(self.script), str(max(pid, 0)), str(path_filter)]
        self.pid = pid
        self.stopping = False
        if pid > 0:
            cmd[1:1] = ["-p", str(pid)]
        self.attached.clear()
        self.failure = None
        self.stderr_tail = []
        # The death signal goes with the thread that forks: start() runs on the session's main
        # thread (first start and restarts from poll()), which lives as long as `probec run`.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, text=True, bufsize=1,
                                     encoding="utf-8", errors="replace",
                                     start_new_session=True, preexec_fn=die_with_parent(os.getpid()))
        threading.Thread(target=self._read_stderr, args=(self.proc,), daemon=True).start()
        self.thread = threading.Thread(target=self._read_stdout, args=(self.proc,), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.attached.wait(0.1):
            if self.proc.poll() is not None:
                self.thread.join(2)
                raise BpftraceError(self.explain_failure())
            if time.monotonic() > deadline:
                self.stop()
                raise BpftraceError(f"bpftrace did not attach within {timeout:.0f}s")
        if self.cgroup_map is not None:
            self.open_cgroup_map()
        self.store.health.up = 1

    def open_cgroup_map(self) -> None:
        """bpftrace's cgroup map, reached through a copy of its file descriptor, and filled: until
        then the script's container and pod filters (and --cgroup) match nothing."""
        if self.cgroup_fd is not None:
            self.cgroup_fd.close()
        self.cgroup_map.written = {}           # a new bpftrace starts with an empty map
        try:
            self.cgroup_fd = ForeignMap(self.proc.pid, bpftrace_map_name(self.cgroup_map.section.map))
        except OSError as exc:
            self.stop()
            raise BpftraceError(f"cannot fill bpftrace's cgroup map (container and pod filters, --cgroup): {exc}")
        self.sync_cgroups()

    def sync_cgroups(self) -> None:
        if self.cgroup_fd is None or self.cgroup_fd.fd < 0:
            return
        self.cgroup_map.sync(self.cgroup_fd.update, self.cgroup_fd.delete)
        self.store.health.cgroups_marked = len(self.cgroup_map.written)

    def explain_failure(self) -> str:
        lines = [line for line in self.stderr_tail if line.strip()]
        detail = "\n  ".join(lines[-12:]) if lines else f"exit status {self.proc.returncode}"
        hint = ""
        text = " ".join(lines)
        if "Operation not permitted" in text or "EPERM" in text or os.geteuid() != 0:
            from ..host.capabilities import run_privileges
            kinds = {p.kind for p in self.manifest.probes}
            hint = (f"\n  help: this bundle needs uid 0 and {', '.join(run_privileges(kinds).needed)} "
                    "('probec doctor' lists them)")
        elif "Could not resolve symbol" in text or "No such file" in text:
            hint = "\n  help: the binary or symbol changed since the build; rebuild the bundle"
        return f"bpftrace failed to start {self.script.name}:\n  {detail}{hint}"

    def _read_stderr(self, proc: subprocess.Popen) -> None:
        in_warning = False
        for line in proc.stderr:
            line = line.rstrip("\n")
            if not line or any(h in line for h in HARMLESS_STDERR):
                continue
            self.stderr_tail = (self.stderr_tail + [line])[-50:]
            # a warning quotes the script line and points at it with a caret: indented lines
            in_warning = "WARNING" in line or (in_warning and line[:1].isspace())
            if not in_warning:
                self.store.health.backend_errors += 1
                if self.attached.is_set():
                    self.log(f"bpftrace: {line}")

    def _read_stdout(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                self.handle(json.loads(line))
            except Exception as exc:  # the reader must outlive any bad line, or bpftrace gets EPIPE
                self.store.health.decode_errors += 1
                if self.store.health.decode_errors <= 3:
                    self.log(f"cannot decode bpftrace output ({exc.__class__.__name__}: {exc}): {line[:120]}")
        # bpftrace prints its maps once more as it exits, with no mark after them: whole when it
        # exited cleanly (stopped by us), cut anywhere when it was killed or crashed.
        try:
            clean = proc.wait(5) == 0
        except subprocess.TimeoutExpired:
            clean = False
        if clean and self.pending:
            self.apply_dump(final=True)
        self.pending = {}

    def carry_over(self) -> None:
        """Before a restart: the new bpftrace starts its maps at zero, so what is shown now (its
        metrics and its health counts) becomes the base the next one's counts add to."""
        self.decoder.carry_over()
        self.frozen = {0: {}, 1: {}}
        for name, (target, owner) in self.counters.items():
            self.counter_base[name] = target.get(owner, 0)

    def handle(self, msg: dict) -> None:
        kind, data = msg.get("type"), msg.get("data")
        if kind == "printf" and data == self.settings.ready_mark + "\n":
            # bpftrace says "attached" before attaching; our last probe firing is the real signal.
            self.store.health.attached = {p: 1 for p in self.settings.probes}
            self.attached_at = time.monotonic()
            self.attached.set()
        elif kind == "map" and isinstance(data, dict):
            if self.settings.ready_map in data:
                return
            self.pending.update(data)
            if not self.dump_mark:
                self.apply_dump()
        elif kind == "printf" and self.dump_mark and isinstance(data, str) and data.startswith(self.dump_mark):
            words = data[len(self.dump_mark):].split()     # the epoch frozen, then when (ns), if said
            flipped = int(words[1]) if len(words) > 1 and words[1].isdigit() else 0
            self.apply_dump(int(words[0]) if words and words[0].isdigit() else None, flipped_ns=flipped)
        elif kind == "printf" and isinstance(data, str):
            self.event(data)
        elif kind == "lost_events":
            self.store.health.events_lost += int((data or {}).get("events", 0))

    def note_fullness(self, name: str, entries: int) -> None:
        """A metric map's keys against BPFTRACE_MAP_KEYS_MAX. bpftrace 0.17 drops an update to a new
        key of a full map without a word or a count: show how full each map is, and say it once."""
        health = self.store.health
        health.map_entries[name[1:]] = entries
        health.map_capacity[name[1:]] = self.keys_max
        if entries >= self.keys_max and name not in self.full_said:
            self.full_said.add(name)
            self.log(f"warning: bpftrace map {name} is full ({entries} keys): bpftrace drops updates to new "
                     "label sets without counting them, so this metric now undercounts; use fewer label "
                     "values (the core backend folds the excess into __overflow__ and counts it)")

    def apply_dump(self, frozen: int | None = None, final: bool = False, flipped_ns: int = 0) -> None:
        """Install the maps of one whole dump: a restart carries over what the store shows, so
        counters and histograms come from the same dump, never one from a dump cut by a kill.

        A metric map's counts are the epoch this dump froze plus the other one as the dump before
        froze it: both stopped at a flip, so all maps agree. The final dump, printed after the
        probes detached, holds both epochs complete. Applied under `dumped`'s lock: a reader that
        takes it sees the store of one whole dump, and `flipped_ns` and `dumps` of that dump."""
        with self.dumped:
            self._apply_dump(frozen, final)
            self.last_dump = time.monotonic()
            self.flipped_ns = flipped_ns
            self.dumps += 1
            self.dumped.notify_all()

    def _apply_dump(self, frozen: int | None, final: bool) -> None:
        started = time.monotonic()
        for name, value in self.pending.items():
            if isinstance(value, dict) and name in self.decoder.by_map:
                self.note_fullness(name, len(value))
            if name in self.epoch_maps and isinstance(value, dict) and (frozen is not None or final):
                by_epoch = self.split_epochs(value)
                if final:
                    self.frozen = {e: {**self.frozen[e], name: by_epoch.get(e, {})} for e in (0, 1)}
                else:
                    self.frozen[frozen][name] = by_epoch.get(frozen, {})
                value = self.merge_epochs(name)
            if name in self.counters:
                target, owner = self.counters[name]
                count = int(value) if not isinstance(value, dict) else 0
                target[owner] = self.counter_base.get(name, 0) + count
            else:
                self.decoder.feed(name, value)
        if self.dump_mark:          # a whole dump, not one map of it
            self.decoder.dump_done()
        self.pending = {}
        self.store.health.last_read_seconds = time.monotonic() - started
        self.store.health.reads += 1
        self.store.remember()

    @staticmethod
    def split_epochs(data: dict) -> dict[int, dict[str, int]]:
        """{"E,rest of key": n} -> {E: {"rest of key": n}} ("" for a map keyed by the epoch alone)."""
        out: dict[int, dict[str, int]] = {0: {}, 1: {}}
        for key, value in data.items():
            epoch, _, rest = str(key).partition(",")
            if epoch in ("0", "1"):
                out[int(epoch)][rest] = value
        return out

    def merge_epochs(self, name: str):
        """Both epochs' counts of one map, in the shape bpftrace prints it without the epoch key:
        a number for a map with no other key, else {key: n}."""
        merged: dict[str, int] = {}
        for epoch in (0, 1):
            for key, value in self.frozen[epoch].get(name, {}).items():
                merged[key] = merged.get(key, 0) + int(value)
        if self.decoder.keyless(name):
            return merged.get("", 0)
        return merged

    def event(self, text: str) -> None:
        """One printf line of an event -> a row of its EventFormat (bpftrace prints one at a time)."""
        sep, mark = self.settings.separator, self.settings.event_mark
        parts = text.rstrip("\n").split(sep)
        if len(parts) < 6 or parts[0] != mark:
            return
        try:
            index = int(parts[1])
            fmt = self.formats[index]
            values = parts[6:]
            if len(values) != len(fmt.meta.fields):
                raise ValueError("field count")
            row = [int(parts[2]), int(parts[3]), int(parts[4]), int(parts[5])]
            for f, raw in zip(fmt.meta.fields, values):
                if f not in fmt.fields:          # pid, tid or cpu again: the header has it
                    continue
                if f.kind.endswith("stack"):
                    row.append([frame.strip() for frame in raw.strip("\n").split("\n") if frame.strip()])
                elif f.kind == "str" or f.render == "ipv4":   # bpftrace printed ntop() as text
                    row.append(raw)
                else:
                    row.append(int(raw))
        except (ValueError, KeyError):
            self.store.health.decode_errors += 1
            return
        if self.sink is not None:
            self.sink.add(index, [tuple(row)])

    def read_missed(self) -> None:
        """Runs of bpftrace's programs the kernel skipped (another BPF program was running on that
        CPU), from the fdinfo of its program file descriptors; bpftrace does not name them, so
        they are summed."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        total, found = 0, False
        try:
            fds = os.listdir(f"/proc/{proc.pid}/fd")
        except OSError:
            return
        for fd in fds:
            try:
                if os.readlink(f"/proc/{proc.pid}/fd/{fd}") != "anon_inode:bpf-prog":
                    continue
                with open(f"/proc/{proc.pid}/fdinfo/{fd}") as info:
                    for line in info:
                        if line.startswith("recursion_misses:"):
                            total += int(line.split()[1])
                            found = True
            except (OSError, ValueError):
                continue
        if found:
            self.store.health.program_missed["bpftrace"] = self.missed_before + total

    def poll(self) -> None:
        """Called periodically: restart bpftrace if it died on its own after attaching."""
        self.read_missed()
        if self.proc is not None and self.proc.poll() is None:
            self.sync_cgroups()
        if self.stopping or self.proc is None or self.proc.poll() is None:
            return
        if self.pid > 0 and process_start(self.pid) is None:
            # bpftrace -p exits with its target: nothing to restart until retarget() names another
            if self.thread is not None:
                self.thread.join(5)          # its final map dump
            self.missed_before = self.store.health.program_missed.get("bpftrace", 0)
            self.proc = None
            return
        self.missed_before = self.store.health.program_missed.get("bpftrace", 0)
        self.store.health.up = 0
        if self.thread is not None:
            self.thread.join(5)              # let the final map dump of the dead process land
        now = time.monotonic()
        self.restarts = [t for t in getattr(self, "restarts", []) if now - t < RESTART_WINDOW_S] + [now]
        if len(self.restarts) > MAX_RESTARTS:
            self.failure = (f"bpftrace exited {len(self.restarts)} times in {RESTART_WINDOW_S}s; giving up:\n  "
                            + "\n  ".join(self.stderr_tail[-8:]))
            return
        self.store.health.backend_restarts += 1
        tail = "; ".join(self.stderr_tail[-3:]) or "no error output"
        status = self.proc.returncode
        # Counted up to its last whole dump (or its attachment, with no dump yet); the new one
        # counts from its attachment. Between the two nothing is counted: that gap is what the
        # restart cost, though not how many events fell in it.
        counted_until = max(self.last_dump, self.attached_at)
        self.carry_over()
        self.start(pid=self.pid)
        gap = self.attached_at - counted_until
        self.store.health.backend_gap_seconds += gap
        self.log(f"bpftrace exited with status {status} ({tail}); restarted: nothing was counted for {gap:.2f}s "
                 "(from its last whole dump to the new attachment, in probec_backend_gap_seconds_total); "
                 "counts before that carried over")

    def restart(self, pid: int) -> None:
        """Stop bpftrace after its last dump and start a new one: its counts carry over."""
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        elif self.thread is not None:
            self.thread.join(5)
        self.missed_before = self.store.health.program_missed.get("bpftrace", 0)
        counted_until = max(self.last_dump, self.attached_at)
        self.carry_over()
        try:
            self.start(pid=pid)
            self.store.health.backend_gap_seconds += self.attached_at - counted_until
        except BpftraceError:
            self.proc = None     # poll() leaves it be: the next reattach() or retarget() tries again
            self.store.health.up = 0
            self.store.health.attached = {p: 0 for p in self.store.health.attached}
            raise

    def reattach(self, path: str, old: FileIdentity | None) -> list[str]:
        """`path` is a new file (a deploy replaced it). bpftrace attaches by path only at start, so
        it is restarted: its uprobes then sit in the new file, and processes still running the old
        one are no longer counted (the core backend keeps counting them)."""
        mine = [p for p in self.manifest.probes if p.id in self.settings.probes
                and p.binary == path and p.kind in ("uprobe", "uretprobe", "usdt")]
        missing = missing_in(path, mine)
        if missing:      # the running bpftrace keeps the old file's probes meanwhile
            for p in mine:
                self.store.health.attached[p.id] = 0
            raise BpftraceError(f"the new {path} has no {', '.join(missing)}")
        probes = [p.id for p in mine]
        if probes and self.proc is not None:
            self.restart(self.pid)
            if old is not None and inodes_mapped({old.inode}):
                self.log(f"warning: processes still running the old {path} are no longer counted: bpftrace "
                         "attaches to one file per path (the core backend keeps counting them)")
        return sorted(probes)

    def retarget(self, pid: int) -> None:
        """Follow another process (--pid-file): bpftrace -p takes one pid, so start a new one."""
        self.restart(pid)

    def stop(self, timeout: float = 10.0) -> None:
        """Waits for one more periodic dump, then SIGINT lets bpftrace detach and print its final
        maps; then SIGTERM, then SIGKILL.

        bpftrace 0.17 drops the printf output (events) still queued when SIGINT arrives; what the
        probes printed before a periodic dump is out by the time that dump is, so waiting for the
        next one (at most one interval) loses no event."""
        self.stopping = True
        proc = self.proc
        if proc is None or proc.poll() is not None:
            self.store.health.up = 0
            return
        if self.attached.is_set():
            asked = time.monotonic()
            deadline = asked + self.settings.interval_ms / 1000 + 1.0
            with self.dumped:
                while self.last_dump < asked + 0.05 and proc.poll() is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.dumped.wait(left)
        self.read_missed()
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 3), (signal.SIGKILL, 3)):
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        if self.thread is not None:
            self.thread.join(5)
        if self.cgroup_fd is not None:
            self.cgroup_fd.close()
            self.cgroup_fd = None
        self.store.health.up = 0
