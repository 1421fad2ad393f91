"""`probec run A B ...` and `probec run FOLDER`: several specs or bundles in one process, on one
metrics port, reloaded on SIGHUP or when the folder changes.

A reload compares what each source holds now (its bytes) with what is running: a source that did
not change keeps its runner, its maps and its counts; a changed one is stopped and started again
(its counts start over, as its spec is another one now); a removed one is stopped; a new one is
started. A source that cannot be started on a reload (a bad spec, a name clash) is logged once,
counted in probec_reload_errors and shown as probec_source_loaded 0, and the others keep running.

Sources, in a folder or named one by one: a spec (`*.yaml`, `*.yml`; built by the callback the
CLI passes, as `probec run SPEC` builds one), a bundle folder (with a `manifest.json`), or a
bundle laid out flat beside others (`NAME.manifest.json` and the files it names), which is how a
Kubernetes ConfigMap holds bundles. Names starting with a dot (a ConfigMap's `..data`) are skipped.
"""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from pathlib import Path
from typing import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..host.capabilities import run_privileges, uprobes_need_sys_admin
from . import events
from .events import EventSink
from .exporter import Exporter, StoreCollector
from .manifest import Bundle, BundleError, load_bundle
from .session import binary_watch, check_binaries, container_view, finish, known_errors, log, make_runner
from .store import MetricStore

SPEC_SUFFIXES = (".yaml", ".yml")
FLAT_MANIFEST = ".manifest.json"

# turns a spec file into a bundle folder and a function that removes it; raises BundleError
Prepare = Callable[[Path], "tuple[Path, Callable[[], None]]"]


class SourceError(BundleError):
    """A source that cannot run, with the reason."""


def is_many(targets: list[str]) -> bool:
    """True when `probec run` was given more than one source, or a folder that is not a bundle."""
    if len(targets) > 1:
        return True
    p = Path(targets[0])
    return p.is_dir() and not (p / "manifest.json").exists()


def discover(targets: list[str]) -> list[Path]:
    """The sources the targets name now, in a stable order; a folder's are those directly in it."""
    found = []
    for target in targets:
        p = Path(target)
        if p.is_dir() and not (p / "manifest.json").exists():
            for entry in sorted(p.iterdir()):
                if entry.name.startswith("."):
                    continue
                if entry.is_dir() and (entry / "manifest.json").exists():
                    found.append(entry)
                elif entry.is_file() and (entry.suffix in SPEC_SUFFIXES or entry.name.endswith(FLAT_MANIFEST)):
                    found.append(entry)
        else:
            found.append(p)
    return found


def fingerprint(source: Path) -> str:
    """What a source holds: its bytes (for a bundle, those of every file it has)."""
    digest = hashlib.sha256()
    try:
        if source.is_dir():
            files = sorted(f for f in source.rglob("*") if f.is_file())
        elif source.name.endswith(FLAT_MANIFEST):
            bundle = load_bundle(source)
            files = [source] + sorted(bundle.path / name for name in bundle.manifest.files.values()
                                      if (bundle.path / name).is_file())
        else:
            files = [source]
        for f in files:
            digest.update(str(f.relative_to(source) if source.is_dir() else f.name).encode() + b"\0")
            digest.update(f.read_bytes())
    except (OSError, BundleError) as exc:
        return f"unreadable: {exc}"
    return digest.hexdigest()


def exported_names(bundle: Bundle) -> set[str]:
    """The metric family names a bundle exports (a histogram also has NAME_window)."""
    names = set()
    for m in bundle.manifest.metrics:
        names.add(m.name)
        if m.histogram:
            names.add(f"{m.name}_window")
    return names


def events_path(path: str, bundle: str) -> str:
    """Each bundle's events in a file of its own (two writers of one file could cut each other's
    lines back after a failed write): events.jsonl -> events.NAME.jsonl. `-` stays stdout."""
    if path == "-":
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}.{bundle}{p.suffix}"))


class Member:
    """One source running: its bundle, store, runner and the watch on its binaries."""

    def __init__(self, source: Path, print_as: str, args, prepare: Prepare | None):
        self.source = source
        self.print_as = print_as
        self.fingerprint = fingerprint(source)
        self.cleanup: Callable[[], None] | None = None
        self.runner = None
        self.sink = None
        path = source
        if source.is_file() and source.suffix in SPEC_SUFFIXES:
            if prepare is None:
                raise SourceError(f"{print_as}: a spec, and this install has no compiler to build it: run bundles "
                                  "(probec build SPEC --backend core -o DIR) here")
            path, self.cleanup = prepare(source)
        try:
            self.bundle = load_bundle(path)
            if args.backend and source.suffix not in SPEC_SUFFIXES and args.backend != self.bundle.backend:
                raise SourceError(f"{print_as} is a {self.bundle.backend} bundle, not {args.backend}")
        except BaseException:
            self.remove()
            raise
        self.name = self.bundle.name
        self.store = MetricStore(self.bundle.manifest, window_s=args.window, log=log)
        self.failed_reattach: dict = {}

    def start(self, args) -> None:
        refused = run_privileges({p.kind for p in self.bundle.manifest.probes}).error(self.bundle.backend)
        if refused:
            raise SourceError(f"{self.print_as}: {refused}")
        self.watch = binary_watch(self.bundle, self.store)
        if self.bundle.manifest.events:
            self.sink = EventSink(events_path(args.events, self.name), self.bundle.manifest, self.store.health, log)
        try:
            cgroups, cgroup_map = container_view(self.bundle, args, self.store.health)
        except BundleError as exc:
            raise SourceError(f"{self.print_as}: {exc}") from None
        self.store.cgroups = cgroups
        if cgroups is not None:
            events.CGROUP_VIEW = cgroups      # one node: any spec's view names its containers
        self.runner = make_runner(self.bundle, self.store, self.sink, args.pid, args.bpf_stats,
                                  getattr(args, "btf", None), cgroup_map)
        if self.bundle.backend == "bpftrace":
            self.runner.start(pid=args.pid)
        else:
            self.runner.start()

    def poll(self) -> str | None:
        """Read the maps; the runner's failure, if it failed."""
        if self.runner is None:
            return None
        check_binaries(self.runner, self.watch, self.store, self.failed_reattach)
        if self.store.cgroups is not None:
            self.store.cgroups.refresh()
        self.runner.poll()
        if self.sink is not None:
            self.sink.flush()
        return getattr(self.runner, "failure", None)

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.stop()
            self.runner = None
        if self.sink is not None:
            self.sink.close()
            self.sink = None
        self.remove()

    def remove(self) -> None:
        if self.cleanup is not None:
            self.cleanup()
            self.cleanup = None


class Fleet:
    """The members running now, by source, and how reloads went."""

    def __init__(self, targets: list[str], args, prepare: Prepare | None):
        self.targets = targets
        self.args = args
        self.prepare = prepare
        self.members: dict[Path, Member] = {}
        self.lock = threading.Lock()          # the exporter's thread reads members while a reload changes them
        self.loaded: dict[str, int] = {}      # source -> 1 running, 0 refused or failed
        self.reloads = 0
        self.reload_errors = 0
        self.failed: dict[Path, str] = {}     # source -> fingerprint that failed (not retried until it changes)

    def wanted(self) -> dict[Path, str]:
        return {source: fingerprint(source) for source in discover(self.targets)}

    def changed(self) -> bool:
        wanted = self.wanted()
        running = {s: m.fingerprint for s, m in self.members.items()}
        gone = set(self.loaded) - {str(s) for s in wanted}          # a refused source that was removed
        return bool(gone) or {s: f for s, f in wanted.items() if self.failed.get(s) != f} != running

    def reload(self, first: bool = False, retry: bool = False) -> list[str]:
        """Bring the running members in line with the sources; the errors, one line each. On the
        first load an error stops everything (the caller exits); later, the others keep running."""
        wanted = self.wanted()
        if retry:
            self.failed.clear()
        errors = []
        stopped, started, kept = [], [], []
        for source in list(self.members):
            if wanted.get(source) != self.members[source].fingerprint:
                with self.lock:
                    member = self.members.pop(source)
                member.stop()
                self.loaded.pop(str(source), None)
                stopped.append(member.name)
            else:
                kept.append(self.members[source].name)
        prepared: list[Member] = []
        for source, fp in wanted.items():        # build and read every new source, then check them together
            if source in self.members or self.failed.get(source) == fp:
                continue
            member = None
            try:
                member = Member(source, str(source), self.args, self.prepare)
                self.check_clash(member, list(self.members.values()) + prepared)
            except known_errors() as exc:
                if member is not None:
                    member.stop()
                errors.append(self.refuse(source, fp, exc, first))
                continue
            prepared.append(member)
        if first and errors:
            for member in prepared:
                member.stop()
            return errors
        for i, member in enumerate(prepared):
            try:
                self.start(member)
            except known_errors() as exc:
                errors.append(self.refuse(member.source, member.fingerprint, exc, first))
                if first:              # the caller stops those started and exits
                    for rest in prepared[i + 1:]:
                        rest.stop()
                    return errors
                continue
            with self.lock:
                self.members[member.source] = member
            self.loaded[str(member.source)] = 1
            started.append(member.name)
        for source in list(self.loaded):
            if Path(source) not in wanted:
                del self.loaded[source]
        if not first:
            self.reloads += 1
            log(f"reloaded: {len(started)} started ({', '.join(started) or '-'}), {len(stopped)} stopped "
                f"({', '.join(stopped) or '-'}), {len(kept)} unchanged")
        return errors

    def refuse(self, source: Path, fp: str, exc: BaseException, first: bool) -> str:
        message = str(exc) if str(exc).startswith(str(source)) else f"{source}: {exc}"
        self.failed[source] = fp
        self.loaded[str(source)] = 0
        if not first:
            self.reload_errors += 1
            log(f"error: reload: {message} (the other specs keep running)")
        return message

    def start(self, member: Member) -> None:
        try:
            member.start(self.args)
        except BaseException:
            member.stop()
            raise
        log(f"{member.name}: attached ({member.bundle.backend}) from {member.source}")

    def check_clash(self, new: Member, others: list[Member]) -> None:
        for other in others:
            if other.name == new.name:
                raise SourceError(f"{new.source} and {other.source} are both named '{new.name}': each spec "
                                  "run together needs a name of its own (its `name:`)")
            same = sorted(exported_names(new.bundle) & exported_names(other.bundle))
            if same:
                raise SourceError(f"{new.source} ({new.name}) and {other.source} ({other.name}) both export "
                                  f"{', '.join(same)}: metric names must differ between specs run together")

    def poll(self) -> None:
        for source, member in list(self.members.items()):
            failure = member.poll()
            if failure:
                log(f"error: {member.name}: {failure}; its probes are detached, the other specs keep running "
                    "(fix it and send SIGHUP, or change its file)")
                member.stop()
                with self.lock:
                    del self.members[source]
                self.failed[source] = member.fingerprint
                self.loaded[str(source)] = 0

    def stop(self) -> None:
        for member in self.members.values():
            member.stop()


class FleetCollector:
    """The metrics of every member, on one endpoint. A spec's metrics appear as they are (names
    are unique across members); each health family appears once, its samples labelled with the
    bundle they are about."""

    def __init__(self, fleet: Fleet):
        self.fleet = fleet

    def collect(self):
        with self.fleet.lock:
            members = list(self.fleet.members.values())
        loaded_now = dict(self.fleet.loaded)      # a copy: a reload may change it meanwhile
        health: dict[str, Metric] = {}
        for member in members:
            for fam in StoreCollector(member.store, member.name, member.bundle.backend).collect():
                if not fam.name.startswith("probec_"):
                    yield fam
                    continue
                merged = health.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type))
                for s in fam.samples:
                    labels = s.labels if "bundle" in s.labels else {"bundle": member.name, **s.labels}
                    merged.samples.append(s._replace(labels=labels))
        yield from health.values()
        loaded = GaugeMetricFamily("probec_source_loaded", "1 for each spec or bundle running, 0 for one that "
                                   "could not be started (see the log).", labels=["source"])
        for source, up in sorted(loaded_now.items()):
            loaded.add_metric([source], up)
        yield loaded
        yield CounterMetricFamily("probec_reloads", "Reloads of the specs (SIGHUP or a change in the folder).",
                                  value=self.fleet.reloads)
        yield CounterMetricFamily("probec_reload_errors", "Specs or bundles a reload could not start.",
                                  value=self.fleet.reload_errors)


def run_many(args, targets: list[str], prepare: Prepare | None) -> int:
    """Run every source of `targets` until signalled; SIGHUP, or a change of a folder's contents,
    reloads them."""
    if getattr(args, "pid_file", None):
        log("error: --pid-file follows one process for one spec; run several specs with --pid or without")
        return 1
    if getattr(args, "otlp", None):
        log("error: --otlp sends one spec's metrics and events; run one collector per spec to use it")
        return 1
    if not discover(targets):
        log(f"error: '{targets[0]}' is not a probec bundle (no manifest.json) and holds no specs (*.yaml) or "
            "bundles (folders with a manifest.json, or NAME.manifest.json files)")
        return 1
    uprobes_need_sys_admin()          # found once, before any thread starts (it forks)
    fleet = Fleet(targets, args, prepare)
    stop = threading.Event()
    hangup = threading.Event()
    received = []

    def on_signal(signum, _frame):
        received.append(signum)
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    old[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: hangup.set())
    exporter = Exporter(collector=FleetCollector(fleet))
    try:
        errors = fleet.reload(first=True)
        if errors:
            for message in errors:
                log(f"error: {message}")
            return 1
        if args.port:
            try:
                port = exporter.serve(args.address, args.port)
            except OSError as exc:
                log(f"error: cannot serve metrics on {args.address}:{args.port}: {exc.strerror or exc}")
                return 1
            log(f"{len(fleet.members)} spec(s) attached; metrics on http://{args.address}:{port}/metrics")
        deadline = time.monotonic() + args.duration if args.duration else None
        next_read = time.monotonic() + args.interval
        while not stop.is_set():
            if deadline and time.monotonic() >= deadline:
                break
            stop.wait(max(0.01, min(next_read - time.monotonic(), 0.5)))
            if hangup.is_set():
                hangup.clear()
                log("SIGHUP: reloading")
                fleet.reload(retry=True)
            if time.monotonic() < next_read:
                continue
            next_read += args.interval
            if fleet.changed():
                fleet.reload()
            fleet.poll()
        return 0
    except Exception as exc:
        if isinstance(exc, known_errors()):
            log(f"error: {exc}")
            return 1
        raise
    finally:
        fleet.stop()
        finish(args, exporter, old, received)
