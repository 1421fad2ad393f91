"""`probec promote SPEC`: the bpftrace prototype and the core collector side by side on the live
workload, compared metric by metric, and the production bundle written when they agree.

Here, beside the CLI, because it joins both sides: the compiler builds the two bundles and
compares (compiler/promote/: parity, report, production defaults), the runtime's own runners and
stores run them (SideBySide below). The runtime never imports this.

An edge of the window (see compiler/promote/parity.py): read core, wait for a bpftrace dump that
froze its epoch after that read ended, take it whole (under the runner's dump lock), read core
again. With a traced process (--pid), the process is stopped (SIGSTOP) across the edge, so that
nothing it does lands between the readings: every series it feeds is quiet there, and its counts
compare exactly.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from .compiler.promote.parity import Edge, Hist
from .runtime.exporter import label_text
from .runtime.manifest import load_bundle
from .runtime.session import make_runner
from .runtime.store import OVERFLOW, HistogramSeries, MetricStore

EXIT_OK, EXIT_DIFFERS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
PAUSE_TIMEOUT_S = 2.0  # the longest an edge waits for every thread of the traced process to stop
SETTLE_S = 1.0         # both attached, then this long before the window opens: spans begun before the
                       # later collector attached end meanwhile, and are in neither window


def log(message: str) -> None:
    print(f"probec: {message}", file=sys.stderr, flush=True)


class PromoteError(Exception):
    pass


def snapshot(store: MetricStore) -> dict:
    """A store's metrics as parity snapshots: label values as exported text, raw bucket counts."""
    out = {}
    for name, state in store.snapshot().items():
        labels = state.meta.labels
        series = {}
        for key, value in state.series.items():
            text = tuple(label_text(v, lab) if not (isinstance(v, str) and v == OVERFLOW) else v
                         for v, lab in zip(key, labels))
            series[text] = Hist(list(value.buckets), int(value.sum)) if isinstance(value, HistogramSeries) \
                else int(value)
        out[name] = series
    return out


def health_record(store: MetricStore) -> dict:
    h = store.health
    return {"events_lost": h.events_lost, "backend_restarts": h.backend_restarts,
            "backend_gap_seconds": h.backend_gap_seconds, "program_missed": dict(h.program_missed),
            "span_overflows": dict(h.span_overflows), "span_outside": dict(h.span_outside),
            "map_entries": dict(h.map_entries), "map_capacity": dict(h.map_capacity),
            "events_emitted": dict(h.events_emitted),
            "series_dropped": {n: s.dropped_series for n, s in store.metrics.items() if s.dropped_series}}


def observations(snap: dict) -> int:
    return sum(v.count if isinstance(v, Hist) else int(v) for series in snap.values() for v in series.values())


def threads_stopped(pid: int) -> bool:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True                 # gone: nothing of it runs
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("T", "t", "Z", "X"):
            return False
    return True


class SideBySide:
    """The prototype's and core's runners over two built bundles, one process (or every one)."""

    def __init__(self, prototype_dir, core_dir, pid: int = -1, log=None, stop: threading.Event | None = None):
        self.log = log or (lambda m: print(f"probec: {m}", file=sys.stderr, flush=True))
        self.pid = pid
        self.stop = stop or threading.Event()
        self.bundles = {"bpftrace": load_bundle(prototype_dir), "core": load_bundle(core_dir)}
        self.stores = {b: MetricStore(bundle.manifest, log=self._log_for(b)) for b, bundle in self.bundles.items()}
        self.runners: dict[str, object] = {}
        self.paused = False

    def _log_for(self, backend: str):
        label = "prototype" if backend == "bpftrace" else "core"
        return lambda m: self.log(f"{label}: {m}")

    # -- start and stop ------------------------------------------------------------------------
    def start(self) -> None:
        """Attach both: the prototype first (bpftrace takes seconds), then core."""
        for backend in ("bpftrace", "core"):
            runner = make_runner(self.bundles[backend], self.stores[backend], None, self.pid)
            runner.log = self._log_for(backend)
            self.runners[backend] = runner
            runner.start(pid=self.pid) if backend == "bpftrace" else runner.start()

    def close(self) -> None:
        self.resume()
        for runner in reversed(list(self.runners.values())):
            try:
                runner.stop()
            except Exception as exc:    # the other one must still be stopped
                self.log(f"warning: stopping a collector failed: {exc}")

    # -- the traced process --------------------------------------------------------------------
    def pause(self) -> bool:
        if self.pid <= 0:
            return False
        try:
            os.kill(self.pid, signal.SIGSTOP)
        except ProcessLookupError:
            raise PromoteError(f"the traced process {self.pid} exited") from None
        self.paused = True
        deadline = time.monotonic() + PAUSE_TIMEOUT_S
        while not threads_stopped(self.pid):
            if time.monotonic() > deadline:
                self.log(f"warning: process {self.pid} did not stop within {PAUSE_TIMEOUT_S:g}s "
                         "(a thread in the kernel); the edge is read while it runs")
                break
            time.sleep(0.002)
        return True

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            try:
                os.kill(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    # -- reading -------------------------------------------------------------------------------
    def read_core(self) -> tuple[dict, int, int]:
        core = self.runners["core"]
        began = time.monotonic_ns()
        core.poll()
        ended = time.monotonic_ns()
        if core.failure:
            raise PromoteError(f"core: {core.failure}")
        return snapshot(self.stores["core"]), began, ended

    def dump_after(self, after_ns: int) -> tuple[dict, int, dict]:
        """The first whole bpftrace dump that froze its epoch after `after_ns` (monotonic ns)."""
        runner = self.runners["bpftrace"]
        limit = runner.settings.interval_ms / 1000 * 3 + 5
        deadline = time.monotonic() + limit
        with runner.dumped:
            while runner.flipped_ns <= after_ns:
                if self.stop.is_set():
                    raise KeyboardInterrupt
                if runner.proc is None or runner.proc.poll() is not None or time.monotonic() > deadline:
                    raise PromoteError("prototype: bpftrace gave no map dump in "
                                       f"{limit:.0f}s" + (f": {runner.failure}" if runner.failure else ""))
                runner.dumped.wait(0.1)
            return snapshot(self.stores["bpftrace"]), runner.flipped_ns, health_record(self.stores["bpftrace"])

    def edge(self, pause: bool) -> Edge:
        paused = pause and self.pause()
        try:
            before, _, before_end = self.read_core()
            proto, flipped, proto_health = self.dump_after(before_end)
            after, after_began, _ = self.read_core()
        finally:
            self.resume()
        return Edge(proto, before, after, {"bpftrace": proto_health, "core": health_record(self.stores["core"])},
                    paused, flipped, (before_end, after_began))

    def window(self, seconds: float, start: Edge, progress) -> bool:
        """Keep both running for `seconds`, reading core and watching bpftrace every half second;
        progress(left, prototype events, core events) every second. False when stopped early."""
        deadline = time.monotonic() + seconds
        base = {"bpftrace": observations(start.prototype), "core": observations(start.core_before)}
        next_show = 0.0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            if self.stop.wait(min(0.5, left)):
                return False
            if self.pid > 0 and not os.path.exists(f"/proc/{self.pid}"):
                raise PromoteError(f"the traced process {self.pid} exited during the window: nothing to compare "
                                   "after it (--pid-file does not follow a restart here)")
            core = self.runners["core"]
            core.poll()
            if core.failure:
                raise PromoteError(f"core: {core.failure}")
            bt = self.runners["bpftrace"]
            bt.poll()
            if bt.failure:
                raise PromoteError(f"prototype: {bt.failure}")
            if time.monotonic() >= next_show:
                with bt.dumped:
                    seen = observations(snapshot(self.stores["bpftrace"])) - base["bpftrace"]
                progress(max(0.0, deadline - time.monotonic()), seen,
                         observations(snapshot(self.stores["core"])) - base["core"])
                next_show = time.monotonic() + 1.0


def parse_duration(text: str) -> float | None:
    """`60s`, `5m`, `1h`, `500ms` or a bare number of seconds."""
    text = text.strip()
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(suffix) and text[: -len(suffix)].replace(".", "", 1).isdigit():
            return float(text[: -len(suffix)]) * scale
    return float(text) if text.replace(".", "", 1).isdigit() else None


def promote(args) -> int:
    from .compiler.diagnostics import render_text
    from .compiler.driver import build_bundle, check_file
    seconds = parse_duration(args.for_)
    if seconds is None or seconds <= 0:
        log(f"error: --for {args.for_!r} is not a duration (60s, 5m, 90)")
        return EXIT_USAGE
    if args.pid > 0 and args.pid_file:
        log("error: --pid and --pid-file exclude each other")
        return EXIT_USAGE
    if os.geteuid() != 0:
        log("error: promote loads both collectors: it needs root (or CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN)")
        return EXIT_DIFFERS
    pid = args.pid
    if args.pid_file:
        from .runtime.watch import ProcessTarget, TargetError
        try:
            pid = ProcessTarget(-1, args.pid_file).pid
        except TargetError as exc:
            log(f"error: {exc}")
            return EXIT_DIFFERS
    elif pid > 0 and not Path(f"/proc/{pid}").exists():
        log(f"error: no running process {pid} to trace")
        return EXIT_DIFFERS

    # The prototype's kernel: span variant is chosen here, at build, and must be one bpftrace attaches;
    # the production bundle chooses at load time, whatever this chose.
    result = check_file(args.spec, backend="bpftrace")
    if result.program is None:
        sys.stderr.write(render_text(result.diagnostics.sorted(), result.sources))
        return EXIT_DIFFERS
    from .compiler.promote.production import metric_facts, production_check
    prototype = build_bundle(result, "bpftrace", interval_ms=max(50, int(args.interval * 1000)))
    production, defaults = production_check(result, args.events_rate)
    core = build_bundle(production, "core") if production.program is not None else None
    sys.stderr.write(render_text(result.diagnostics.sorted(), result.sources))
    sys.stderr.write(render_text([d for d in production.diagnostics.sorted() if d.severity.name == "ERROR"],
                                 production.sources))
    if prototype is None or core is None:
        return EXIT_DIFFERS
    name = result.program.name
    out = Path(args.output or f"{name}.core")
    report_path = Path(args.report or f"{name}.parity.json")
    work = Path(tempfile.mkdtemp(prefix=f"probec-promote-{name}-"))
    try:
        prototype.write(work / "prototype")
        core.write(work / "core")
        from .runtime.exporter import format_edge
        facts = metric_facts(production.program, prototype.manifest, format_edge)
        return _run(args, seconds, pid, work, facts, defaults, name, out, report_path, core, production)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args, seconds, pid, work, facts, defaults, name, out, report_path, core_bundle, production) -> int:
    from .compiler.promote.parity import compare
    from .compiler.promote.production import map_use
    from .compiler.promote.report import report_json, report_text
    from .runtime.session import known_errors
    stop = threading.Event()

    def on_signal(_signum, _frame):
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    pair = None
    try:
        pair = SideBySide(work / "prototype", work / "core", pid, log=log, stop=stop)
        log(f"{name}: attaching the prototype (bpftrace) and core" + (f" to process {pid}" if pid > 0 else ""))
        pair.start()
        if stop.wait(SETTLE_S):
            raise KeyboardInterrupt
        pause = pid > 0 and not args.no_pause
        start = pair.edge(pause)
        log(f"window open: {seconds:g}s, both collectors attached" + (", process paused at each edge" if pause else ""))
        tty = sys.stderr.isatty()

        def progress(left, proto, core):
            line = f"promote: {left:4.0f}s left; events so far: prototype {proto:,}, core {core:,}"
            if tty:
                sys.stderr.write("\r" + line + "   ")
            elif int(left) % 5 == 0 or left < 1:
                sys.stderr.write(line + "\n")
            sys.stderr.flush()

        opened = time.monotonic()
        finished = pair.window(seconds, start, progress)
        if not finished:
            raise KeyboardInterrupt
        end = pair.edge(pause)
        window_s = time.monotonic() - opened
        if tty:
            sys.stderr.write("\n")
    except KeyboardInterrupt:
        log("interrupted: both collectors detached, the process resumed; nothing written")
        return EXIT_INTERRUPTED
    except PromoteError as exc:
        log(f"error: {exc}")
        return EXIT_DIFFERS
    except Exception as exc:
        if isinstance(exc, known_errors()):
            log(f"error: {exc}")
            return EXIT_DIFFERS
        raise
    finally:
        if pair is not None:
            pair.close()
        for s, handler in old.items():
            signal.signal(s, handler)
    parity = compare(facts, start, end)
    parity.window_s = window_s
    parity.notes.extend(map_use(end.health.get("core", {}), production.program))
    about = {"spec": name, "pid": pid if pid > 0 else None, "paused": start.paused and end.paused,
             "production_defaults": defaults}
    text = report_text(parity, about)
    sys.stdout.write(text)
    try:
        report_path.write_text(report_json(parity, facts, start, end, about))
    except OSError as exc:
        log(f"error: cannot write the parity report {report_path}: {exc.strerror or exc}")
        return EXIT_DIFFERS
    if not parity.ok:
        log(f"the prototype and core disagree: no production bundle written; the report is {report_path}")
        return EXIT_DIFFERS
    try:
        core_bundle.write(out)
        (out / "parity.txt").write_text(text)
        shutil.copyfile(report_path, out / "parity.json")
        from .compiler.monitoring.rules import render_rules
        (out / "rules.yml").write_text(render_rules(production.spec, production.program, name))
    except OSError as exc:
        log(f"error: cannot write the production bundle to {out}: {exc.strerror or exc}")
        return EXIT_DIFFERS
    log(f"promoted: production bundle in {out} (run it with 'python {out}/loader.py' or 'probec run {out}')")
    for d in defaults:
        log(f"production default: {d}")
    return EXIT_OK

