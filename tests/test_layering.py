"""The layers of probec: host facts (host/) are a leaf that the compiler and the runtime share, the
runtime never imports the compiler, and a bundle's loader.py runs where the compiler cannot be
imported at all.

The import graph is read from the source with `ast` (every import, also those inside functions),
so it holds whether or not a code path runs in a test."""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import require_core_kernel, ROOT, WORKLOADS, require_kernel
from harness import parse_metrics

# The folders that make up the package probec, by the module name each one is imported as.
PACKAGES = {"probec": ROOT / "probec", "probec.compiler": ROOT / "compiler", "probec.runtime": ROOT / "runtime",
            "probec.host": ROOT / "host"}

# Imports across layers that are allowed although the rules below forbid them, with the reason.
# Empty today: keep it so, or say here why an exception is right.
ALLOWED: dict[tuple[str, str], str] = {
    # The bundle manifest is the contract between the two: runtime/manifest.py defines it (a leaf
    # that imports nothing of probec, tests/test_manifest_contract.py checks), the compiler fills it.
    ("probec.compiler.backends.manifest", "probec.runtime.manifest"): "the manifest contract, written here",
    ("probec.compiler.ir.lowering", "probec.runtime.manifest"): "the event record header the contract defines",
}


def _modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file. Symlinked folders (probec/compiler ->
    ../compiler) are the same files under their own package name, so they are skipped."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder)
            if any((folder / part).is_symlink() for part in relative.parts[:1]):
                continue
            parts = list(relative.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _imports(name: str, path: Path) -> set[str]:
    """The probec modules `name` imports: `from X import Y` counts as an import of X.Y where Y is a
    module, else of X. Imports inside functions count too."""
    tree = ast.parse(path.read_text(), str(path))
    base = name if _is_package(name) else name.rpartition(".")[0]
    # `if TYPE_CHECKING:` imports are for annotations only: no edge at run time
    typing_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                   for inner in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                module = f"{anchor}.{node.module}" if node.module else anchor
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module
                       for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t == "probec" or t.startswith("probec."))
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and f"probec.{parts[1]}" in PACKAGES else "probec"


def _crossings(source: str, forbidden: set[str]) -> list[str]:
    return sorted(f"{module} imports {target}" for module, targets in GRAPH.items() if _layer(module) == source
                  for target in targets if _layer(target) in forbidden and (module, target) not in ALLOWED)


def test_the_graph_sees_every_layer():
    # a walk that found nothing would pass every rule below
    assert {_layer(m) for m in MODULES} == {"probec", "compiler", "runtime", "host"}
    assert "probec.host.elf" in GRAPH["probec.compiler.ir.host"]
    assert "probec.runtime.core_runner" in GRAPH["probec.runtime.session"]
    assert "probec.runtime.libbpf.links" in GRAPH["probec.runtime.libbpf.objects"]
    assert "probec.runtime.libbpf.objects" not in GRAPH["probec.runtime.libbpf.links"]   # under TYPE_CHECKING


def test_host_is_a_leaf():
    assert _crossings("host", {"probec", "compiler", "runtime"}) == []


def test_runtime_never_imports_the_compiler():
    assert _crossings("runtime", {"probec", "compiler"}) == []


def test_compiler_imports_only_host_facts_from_outside():
    assert _crossings("compiler", {"probec", "runtime"}) == []


def _cycles(prefix: str) -> list[list[str]]:
    """Import cycles among the modules under `prefix` (a package's own __init__ is left out:
    importing a submodule runs it, but it is no edge a module writes)."""
    nodes = {m for m in GRAPH if m.startswith(prefix + ".")}
    edges = {m: sorted(t for t in GRAPH[m] if t in nodes and t != m) for m in nodes}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for target in edges[node]:
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(nodes):
        if node not in state:
            visit(node, [])
    return cycles


@pytest.mark.parametrize("package", ["probec.runtime", "probec.host"])
def test_no_import_cycles(package):
    assert _cycles(package) == []


def test_a_cycle_is_found():
    # the cycle check on a graph with one, so that an empty answer above means something
    GRAPH["probec.runtime.store"].add("probec.runtime.exporter")
    try:
        assert [set(cycle) for cycle in _cycles("probec.runtime")] == [{"probec.runtime.exporter", "probec.runtime.store"}]
    finally:
        GRAPH["probec.runtime.store"].discard("probec.runtime.exporter")


# --- loader.py without the compiler -----------------------------------------------------------------
# A sitecustomize on PYTHONPATH makes the compiler and the compiler's own dependencies unimportable
# in the loader's process, and says so on stderr if anything asks for them.
BLOCKER = """
import sys

BLOCKED = ("probec.compiler", "jinja2", "lark")


class CompilerBlocker:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            sys.stderr.write(f"layering test: import of {name} refused\\n")
            raise ImportError(f"{name} is blocked: the runtime must not import the compiler")
        return None


sys.meta_path.insert(0, CompilerBlocker())
"""

LOADER_SPEC = """
name: layering_loader
binaries:
  pwork: @W@/libpwork.so
  exe: @W@/pwork
metrics:
  layering_records_total:
    count: uprobe:pwork:pwork_record
    filter: comm == "layering"
  layering_ticks_total:
    count: usdt:exe:pwork:tick
    filter: comm == "layering"
"""


def _build_core(tmp_path: Path, compile: bool) -> Path:
    from probec.compiler.diagnostics import render_text
    from probec.compiler.driver import build_bundle, check_file
    spec = tmp_path / "layering_loader.yaml"
    spec.write_text(LOADER_SPEC.replace("@W@", str(WORKLOADS)))
    result = check_file(str(spec))
    assert result.program is not None, render_text(result.diagnostics.sorted(), result.sources)
    bundle = build_bundle(result, "core", compile=compile)
    assert bundle is not None, render_text(result.diagnostics.sorted(), result.sources)
    bundle.write(tmp_path / "bundle")
    return tmp_path / "bundle"


def _blocked_env(tmp_path: Path) -> dict:
    (tmp_path / "blocker").mkdir(exist_ok=True)
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "blocker"), str(ROOT)])
    return env


def test_the_blocker_blocks(tmp_path):
    env = _blocked_env(tmp_path)
    r = subprocess.run([sys.executable, "-c", "import probec.compiler.driver"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "import of probec.compiler refused" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-c", "import probec.runtime.session, probec.runtime.core_runner"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_loader_help_runs_without_the_compiler(tmp_path, workloads):
    bundle = _build_core(tmp_path, compile=False)
    r = subprocess.run([sys.executable, str(bundle / "loader.py"), "--help"], env=_blocked_env(tmp_path),
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "usage: loader.py" in r.stdout and "--duration" in r.stdout
    assert "refused" not in r.stderr




@pytest.mark.kernel
def test_loader_attaches_and_counts_without_the_compiler(tmp_path, workloads):
    require_core_kernel()
    bundle = _build_core(tmp_path, compile=True)
    assert json.loads((bundle / "manifest.json").read_text())["backend"] == "core"
    snapshot = tmp_path / "snapshot.txt"
    # --duration 1 --port 0: a real run that attaches, reads and stops by itself
    short = subprocess.run([sys.executable, str(bundle / "loader.py"), "--duration", "1", "--port", "0"],
                           env=_blocked_env(tmp_path), capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert short.returncode == 0, short.stderr
    assert "attached (core)" in short.stderr and "refused" not in short.stderr, short.stderr
    # and one that counts a known workload
    proc = subprocess.Popen([sys.executable, str(bundle / "loader.py"), "--duration", "60", "--port", "0",
                             "--snapshot", str(snapshot)], env=_blocked_env(tmp_path), stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    lines: list[str] = []
    attached = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if ": attached (core)" in line:
                attached.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + 30
        while not attached.wait(0.1):
            assert proc.poll() is None and time.monotonic() < deadline, "loader did not attach:\n" + "".join(lines)
        subprocess.run([str(WORKLOADS / "pwork"), "--comm", "layering", "record", "1", "2", "3"], check=True, timeout=60)
        subprocess.run([str(WORKLOADS / "pwork"), "--comm", "layering", "usdt", "4"], check=True, timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not any("refused" in line for line in lines), "".join(lines)
    metrics = parse_metrics(snapshot.read_text())
    assert metrics["layering_records_total"][frozenset()] == 3
    assert metrics["layering_ticks_total"][frozenset()] == 4


@pytest.mark.kernel
def test_probec_run_of_a_spec_builds_then_runs(tmp_path, workloads):
    # the one path of `run` that needs the compiler builds in probec/cli.py, then hands the bundle over
    require_core_kernel()
    spec = tmp_path / "layering_loader.yaml"
    spec.write_text(LOADER_SPEC.replace("@W@", str(WORKLOADS)))
    scratch = tmp_path / "tmp"          # where the run's temporary bundle goes, and must not stay
    scratch.mkdir()
    r = subprocess.run([sys.executable, "-m", "probec", "run", str(spec), "--backend", "core", "--duration", "1",
                        "--port", "0"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "TMPDIR": str(scratch)})
    assert r.returncode == 0, r.stderr
    assert "attached (core)" in r.stderr, r.stderr
    assert [p.name for p in scratch.iterdir() if p.name.startswith("probec-")] == []


def test_every_subpackage_is_in_the_wheel():
    """pyproject.toml lists packages by hand: a new folder left out of it would be missing from an
    installed probec, though every test here (run from the checkout) would pass."""
    import tomllib
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {"probec"}
    for top in ("compiler", "runtime", "host", "templates"):
        for init in (ROOT / top).rglob("__init__.py"):
            on_disk.add(".".join(("probec", *init.parent.relative_to(ROOT).parts)))
    assert on_disk == listed, (on_disk - listed, listed - on_disk)
