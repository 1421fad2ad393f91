"""A mutation fuzzer over the shipped specs: bad input gets a diagnostic, and what `check` accepts builds.

Each case is a shipped spec (specs/*.yaml, examples/*/spec.yaml, tests/errors/*.yaml) with one to
three mutations: YAML structure (keys dropped, duplicated, renamed, added; values of the wrong
type; deep nesting; lines moved or cut) and scalar values (numbers at the edges of 64 bits and past
Python's digit limit, `_`, unicode, control characters, invalid UTF-8, names at length limits,
reserved words, expressions nested a thousand deep). Cases come from `random.Random` seeded with
the run's seed and the case number, so a seed names the same cases on every machine.

Each case runs in a forked process through the functions the CLI uses (`check --no-host --kernel
any`, then `build` for both backends) and must:
- never raise (a traceback is a finding);
- finish `check` within CHECK_LIMIT_S (the process is killed past it: a hang is a finding);
- give every diagnostic a `file:line:col`;
- when `check` accepts it, build under core (C compiled by clang) and bpftrace (the script
  generated; with --bpftrace-parse also parsed by `bpftrace -d`, which needs root).

`make fuzz` runs this file (FUZZ_SEED, FUZZ_CASES, FUZZ_JOBS from the environment);
tests/test_fuzz.py runs a few hundred cases with a fixed seed.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import multiprocessing.connection
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHECK_LIMIT_S = 5.0
BUILD_LIMIT_S = 120.0


def seed_files() -> list[Path]:
    return sorted([*ROOT.glob("specs/*.yaml"), *ROOT.glob("examples/*/spec.yaml"),
                   *ROOT.glob("tests/errors/*.yaml")])


# -- what to put in -----------------------------------------------------------------------------

BIG = "9" * 5000
NUMBERS = ["0", "1", "-1", "_", "1_", "_1", "00", "007", "0x", "0x" + "f" * 17, "0xffffffffffffffff",
           str(2 ** 31 - 1), str(2 ** 31), str(2 ** 32), str(2 ** 63 - 1), str(2 ** 63), str(2 ** 64 - 1),
           str(2 ** 64), "99999999999999999999", BIG, "1e20", "1.5", "0.0", ".5", "nan", "inf", "-0",
           "1" + "0" * 30, "١٢٣", "²"]
EDGES = [str(2 ** 64 - 1), str(2 ** 64 - 2), str(2 ** 63), str(2 ** 32), "4294967295", "65535", "1000000000",
         "999999999999", "0", "1", "2", "64", "65"]
UNITS = ["ns", "us", "ms", "s", "min", "h", "B", "KB", "MiB", "GiB", "", "x"]
STRINGS = ["", " ", "~", "null", "true", "no", "é", "名前", "\u202e", "\x00", "\x07", "\t", "a\nb", "'", '"',
           "\\", "*/", "${HOME}", "$(id)", "{", "}", "#", ": ", "- ", "a" * 15, "a" * 16, "a" * 63, "a" * 64,
           "a" * 128, "a" * 255, "a" * 256, "a" * 5000]
RESERVED = ["vmlinux", "main", "__pad0", "_", "__", "int", "struct", "char", "if", "return", "BEGIN", "END",
            "args", "retval", "pid", "comm", "duration", "nsecs", "probec_events_total", "probec_up", "__name__",
            "le", "quantile", "part", "calls", "calls_total", "x_sum", "x_count", "x_bucket", "total", "count",
            "inference", "bpf", "map", "sizeof", "self", "None", "def", "import", "A" * 250]
EXPRESSIONS = ["(" * 1000 + "pid" + ")" * 1000, "not " * 1000 + "pid", "not " * 260 + "pid", "pid" + " + pid" * 3000,
               "(" * 60 + "pid" + ")" * 60, "duration > 99999999999999999999h", f"pid > {BIG}",
               "pid == 18446744073709551615", "pid == 18446744073709551616", "comm == \"" + "a" * 300 + "\"",
               "comm == \"\\x\"", "socket(args.fd)", "socket(retval)", "active(inference)", "arg99999999999",
               "arg" + BIG, "args.__pad0", "retval / 0", "pid % 0", "1/0", "-" * 500 + "1", "\"\" == \"\"",
               "duration > 0.000000000000000000000000001ns", "5" + "." + "5" * 5000 + "ms"]
SPECIALS = ["exp2(_, 1s)", "exp2(1ns, 1000h)", "exp2(1ns, 18446744073709551615ns)", "linear(0, 1s, 64)",
            "linear(18446744073709551615, 1, 2)", "linear(0, 0, 0)", "[1, 18446744073709551616]",
            "1/18446744073709551615", "1/18446744073709551616", "at most 99999999999999999999/s",
            f"1/{BIG}", "1/0", "all", "1/2" + " " * 100_000 + "x", "at most" + " " * 100_000 + "1/s", "profile:hz:0", "profile:hz:99999", "profile:hz:²", "interval:s:0",
            f"interval:ms:{BIG}", "uprobe:/bin/true:main+0123", f"uprobe:/bin/true:main+{BIG}",
            "uprobe:/dev/zero:main", "tracepoint:" + "a" * 300 + ":b", "usdt:/bin/true:p:n", "1MiB", "3MiB",
            "4096", "18446744073709551615B", "18446744073709551616B", "0", "1 KiB", "1e3"]
WRONG_TYPES = [None, True, 0, [], {}, ["a", "b"], {"a": 1}, [[[]]], {"span": None}]


EXPRESSION_KEYS = ("filter", "when", "key", "end_key", "histogram", "sum")
NAMED_SECTIONS = ("metrics", "spans", "events", "binaries", "parts")


def interesting_scalar(rng: random.Random, old: str, pool: str = "") -> object:
    pool = pool or rng.choices(("number", "quantity", "string", "reserved", "expression", "special", "digits"),
                               (10, 5, 10, 10, 15, 15, 35))[0]
    if pool == "number":
        return rng.choice(NUMBERS)
    if pool == "quantity":
        return rng.choice(NUMBERS[:24]) + rng.choice(UNITS)
    if pool == "string":
        return rng.choice(STRINGS)
    if pool == "reserved":
        return rng.choice(RESERVED)
    if pool == "expression":
        return rng.choice(EXPRESSIONS)
    if pool == "special":
        return rng.choice(SPECIALS)
    # the same value with its first run of digits replaced: exp2(1us, 16s) -> exp2(1us, 2^64 s)
    digits = [i for i, ch in enumerate(old) if ch.isdigit()]
    if not digits:
        return old + rng.choice(("_", "0", " ", "\x01", "é"))
    start = end = rng.choice(digits)
    while start > 0 and old[start - 1].isdigit():
        start -= 1
    while end < len(old) and old[end].isdigit():
        end += 1
    return old[:start] + rng.choice(NUMBERS + EDGES) + old[end:]


# -- mutations ----------------------------------------------------------------------------------

def _paths(tree, limit: int = 5000) -> list[tuple[tuple, object]]:
    """(path, value) pairs of a loaded YAML tree, at most `limit`; a path is a tuple of keys and
    indexes. Iterative: a mutated tree may be thousands of levels deep."""
    out, stack = [], [((), tree)]
    while stack and len(out) < limit:
        path, value = stack.pop()
        out.append((path, value))
        if isinstance(value, dict):
            stack += [(path + (k,), v) for k, v in reversed(list(value.items()))]
        elif isinstance(value, list):
            stack += [(path + (i,), v) for i, v in reversed(list(enumerate(value)))]
    return out


def _parent(tree, path):
    for step in path[:-1]:
        tree = tree[step]
    return tree


def _replace(tree, path, value):
    if not path:
        return value
    _parent(tree, path)[path[-1]] = value
    return tree


def mutate_tree(rng: random.Random, tree, donors: list) -> tuple[object, str]:
    """One structural or value mutation of a loaded spec; returns the tree and what was done."""
    paths = _paths(tree)
    op = rng.choices(("digits", "expression", "name", "scalar", "type", "drop", "add", "rename", "nest", "donor",
                      "list"), (25, 15, 10, 15, 5, 8, 5, 3, 3, 8, 3))[0]
    # Most mutations aim where a spec stays valid, so that `check` accepts many and the builds
    # get tested: numbers where numbers are, expressions where expressions are, names of things.
    aimed = {
        "digits": [(p, v) for p, v in paths if isinstance(v, str) and any(ch.isdigit() for ch in v)],
        "expression": [(p, v) for p, v in paths if isinstance(v, str) and p and (
            p[-1] in EXPRESSION_KEYS or (len(p) > 1 and p[-2] in ("labels", "fields")))],
        "name": [(p, v) for p, v in paths if len(p) >= 2 and p[-2] in NAMED_SECTIONS
                 or len(p) >= 3 and p[-3] in ("labels", "fields") and isinstance(p[-1], str)
                 or p == ("name",)],
    }.get(op)
    path, value = rng.choice(aimed or paths)
    where = ".".join(str(p) for p in path) or "(root)"
    if op == "digits" and aimed:
        new = interesting_scalar(rng, value, "digits")
        return _replace(tree, path, new), f"{where} = {_short(new)}"
    if op == "expression" and aimed:
        new = rng.choice(EXPRESSIONS + [f"({value}) and ({value})", f"not ({value})",
                                        "not " * rng.choice((63, 64, 65, 260)) + f"({value})",
                                        " and ".join([f"({value})"] * rng.choice((30, 70, 300)))])
        return _replace(tree, path, new), f"{where} = {_short(new)}"
    if op == "name" and path == ("name",):    # the spec's own name: file names and C identifiers come from it
        new = rng.choice(RESERVED + ["a" * n for n in (63, 64, 200, 250, 255, 256)])
        return _replace(tree, path, new), f"name = {_short(new)}"
    if op == "name" and aimed:
        op = "rename"
    if op == "scalar" or (op in ("drop", "rename") and not path):
        new = interesting_scalar(rng, value if isinstance(value, str) else str(value))
        return _replace(tree, path, new), f"{where} = {_short(new)}"
    if op == "type":
        new = rng.choice(WRONG_TYPES)
        return _replace(tree, path, new), f"{where} = {new!r}"
    if op == "drop":
        parent = _parent(tree, path)
        del parent[path[-1]]
        return tree, f"drop {where}"
    if op == "add":
        target = value if isinstance(value, dict) else _parent(tree, path) if path else tree
        if isinstance(target, dict):
            key = rng.choice(RESERVED + ["unknown", "filter", "within", "labels", "buckets", "sample", "key"])
            target[key] = interesting_scalar(rng, "")
            return tree, f"add {key} at {where}"
        if isinstance(target, list):
            target.append(interesting_scalar(rng, ""))
            return tree, f"append at {where}"
        return tree, "nothing"
    if op == "rename" and isinstance(_parent(tree, path), dict):
        parent = _parent(tree, path)
        name = rng.choice(RESERVED + STRINGS[:20] + [f"{path[-1]}_total", f"{path[-1]}_sum", "a" * 200])
        items = [(name if k == path[-1] else k, v) for k, v in parent.items()]
        parent.clear()
        parent.update(items)
        return tree, f"rename {where} -> {_short(name)}"
    if op == "nest":
        depth = rng.choice((30, 200, 2000))
        new = value
        for _ in range(depth):
            new = [new] if rng.random() < 0.5 else {"a": new}
        return _replace(tree, path, new), f"nest {where} {depth} deep"
    if op == "donor" and donors:
        donor_path, donor_value = rng.choice(_paths(rng.choice(donors)))
        return _replace(tree, path, copy.deepcopy(donor_value)), f"{where} = donor {'.'.join(map(str, donor_path))}"
    if op == "list" and isinstance(value, str):
        new = [value] * rng.choice((2, 65, 300))
        return _replace(tree, path, new), f"{where} = [value] * {len(new)}"
    new = interesting_scalar(rng, str(value))
    return _replace(tree, path, new), f"{where} = {_short(new)}"


def mutate_text(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """One mutation of the file's bytes: lines duplicated, dropped, moved, cut, or odd bytes put in."""
    lines = data.split(b"\n")
    i = rng.randrange(len(lines))
    op = rng.choice(("dup", "drop", "swap", "cut", "byte", "indent", "alias", "tab", "flow"))
    if op == "dup":
        lines.insert(i, lines[i])
        return b"\n".join(lines), f"line {i + 1} twice"
    if op == "drop":
        del lines[i]
        return b"\n".join(lines), f"line {i + 1} dropped"
    if op == "swap":
        j = rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
        return b"\n".join(lines), f"lines {i + 1} and {j + 1} swapped"
    if op == "cut":
        at = rng.randrange(len(data) + 1)
        return data[:at], f"cut at byte {at}"
    if op == "byte":
        at = rng.randrange(len(data) + 1)
        odd = rng.choice((b"\x00", b"\x07", b"\x1b", b"\x7f", b"\xff", b"\xc3", b"\xe9", b"\xef\xbb\xbf",
                          b"\xed\xa0\x80", "\u2028".encode(), "\ufeff".encode(), b"\r", b"\\", b"'", b'"'))
        return data[:at] + odd + data[at:], f"byte {odd!r} at {at}"
    if op == "indent":
        lines[i] = rng.choice((b" ", b"  ", b"    ")) + lines[i] if rng.random() < 0.5 else lines[i].lstrip()
        return b"\n".join(lines), f"line {i + 1} re-indented"
    if op == "alias":
        lines[i] = lines[i] + rng.choice((b" &a", b" *a", b" *a\nx: &a [*a]", b" !!python/object:os.system"))
        return b"\n".join(lines), f"anchor/alias/tag on line {i + 1}"
    if op == "tab":
        lines[i] = b"\t" + lines[i]
        return b"\n".join(lines), f"tab on line {i + 1}"
    lines.insert(i, b"x: " + b"[" * 5000 + b"]" * 5000)
    return b"\n".join(lines), f"5000-deep flow list at line {i + 1}"


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:30]}... ({len(text)} chars)"


@dataclass(frozen=True)
class Case:
    id: str
    seed: str                 # the seed file, relative to the repository root
    mutations: tuple[str, ...]
    data: bytes


def _load(path: Path):
    return _load_bytes(path.read_bytes())


def make_cases(seed: int, count: int) -> list[Case]:
    files = seed_files()
    texts = {f: f.read_bytes() for f in files}
    trees = {f: _load(f) for f in files}
    donors = [t for t in trees.values() if isinstance(t, dict)]
    valid = [f for f in files if "errors" not in f.parts]
    cases = []
    for n in range(count):
        rng = random.Random(f"{seed}:{n}")
        f = rng.choice(valid if rng.random() < 0.7 else files)
        data, done = texts[f], []
        for _ in range(rng.choices((1, 2, 3), (7, 2, 1))[0]):
            tree = _load_bytes(data)
            if tree is not None and isinstance(tree, (dict, list)) and rng.random() < 0.85:
                tree, what = mutate_tree(rng, tree, donors)
                data = _dump(tree)
            else:
                data, what = mutate_text(rng, data)
            done.append(what)
        cases.append(Case(f"{seed}-{n}", str(f.relative_to(ROOT)), tuple(done), data))
    return cases


def _load_bytes(data: bytes):
    """The file as Python data, or None when only its bytes can be mutated (not YAML, or with
    aliases, which PyYAML would share between places and a mutation would change in all)."""
    try:
        text = data.decode("utf-8")
        # libyaml: PyYAML's own parser is quadratic on deep flow collections
        if any(isinstance(e, yaml.AliasEvent) for e in yaml.parse(text, Loader=yaml.CBaseLoader)):
            return None
        return yaml.load(text, Loader=yaml.CBaseLoader)   # every scalar a string, as probec reads them
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError, ValueError):
        return None


def _dump(tree) -> bytes:
    try:
        return yaml.dump(tree, Dumper=yaml.CSafeDumper, sort_keys=False, allow_unicode=True,
                         width=1 << 30).encode("utf-8")
    except RecursionError:   # a nest mutation too deep for PyYAML's recursive emitter: write it flow-style
        return _flow(tree).encode("utf-8")


def _flow(tree) -> str:
    out, stack = [], [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, _Text):
            out.append(item)
        elif isinstance(item, dict):
            stack.append(_Text("}"))
            for i, (k, v) in reversed(list(enumerate(item.items()))):
                stack += [v, _Text(yaml.safe_dump(k, default_style='"').strip() + ": ")]
                if i:
                    stack.append(_Text(", "))
            stack.append(_Text("{"))
        elif isinstance(item, list):
            stack.append(_Text("]"))
            for i, v in reversed(list(enumerate(item))):
                stack.append(v)
                if i:
                    stack.append(_Text(", "))
            stack.append(_Text("["))
        else:
            out.append(yaml.safe_dump(item, default_style='"', width=1 << 30).strip().removesuffix("\n..."))
    return "".join(out) + "\n"


class _Text(str):
    pass


# -- running a case -----------------------------------------------------------------------------

@dataclass
class Outcome:
    case: Case
    accepted: bool = False    # by check --no-host --kernel any
    built: bool = False       # also accepted with host checks, so built for both backends
    check_s: float = 0.0
    findings: list[tuple[str, str]] = field(default_factory=list)   # (kind, detail)


def case_path(workdir: Path, case: Case) -> Path:
    """Where a case's file is written: beside a copy of its seed's folder, so that relative binary
    paths in it (../tests/workloads/build/...) resolve as they do for the seed."""
    return workdir / Path(case.seed).parent / f"case-{case.id}.yaml"


def prepare_workdir(workdir: Path) -> None:
    for f in seed_files():
        (workdir / f.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
    for shared in ("tests/workloads", "examples/workloads"):
        link = workdir / shared
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(ROOT / shared)


def _describe(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    return f"{type(exc).__name__} at {where}: {str(exc)[:200]}"


def _unplaced(diagnostics) -> list[str]:
    return [f"{d.code} {d.message[:120]}" for d in diagnostics
            if d.span is None or not d.span.file or d.span.line < 1 or d.span.col < 1]


_HOST = None


def this_host():
    """This machine's tracefs, BTF and binaries, read once in the parent and shared by the forks."""
    global _HOST
    if _HOST is None:
        from probec.compiler.ir.host import HostInfo
        _HOST = HostInfo()
        _HOST.tracepoints, _HOST.btf_tracepoints   # noqa: B018 - read them now, before forking
    return _HOST


def check_case(path: str, host: bool = False):
    """`probec check --no-host --kernel any PATH` as the CLI runs it; with `host`, `probec check
    --kernel any PATH`, which is what `probec build --kernel any` checks before it builds."""
    from probec.compiler.driver import check_file
    from probec.compiler.ir.host import HostInfo
    return check_file(path, this_host() if host else HostInfo(enabled=False), "any")


def build_case(path: str, backend: str, outdir: Path, bpftrace_parse: bool) -> list[tuple[str, str]]:
    """Build a case that `check --kernel any` accepts here; the findings (empty when it built)."""
    from probec.compiler.driver import build_bundle
    kind = f"build-{backend}"
    result = check_case(path, host=True)
    try:
        if backend == "core":
            bundle = build_bundle(result, "core", compile=True, task_storage=False)
        else:
            bundle = build_bundle(result, "bpftrace", "0.17", interval_ms=1000)
    except Exception as exc:  # noqa: BLE001 - a crash is what we look for
        return [(kind, _describe(exc))]
    errors = [d for d in result.diagnostics.items if d.severity.value == "error"]
    if bundle is None or errors:
        return [(kind, "; ".join(f"{d.code} {d.message[:300]}" for d in errors) or "no bundle")]
    if backend == "bpftrace" and bpftrace_parse:
        written = bundle.write(str(outdir))
        script = next(p for p in written if str(p).endswith(".bt"))
        try:
            run = subprocess.run(["bpftrace", "-d", str(script)], capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            return [("bpftrace-parse", "bpftrace -d ran past 60 s")]
        errors = [ln[ln.index("ERROR"):] if "ERROR" in ln else ln for ln in run.stderr.splitlines()
                  if ("ERROR" in ln or "error" in ln) and "RLIMIT_MEMLOCK" not in ln]
        # kfunc/kprobe scripts (built with --kernel any) cannot be checked where those are missing
        if run.returncode != 0 and not all("not available for your kernel" in ln for ln in errors):
            return [("bpftrace-parse", " | ".join(errors[:3])[:400] or run.stderr[-300:])]
    return []


def _child(case: Case, workdir: Path, bpftrace_parse: bool, conn) -> None:
    """Runs in a forked process: check, tell the parent, then build and tell it again."""
    path = case_path(workdir, case)
    path.write_bytes(case.data)
    started = time.monotonic()
    findings: list[tuple[str, str]] = []
    accepted = False
    try:
        result = check_case(str(path))
        unplaced = _unplaced(result.diagnostics.items)
        if unplaced:
            findings.append(("no-position", "; ".join(unplaced)[:400]))
        accepted = not result.diagnostics.has_errors() and result.program is not None
    except BaseException as exc:  # noqa: BLE001 - RecursionError, MemoryError, ... are findings too
        findings.append(("traceback", _describe(exc)))
    conn.send(("checked", time.monotonic() - started, accepted, findings))
    if accepted:
        # Core reads tracepoint fields at offsets from this host's tracefs, and host checks
        # resolve binaries: build what `check --kernel any` accepts here, as `probec build` does.
        findings = []
        try:
            result = check_case(str(path), host=True)
            unplaced = _unplaced(result.diagnostics.items)
            if unplaced:
                findings.append(("no-position", "; ".join(unplaced)[:400]))
            # W313: tracefs is not readable here, so core has no offsets for the fields (E501 by design)
            buildable = not result.diagnostics.has_errors() and result.program is not None \
                and not any(d.code == "W313" for d in result.diagnostics.items)
        except BaseException as exc:  # noqa: BLE001
            findings.append(("traceback", "host check: " + _describe(exc)))
            buildable = False
        for backend in ("core", "bpftrace") if buildable else ():
            try:
                findings += build_case(str(path), backend, workdir / "out" / case.id / backend, bpftrace_parse)
            except BaseException as exc:  # noqa: BLE001
                findings.append((f"build-{backend}", _describe(exc)))
        conn.send(("built", buildable, findings))
    conn.close()


def run_cases(cases: list[Case], jobs: int = 2, bpftrace_parse: bool = False, workdir: Path | None = None,
              progress=None, check_limit_s: float = CHECK_LIMIT_S) -> list[Outcome]:
    """Run every case in its own forked process, `jobs` at a time, killing any that overruns."""
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="probec-fuzz-")) if own else workdir
    prepare_workdir(workdir)
    # The torch example names its library through ${TORCH_LIB}: give it a value, so that its
    # mutants get past that (host checks then find no such library, and it is not built).
    os.environ.setdefault("TORCH_LIB", "/nonexistent/torch/lib")
    import probec.compiler.driver  # noqa: F401 - import once here, so that each fork starts warm
    import probec.compiler.expr.parser
    probec.compiler.expr.parser._parser()
    this_host()
    ctx = multiprocessing.get_context("fork")
    outcomes = {c.id: Outcome(c) for c in cases}
    todo = list(reversed(cases))
    running: dict = {}   # connection -> (case, process, deadline, stage, started)
    try:
        while todo or running:
            while todo and len(running) < jobs:
                case = todo.pop()
                parent, child = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_child, args=(case, workdir, bpftrace_parse, child), daemon=True)
                proc.start()
                child.close()
                now = time.monotonic()
                running[parent] = (case, proc, now + check_limit_s, "check", now)
            now = time.monotonic()
            ready = multiprocessing.connection.wait(list(running), timeout=max(
                0.01, min(r[2] for r in running.values()) - now))
            for conn in ready:
                case, proc, deadline, stage, started = running[conn]
                out = outcomes[case.id]
                try:
                    message = conn.recv()
                except EOFError:     # the process is done (or died)
                    del running[conn]
                    conn.close()
                    proc.join()
                    if stage == "check":
                        out.findings.append(("traceback", f"the checking process died (exit {proc.exitcode})"))
                    elif stage == "build":
                        out.findings.append(("build", f"the building process died (exit {proc.exitcode})"))
                    if progress:
                        progress(out)
                    continue
                if message[0] == "checked":
                    _, out.check_s, out.accepted, findings = message
                    out.findings += findings
                    if out.accepted:
                        running[conn] = (case, proc, time.monotonic() + BUILD_LIMIT_S, "build", started)
                    else:
                        running[conn] = (case, proc, time.monotonic() + 10, "exit", started)
                else:
                    _, out.built, findings = message
                    out.findings += findings
                    running[conn] = (case, proc, time.monotonic() + 10, "exit", started)
            now = time.monotonic()
            for conn, (case, proc, deadline, stage, started) in list(running.items()):
                if now > deadline and conn not in ready:
                    proc.kill()
                    proc.join()
                    del running[conn]
                    conn.close()
                    out = outcomes[case.id]
                    if stage == "check":
                        out.check_s = now - started
                        out.findings.append(("hang", f"check ran past {check_limit_s:g} s"))
                    elif stage == "build":
                        out.findings.append(("build", f"building ran past {BUILD_LIMIT_S:g} s"))
                    if progress:
                        progress(out)
    finally:
        for conn, (case, proc, *_rest) in running.items():
            proc.kill()
            proc.join()
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    return [outcomes[c.id] for c in cases]


# -- make fuzz ----------------------------------------------------------------------------------

def summary(outcomes: list[Outcome], seconds: float) -> str:
    kinds = Counter(kind for o in outcomes for kind, _ in o.findings)
    accepted = sum(o.accepted for o in outcomes)
    built = sum(o.built for o in outcomes)
    slowest = max(outcomes, key=lambda o: o.check_s)
    lines = [f"{len(outcomes)} cases in {seconds:.0f} s: {len(outcomes) - accepted} rejected by check, "
             f"{accepted} accepted, {built} of them also with host checks and so built by both backends; "
             f"slowest check {slowest.check_s:.2f} s ({slowest.case.id})"]
    lines += [f"  {kind}: {n}" for kind, n in sorted(kinds.items())] or ["  no findings"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=int(os.environ.get("FUZZ_SEED", "1")))
    p.add_argument("--cases", type=int, default=int(os.environ.get("FUZZ_CASES", "5000")))
    p.add_argument("--jobs", type=int, default=int(os.environ.get("FUZZ_JOBS", str(os.cpu_count() or 2))))
    p.add_argument("--bpftrace-parse", action="store_true",
                   default=os.environ.get("FUZZ_BPFTRACE_PARSE") == "1",
                   help="also parse each built script with `bpftrace -d` (needs root and bpftrace)")
    p.add_argument("--save", metavar="DIR", help="write each case with a finding to DIR/CASE.yaml")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    started = time.monotonic()
    cases = make_cases(args.seed, args.cases)
    done = 0

    def progress(_outcome):
        nonlocal done
        done += 1
        if done % 500 == 0:
            print(f"... {done}/{len(cases)}", file=sys.stderr, flush=True)

    outcomes = run_cases(cases, args.jobs, args.bpftrace_parse, progress=progress)
    for o in outcomes:
        for kind, detail in o.findings:
            print(f"{o.case.id} [{kind}] {o.case.seed} | {' ; '.join(o.case.mutations)} | {detail}")
        if o.findings and args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            (Path(args.save) / f"{o.case.id}.yaml").write_bytes(o.case.data)
    print(summary(outcomes, time.monotonic() - started))
    return 1 if any(o.findings for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
