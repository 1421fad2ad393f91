"""What the kernel benchmarks share: building bundles and hand-written objects, starting and
stopping `probec run`, loading our own objects through runtime/libbpf/, timing a workload
process, and writing a result file with the machine header.

Run every benchmark that loads eBPF under the project's kernel lock, held for the whole run:
    flock /tmp/probec-kernel.lock python benchmarks/span_overhead.py
(`benchmarks/run_all.sh` takes it once for all of them). The scripts never take it themselves, so
that the smoke tests, which run under a lock their caller holds, can run them.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
SPECS = BENCH / "specs"
HANDWRITTEN = BENCH / "handwritten"
RESULTS = BENCH / "results"
WORKLOADS = ROOT / "tests" / "workloads" / "build"
LOCK = "/tmp/probec-kernel.lock"

# A real install has bytecode caches; this sandbox may set PYTHONDONTWRITEBYTECODE.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_dir() -> Path:
    """Scratch space for objects, bundles and the load generator (git-ignored, recreated)."""
    d = Path(os.environ.get("PROBEC_BENCH_BUILD", BENCH / "build"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def check_lock() -> None:
    """Warn when nobody holds the kernel lock: other kernel work may perturb the numbers."""
    try:
        fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return                      # held (by our caller, as it should be)
    finally:
        os.close(fd)
    log(f"warning: {LOCK} is not held; run under `flock {LOCK} ...` so no other kernel work perturbs this")


def require_root() -> None:
    if os.geteuid() != 0:
        sys.exit("this benchmark loads eBPF programs: run it as root")


def ensure_workloads() -> None:
    subprocess.run(["make", "-s", "-C", str(ROOT / "tests" / "workloads")], check=True)


# --- statistics and text -----------------------------------------------------------------------
def median(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def spread(xs) -> str:
    """min..max of a sample, for the tables (how noisy the medians are)."""
    xs = list(xs)
    return f"{min(xs):,.0f}..{max(xs):,.0f}" if xs else "-"


def fmt_ns(x: float) -> str:
    return "-" if x != x else f"{x:,.0f}"


def fmt_ratio(a: float, b: float) -> str:
    return "-" if not b or a != a or b != b else f"{a / b:.2f}x"


def header(title: str, script: str, quick: bool) -> list[str]:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = open("/proc/loadavg").read().split()[:3]
    except OSError:
        load = ["?"]
    bpftrace = ""
    try:
        bpftrace = subprocess.run(["bpftrace", "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    try:
        libbpf = __import__("probec.runtime.libbpf", fromlist=["libbpf_version"]).libbpf_version()
    except Exception:
        libbpf = "?"
    lines = [f"# {title}", "",
             f"- Machine: {platform.node()}, {os.cpu_count()} CPUs ({cpu}), kernel {platform.release()}",
             f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; load average at start "
             f"{' '.join(load)}",
             f"- Tools: Python {platform.python_version()}, libbpf {libbpf}, {bpftrace or 'no bpftrace'}, "
             f"{_clang_version()}",
             f"- Tree: {_tree_state()}",
             f"- Produced by `benchmarks/{script}`{' --quick (smoke run: too short to quote)' if quick else ''}"
             f" under `flock {LOCK}`."]
    return lines


def _tree_state() -> str:
    """The commit measured, and which files that shape the numbers differ from it (read-only git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", "compiler", "runtime", "templates"],
                                capture_output=True, text=True, cwd=ROOT).stdout.split("\n")
    except OSError:
        return "unknown"
    changed = [line[3:] for line in status if line.strip()]
    return f"commit {head}" + (f" with uncommitted changes in {', '.join(changed)}" if changed else " (clean in "
                                                                                                    "compiler/, runtime/, templates/)")


def _clang_version() -> str:
    try:
        out = subprocess.run(["clang", "--version"], capture_output=True, text=True).stdout
        m = re.search(r"clang version (\S+)", out)
        return f"clang {m.group(1)}" if m else "clang ?"
    except OSError:
        return "no clang"


def write_result(name: str, lines: list[str], quick: bool) -> Path:
    """results/NAME.md for a full run; a quick run writes to the build folder (never over results)."""
    text = "\n".join(lines).rstrip() + "\n"
    target = (build_dir() / f"{name}.quick.md") if quick else (RESULTS / f"{name}.md")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    print(text)
    log(f"wrote {target}")
    return target


# --- building -----------------------------------------------------------------------------------
def build_bundle(spec: Path, backend: str, placement: str = "auto", compile: bool = True,
                 task_storage: bool = True) -> Path:
    """Build SPEC for BACKEND (cached under build/bundles by a hash of every input), in this process, through the same driver calls as
    `probec build` (check_file + build_bundle). placement='entry' lowers with
    LoweringOptions(placement="entry") (no CLI flag reaches it) to force uprobes onto the symbol;
    compile=False is `probec build --no-compile` (C and manifest only); task_storage=False is core's
    `--begin-map hash`."""
    from probec.compiler.diagnostics import Diagnostics, render_text
    from probec.compiler.driver import CheckResult, build_bundle as driver_build, check_file
    from probec.compiler.ir.host import HostInfo
    from probec.compiler.ir.lowering import LoweringOptions, lower
    from probec.compiler.spec.loader import load_spec_file
    cached = _bundle_cache(spec, backend, placement, compile, task_storage)
    if cached.exists():
        return cached
    out = cached.with_name(cached.name + f".tmp{os.getpid()}")
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    if placement == "auto":
        result = check_file(str(spec))
    else:
        diags = Diagnostics()
        parsed, text = load_spec_file(str(spec), diags)
        result = CheckResult(str(spec), diags, text, parsed, sources={str(spec): text})
        if parsed is not None and not diags.has_errors():
            result.program = lower(parsed, diags, LoweringOptions(host=HostInfo(), placement=placement))
    options = {"compile": compile, "task_storage": task_storage} if backend == "core" else {}
    bundle = driver_build(result, backend, **options) if result.program is not None else None
    if bundle is None:
        raise RuntimeError(f"building {spec.name} for {backend} (placement {placement}) failed:\n"
                           + render_text(result.diagnostics.sorted(), result.sources))
    bundle.write(out)
    try:
        os.replace(out, cached)
    except OSError:
        if not cached.is_dir():     # not another benchmark having built the same bundle first
            raise
        subprocess.run(["rm", "-rf", str(out)], check=True)
    return cached


def _bundle_cache(spec: Path, backend: str, placement: str, compile: bool, task_storage: bool = True) -> Path:
    """Where a build of these exact inputs lives: the spec, every compiler, host-facts and template source,
    the kernel and the workload binaries. Any change to the generator gives a new folder."""
    import hashlib
    h = hashlib.sha256()
    h.update(f"{backend}|{placement}|{compile}|{task_storage}|{platform.release()}|{spec.resolve()}".encode())
    h.update(spec.read_bytes())
    for base, pattern in ((ROOT / "compiler", "**/*.py"), (ROOT / "compiler", "**/*.lark"),
                          (ROOT / "host", "**/*.py"), (ROOT / "templates", "**/*")):
        for f in sorted(base.glob(pattern)):
            if f.is_file() and "__pycache__" not in f.parts:
                h.update(str(f.relative_to(ROOT)).encode())
                h.update(f.read_bytes())
    for f in sorted(WORKLOADS.glob("*.so")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    d = build_dir() / "bundles"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{spec.stem}.{backend}.{placement}.{h.hexdigest()[:16]}"


def probe_offsets(bundle: Path) -> list[tuple[str, str, int]]:
    import json
    m = json.loads((bundle / "manifest.json").read_text())
    return [(p["kind"], p.get("symbol") or p.get("name") or "", p.get("offset", 0)) for p in m["probes"]]


CLANG_FLAGS = ["-O2", "-g", "-target", "bpf", "-mcpu=v3", "-D__TARGET_ARCH_x86", "-Wall", "-Werror"]


def compile_handwritten(name: str) -> Path:
    """benchmarks/handwritten/NAME.bpf.c -> build/NAME.bpf.o, against this kernel's vmlinux.h (the
    same cached header and the same clang flags the core backend uses)."""
    from probec.compiler.backends.core.toolchain import vmlinux_header
    out_dir = build_dir() / "handwritten"
    out_dir.mkdir(parents=True, exist_ok=True)
    vm = out_dir / "vmlinux.h"
    if not vm.exists():
        try:
            vm.symlink_to(vmlinux_header().resolve())
        except FileExistsError:     # another benchmark run side by side made it first
            pass
    src = HANDWRITTEN / f"{name}.bpf.c"
    obj = out_dir / f"{name}.bpf.o"
    newest = max(p.stat().st_mtime for p in [*HANDWRITTEN.glob("*.h"), src, Path(__file__)])
    if obj.exists() and obj.stat().st_mtime > newest:
        return obj
    cmd = ["clang", *CLANG_FLAGS, f"-I{out_dir}", f"-I{HANDWRITTEN}", "-idirafter", "/usr/include/x86_64-linux-gnu",
           "-c", str(src), "-o", str(obj)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"clang failed on {src}:\n{r.stderr}")
    return obj


def compile_loadgen() -> Path:
    out = build_dir() / "loadgen"
    src = BENCH / "loadgen.c"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(out), str(src), "-ldl"], check=True)
    return out


# --- running ------------------------------------------------------------------------------------
class ProbecRun:
    """`probec run BUNDLE` as a user runs it, in its own process; ready once it says 'attached'."""

    def __init__(self, bundle: Path, port: int = 0, interval: float = 1.0, events: str | None = None,
                 snapshot: Path | None = None, timeout: float = 60):
        self.bundle = bundle
        self.snapshot = snapshot
        cmd = [sys.executable, "-m", "probec", "run", str(bundle), "--port", str(port), "--interval", str(interval)]
        if events:
            cmd += ["--events", events]
        if snapshot:
            cmd += ["--snapshot", str(snapshot)]
        self.cmd = cmd
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.stderr: list[str] = []
        self.ready = threading.Event()

    def _reader(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip("\n"))
            if "attached" in line:
                self.ready.set()
        self.ready.set()

    def __enter__(self) -> "ProbecRun":
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     cwd=ROOT, env=ENV)
        threading.Thread(target=self._reader, daemon=True).start()
        if not self.ready.wait(self.timeout) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"probec run {self.bundle} did not attach:\n" + "\n".join(self.stderr[-20:]))
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> int:
        """SIGINT (detach, final read, snapshot), as a user stops it; the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()          # our own child, by its pid
                self.proc.wait()
        return self.proc.returncode

    def __exit__(self, *exc) -> None:
        self.stop()


class Handwritten:
    """One of our hand-written objects loaded in this process through runtime/libbpf/."""

    def __init__(self, obj_path: Path, programs: list[str], attach):
        self.obj_path = obj_path
        self.programs = programs
        self.attach_fn = attach
        self.obj = None

    def __enter__(self) -> "Handwritten":
        from probec.runtime import libbpf as L
        obj = L.BpfObject.open(self.obj_path)
        try:
            for name in obj.programs:
                obj.set_autoload(name, name in self.programs)
            obj.load()
            self.attach_fn(obj)
        except BaseException:
            obj.close()
            raise
        self.obj = obj
        return self

    def __exit__(self, *exc) -> None:
        if self.obj is not None:
            self.obj.close()
            self.obj = None


def attach_uprobe_pair(binary: Path, symbol: str, offset: int = 0):
    def attach(obj) -> None:
        obj.program("uprobe_begin").attach_uprobe(str(binary), symbol, offset)
        obj.program("uprobe_end").attach_uprobe(str(binary), symbol, offset, retprobe=True)
    return attach


def attach_getpid_pair(obj) -> None:
    obj.program("getpid_begin").attach_tracepoint("syscalls", "sys_enter_getpid")
    obj.program("getpid_end").attach_tracepoint("syscalls", "sys_exit_getpid")


def hist_count(obj) -> int:
    """Spans counted by a hand-written object (sum of its per-CPU bucket counts)."""
    values = obj.map("hist").lookup(b"\0\0\0\0")
    total = 0
    for v in values:
        total += sum(int.from_bytes(v[i:i + 8], "little") for i in range(0, 22 * 8, 8))
    return total


def time_workload(argv: list[str]) -> tuple[int, int]:
    """(wall ns, CPU ns) of one run of a workload process: CLOCK_MONOTONIC around spawn..reap, and
    the child's user+sys time from wait4 (which leaves out time other processes took the CPU)."""
    wall, cpu, _ = run_workload(argv)
    return wall, cpu


def run_workload(argv: list[str]) -> tuple[int, int, int]:
    """time_workload's (wall ns, CPU ns), and the context switches of the workload's threads
    (voluntary + involuntary, from the same wait4)."""
    t0 = time.perf_counter_ns()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    _, status, ru = os.wait4(proc.pid, 0)
    t1 = time.perf_counter_ns()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} exited {proc.returncode}")
    return t1 - t0, int((ru.ru_utime + ru.ru_stime) * 1e9), ru.ru_nvcsw + ru.ru_nivcsw


def count_lines(path: Path) -> int:
    """Lines in a file (0 when it is missing), read in 1 MiB chunks: event files get large."""
    n = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                n += chunk.count(b"\n")
    except FileNotFoundError:
        pass
    return n


def metrics_text(port: int, timeout: float = 10) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        return r.read().decode()


def metric_value(text: str, name: str, labels: str = "") -> float | None:
    """The value of `name{labels}` in Prometheus text (labels: the exact inside of the braces)."""
    want = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == want:
            return float(value)
    return None


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


QUICK = False


def quick_flag(argv: list[str] | None = None) -> bool:
    """--quick: the smoke-test mode (tiny counts, short pauses). Sets QUICK for settle()."""
    global QUICK
    QUICK = "--quick" in (sys.argv[1:] if argv is None else argv)
    return QUICK


def settle(seconds: float) -> None:
    """A pause for things to settle (attach, drain); a tenth of it under --quick."""
    time.sleep(seconds / 10 if QUICK else seconds)


def scratch(prefix: str) -> Path:
    """A fresh folder for this run's snapshots, removed when the script exits."""
    import atexit
    import shutil
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=build_dir()))
    atexit.register(shutil.rmtree, d, True)
    return d
