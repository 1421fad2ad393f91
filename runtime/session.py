"""`probec run` and a bundle's loader.py: load a bundle with its backend's runner, export metrics, stop cleanly
on signals. Takes a built bundle: `probec run SPEC` builds it first (probec/cli.py), so nothing here
imports the compiler."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from ..host.capabilities import run_privileges
from ..host.containers import CgroupTree
from . import events
from .cgroups import CgroupMap, CgroupResolver, KubeletPods, uses_cgroups, uses_kubelet
from .events import EventOutput, EventSink
from .exporter import Exporter, format_edge, label_text
from .manifest import BundleError, MetricInfo, load_bundle
from .options import add_run_arguments
from .store import MetricStore, quantile, quantile_labels
from .watch import BinaryWatch, ProcessTarget, TargetError

UPROBE_KINDS = ("uprobe", "uretprobe", "usdt")


def log(message: str) -> None:
    print(f"probec: {message}", file=sys.stderr, flush=True)


def make_runner(bundle, store, sink, pid: int, bpf_stats: bool = False, btf: str | None = None,
                cgroup_map: CgroupMap | None = None):
    if bundle.backend == "bpftrace":
        from .bpftrace_runner import BpftraceRunner
        if btf:
            raise BundleError("--btf is for core bundles (bpftrace reads the kernel's own BTF)")
        return BpftraceRunner(bundle, store, sink, log=log, cgroup_map=cgroup_map)
    if bundle.backend == "core":
        from .core_runner import CoreRunner
        return CoreRunner(bundle, store, sink, log=log, pid=pid, bpf_stats=bpf_stats or None, btf_path=btf,
                          cgroup_map=cgroup_map)
    if bundle.backend == "bcc":
        if cgroup_map is not None:
            raise BundleError("--cgroup needs the core or bpftrace backend: a bcc program has no cgroup map to fill")
        from .bcc_runner import BccRunner
        return BccRunner(bundle, store, sink, log=log, pid=pid, bpf_stats=bpf_stats or None)
    raise BundleError(f"unknown backend '{bundle.backend}' in {bundle.path}")


def show(store: MetricStore, stream=sys.stderr) -> None:
    """A live view: each histogram's window quantiles and its buckets as bars."""
    lines = []
    for name, state in store.snapshot().items():
        meta = state.meta
        if not meta.histogram:
            total = sum(int(v) for v in state.series.values())
            lines.append(f"{name}: {total}")
            continue
        edges = [e * meta.scale for e in meta.edges]
        by = quantile_labels(meta)
        windows = store.window_buckets(name) or {(): None}
        for group, window in sorted(windows.items(), key=lambda kv: str(kv[0])):
            _show_histogram(lines, name, group, by, window, edges, meta, store.window_s)
    stream.write("\n".join(lines) + "\n\n")
    stream.flush()


def _show_histogram(lines: list[str], name: str, group: tuple, by: list, window, edges: list, meta: MetricInfo,
                    window_s: float) -> None:
    qs = []
    for q in (0.5, 0.95, 0.99):
        v = quantile(q, edges, window) if window else None
        qs.append(f"p{int(q * 100)}={_human(v, meta.unit)}")
    which = ",".join(f"{lab.name}={label_text(v, lab)}" for v, (_, lab) in zip(group, by))
    lines.append(f"{name}{'{' + which + '}' if which else ''}  ({window_s:g}s window)  " + "  ".join(qs))
    if window and sum(window):
        peak = max(window)
        for i, count in enumerate(window):
            if count == 0:
                continue
            le = _human(edges[i], meta.unit) if i < len(edges) else "+Inf"
            bar = "#" * max(1, int(40 * count / peak))
            lines.append(f"  le {le:>9} {count:>9} {bar}")


def _human(v, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "seconds":
        for scale, suffix in ((1, "s"), (1e-3, "ms"), (1e-6, "us")):
            if v >= scale:
                return f"{v / scale:.3g}{suffix}"
        return f"{v * 1e9:.3g}ns"
    return format_edge(round(v, 3))


def known_errors() -> tuple:
    """The failures a run reports as one line (anything else is a probec bug, with its traceback)."""
    from .bpftrace_runner import BpftraceError
    known = (BpftraceError, BundleError, OSError)
    try:
        from .libbpf import BpfError
        known = known + (BpfError,)
    except ImportError:
        pass
    return known


def binary_watch(bundle, store: MetricStore) -> BinaryWatch:
    paths = sorted({p.binary for p in bundle.manifest.probes if p.kind in UPROBE_KINDS and p.binary})
    for p in bundle.manifest.probes:
        if p.kind in UPROBE_KINDS and p.binary:
            store.health.probe_reattached[p.id] = 0
    for path in paths:
        store.health.binary_rewritten[path] = 0
    return BinaryWatch(paths)


def check_binaries(runner, watch: BinaryWatch, store: MetricStore, failed: dict) -> None:
    """A binary replaced on disk gets its probes again (the runner keeps counting the old file while
    processes run it); one changed in place is only reported: nothing can make that safe."""
    replaced, rewritten = watch.check()
    for path in rewritten:
        store.health.binary_rewritten[path] += 1
        if store.health.binary_rewritten[path] == 1:
            log(f"warning: {path} was changed in place (same inode): processes running it may crash and its "
                "probes may fire at the wrong place; deploy by writing a new file and renaming it over "
                "(or rm and copy), never by copying over it")
    for path in replaced:
        try:
            probes = runner.reattach(path, watch.old(path))
        except known_errors() as exc:
            new = watch.pending.get(path)
            if failed.get(path) != new:      # once per new file, retried at every interval
                failed[path] = new
                log(f"error: {path} was replaced on disk, and its probes cannot be attached to the new file "
                    f"(retried at every interval): {exc}")
            continue
        watch.accept(path)
        failed.pop(path, None)
        if not probes:         # only probes of variants not in use sit there
            continue
        for probe in probes:
            store.health.probe_reattached[probe] = store.health.probe_reattached.get(probe, 0) + 1
        log(f"{path} was replaced on disk; {', '.join(probes)} re-attached to the new file")


def check_target(runner, target: ProcessTarget, store: MetricStore, failed: dict) -> None:
    exited, new = target.check()
    health = store.health
    if exited:
        health.target_up = 0
        health.target_exits += 1
        log(f"target process {target.pid} exited"
            + (f"; waiting for a new process id in {target.pid_file}" if target.pid_file else
               "; nothing is traced until probec is restarted (--pid-file follows restarts)"))
    if new is not None:
        pid, started = new
        try:
            runner.retarget(pid)
        except known_errors() as exc:   # it exited before the probes reached it, say: tried at every interval
            if failed.get(pid) != started:
                failed[pid] = started
                log(f"error: cannot follow process {pid} (from {target.pid_file}): {exc}")
            return
        target.follow(pid, started)
        health.target_pid, health.target_up = pid, 1
        log(f"following process {pid} (from {target.pid_file})")


def container_view(bundle, args, health) -> tuple[CgroupResolver | None, CgroupMap | None]:
    """What labels, filters and --cgroup need to know of cgroups, containers and pods (None each
    where the bundle and the options need nothing). Raises BundleError for a --cgroup that is not one."""
    path = getattr(args, "cgroup", None)
    manifest = bundle.manifest
    if not uses_cgroups(manifest) and not path:
        return None, None
    tree = CgroupTree(refresh_s=max(1.0, args.interval))
    if path:
        if tree.root is None:
            raise BundleError("--cgroup: this host has no cgroup v2 hierarchy mounted")
        full = os.path.realpath(path if os.path.isabs(path) else os.path.join(tree.root, path))
        root = os.path.realpath(tree.root)
        if not os.path.isdir(full) or not (full == root or full.startswith(root + "/")):
            raise BundleError(f"--cgroup {path}: not a cgroup v2 folder under {tree.root}")
        path = full
    tree.scan()
    kubelet = None
    if uses_kubelet(manifest):
        url = getattr(args, "kubelet", None)
        if url:
            kubelet = KubeletPods(url, health, log, refresh_s=max(1.0, args.interval) * 10)
            kubelet.fetch()
        else:
            health.kubelet_up = 0
            log("warning: the spec uses pod, namespace or container names, which come from the kubelet's pod list: "
                "without --kubelet URL they stay empty and filters on them match nothing")
    resolver = CgroupResolver(tree, kubelet, grace_s=getattr(args, "cgroup_grace", 300.0))
    needs_map = manifest.cgroups is not None and (manifest.cgroups.matches or path)
    return resolver, (CgroupMap(manifest.cgroups, resolver, path) if needs_map else None)


def run_target(args) -> int:
    target = Path(args.target)
    try:
        bundle = load_bundle(target)
        if args.backend and args.backend != bundle.backend:
            raise BundleError(f"{target} is a {bundle.backend} bundle, not {args.backend}")
    except BundleError as exc:
        log(f"error: {exc}")
        return 1
    refused = run_privileges({p.kind for p in bundle.manifest.probes}).error(bundle.backend)
    if refused:
        log(f"error: {refused}")
        return 1
    target = None
    pid = args.pid
    if getattr(args, "pid_file", None) or pid > 0:
        if getattr(args, "pid_file", None) and pid > 0:
            log("error: --pid and --pid-file exclude each other")
            return 1
        try:
            target = ProcessTarget(pid, getattr(args, "pid_file", None))
        except TargetError as exc:
            log(f"error: {exc}")
            return 1
        pid = target.pid
    store = MetricStore(bundle.manifest, window_s=args.window, log=log)
    try:
        cgroups, cgroup_map = container_view(bundle, args, store.health)
    except BundleError as exc:
        log(f"error: {exc}")
        return 1
    store.cgroups = cgroups
    if target is not None:
        store.health.target_pid, store.health.target_up = target.pid, 1
    watch = binary_watch(bundle, store)
    failed_reattach: dict = {}
    failed_retarget: dict = {}
    events_path = args.events if args.events is not None else (None if args.otlp else "-")
    try:
        sink = EventSink(events_path, bundle.manifest, store.health, log) \
            if bundle.manifest.events and events_path else None
    except OSError as exc:
        log(f"error: cannot write events to {events_path}: {exc.strerror or exc}")
        return 1
    events.CGROUP_VIEW = cgroups
    exporter = Exporter(store, bundle.name, bundle.backend)
    otlp_metrics = spans = None
    if args.otlp:
        try:
            from .otlp import OtlpError, open_otlp
            otlp_metrics, spans = open_otlp(args.otlp, exporter.collector, bundle.manifest, bundle.name,
                                            bundle.backend, store.health, log)
        except OtlpError as exc:
            log(f"error: {exc}")
            if sink is not None:
                sink.close()
            return 1
    output = EventOutput(bundle.manifest, sink, spans) if sink is not None or spans is not None else None
    stop = threading.Event()
    received = []

    def on_signal(signum, _frame):
        received.append(signum)
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    runner = None
    try:
        runner = make_runner(bundle, store, output, pid, args.bpf_stats, getattr(args, "btf", None), cgroup_map)
        runner.start(pid=pid) if bundle.backend == "bpftrace" else runner.start()
        using = runner.describe() if hasattr(runner, "describe") else ""
        attached = f"attached ({bundle.backend})" + (f" using {using}" if using else "")
        if args.port:
            try:
                port = exporter.serve(args.address, args.port)
            except OSError as exc:
                log(f"error: cannot serve metrics on {args.address}:{args.port}: {exc.strerror or exc}")
                return 1
            log(f"{bundle.name}: {attached}; metrics on http://{args.address}:{port}/metrics")
        else:
            log(f"{bundle.name}: {attached}")
        if otlp_metrics is not None:
            otlp_metrics.start(args.otlp_interval)
            log(f"{bundle.name}: metrics{' and events' if spans else ''} also over OTLP to {args.otlp}")
        deadline = time.monotonic() + args.duration if args.duration else None
        next_show = time.monotonic() + 2
        next_read = time.monotonic() + args.interval
        while not stop.is_set():
            if deadline and time.monotonic() >= deadline:
                break
            stop.wait(max(0.01, min(next_read - time.monotonic(), 0.5)))   # wake for signals, read on time
            if time.monotonic() < next_read:
                continue
            next_read += args.interval
            if target is not None:
                check_target(runner, target, store, failed_retarget)
            check_binaries(runner, watch, store, failed_reattach)
            if cgroups is not None:
                cgroups.refresh()
            runner.poll()
            if output is not None:
                output.flush()
            if getattr(runner, "failure", None):
                log(f"error: {runner.failure}")
                return 1
            if args.show and time.monotonic() >= next_show:
                show(store)
                next_show = time.monotonic() + 2
        return 0
    except Exception as exc:  # every runtime failure reaches the user as one clear message
        if isinstance(exc, known_errors()):
            log(f"error: {exc}")
            return 1
        raise
    finally:
        if runner is not None:
            runner.stop()
        if output is not None:
            output.close()          # the last events out (spans sent) before the last metrics
        if otlp_metrics is not None:
            otlp_metrics.close()
        finish(args, exporter, old, received)


def finish(args, exporter: Exporter, old: dict, received: list) -> None:
    """The end of a run, once its runners stopped: the last snapshot, the endpoint closed, the
    signal handlers given back, and why it stopped."""
    if args.snapshot:
        try:
            Path(args.snapshot).write_text(exporter.text())
        except OSError as exc:
            log(f"error: cannot write snapshot {args.snapshot}: {exc.strerror}")
    exporter.close()
    for s, handler in old.items():
        signal.signal(s, handler)
    if received:
        log(f"stopped on {signal.Signals(received[0]).name}; probes detached")


def loader_main(bundle_dir: str, argv: list[str]) -> int:
    """What a core bundle's loader.py and a bcc bundle's program run: `probec run` for this bundle,
    without the compiler."""
    p = argparse.ArgumentParser(prog="loader.py", description=f"Run the probec bundle in {bundle_dir}.")
    add_run_arguments(p)
    args = p.parse_args(argv)
    args.target = bundle_dir
    args.backend = None
    return run_target(args)
