"""Golden files of the generated code: for each spec in tests/golden/specs/, the bpftrace script,
the core backend's C source and header, the bcc backend's program, with the core probes' attach plan from the manifest
(where endbr64 placement and kernel-function fallbacks show), compared with the files checked in
under tests/golden/SPEC/. A review reads their diff; regenerate them with `pytest --update-golden`.

The specs together use every construct of the spec language. They are built with `probec build
--target` against recorded host facts (tests/hosts/firecracker-6.18.json), so tracepoint field
offsets and kernel mechanisms come from the record, not from this machine: no root, no tracefs,
the same bytes on any kernel. Binaries are the test workloads (tests/workloads/build); the
repository root is written as $ROOT wherever a resolved path appears.

The golden comparison needs no clang; test_golden_c_compiles compiles each golden .bpf.c with
the real toolchain (clang, and a vmlinux.h of this kernel), and test_golden_bcc_loads has BCC
compile each golden bcc program and the kernel verify each of its functions.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, kernel_unavailable, probec, require_bcc_kernel

GOLDEN = ROOT / "tests" / "golden"
SPECS = sorted((GOLDEN / "specs").glob("*.yaml"))
RECORDED = ROOT / "tests" / "hosts" / "firecracker-6.18.json"
TEMPLATES = ROOT / "templates" / "core"


def build(spec: Path, backend: str, out: Path) -> Path:
    args = ["build", "--target", str(RECORDED), "--backend", backend, "-o", str(out)]
    args += {"core": ["--no-compile"], "bpftrace": ["--bpftrace-version", "0.17"]}.get(backend, [])
    result = probec(*args, str(spec.relative_to(ROOT)))
    assert result.returncode == 0, result.stderr
    return out


def attach_plan(manifest: dict) -> str:
    """One line per probe of a core bundle: what it attaches to and where (the offset past
    endbr64), and which variant of a kernel-function span it belongs to."""
    lines = []
    for p in manifest["probes"]:
        kind = p["kind"]
        if kind in ("uprobe", "uretprobe"):
            where = f"{p['binary']}:{p['symbol']}+{p['offset']}"
        elif kind == "usdt":
            where = f"{p['binary']}:{p['provider']}:{p['name']}"
        elif kind == "tracepoint":
            where = f"{p['category']}:{p['name']}"
        elif kind in ("profile", "interval"):
            where = f"rate {p['rate']}"
        else:
            where = p["name"]
        group = f"  [{p['group']} variant {p['variant']}]" if p["group"] else ""
        lines.append(f"{p['id']}: {kind} {where}{group}")
    for group, labels in sorted(manifest["groups"].items()):
        lines.append(f"{group}: tried in order: {', '.join(labels)}")
    return "\n".join(lines) + "\n"


def generated(spec: Path, tmp: Path) -> dict[str, str]:
    """The golden files of one spec: name -> text, with the repository root as $ROOT."""
    name = spec.stem
    bt = build(spec, "bpftrace", tmp / "bpftrace")
    core = build(spec, "core", tmp / "core")
    bcc = build(spec, "bcc", tmp / "bcc")
    files = {
        f"{name}.bcc.py": (bcc / f"{name}.py").read_text(),
        f"{name}.bt": (bt / f"{name}.bt").read_text(),
        f"{name}.bpf.c": (core / f"{name}.bpf.c").read_text(),
        f"{name}.h": (core / f"{name}.h").read_text(),
        f"{name}.attach": attach_plan(json.loads((core / "manifest.json").read_text())),
    }
    out = {}
    for fname, text in files.items():
        text = text.replace(str(ROOT), "$ROOT")
        assert str(tmp) not in text, f"{fname} names the folder it was built in"
        out[fname] = text
    return out


@pytest.mark.parametrize("spec", SPECS, ids=[s.stem for s in SPECS])
def test_generated_code_matches_golden(spec: Path, workloads, tmp_path, request):
    got = generated(spec, tmp_path)
    folder = GOLDEN / spec.stem
    if request.config.getoption("--update-golden"):
        folder.mkdir(exist_ok=True)
        for old in folder.iterdir():
            if old.name not in got:
                old.unlink()
        for fname, text in got.items():
            (folder / fname).write_text(text)
    assert sorted(p.name for p in folder.iterdir()) == sorted(got), "golden files missing or left over"
    for fname, text in got.items():
        # compared line by line so that pytest shows the lines that differ
        assert text.splitlines() == (folder / fname).read_text().splitlines(), \
            f"{folder.relative_to(ROOT)}/{fname} differs (pytest --update-golden rewrites it; read the diff)"
        assert text == (folder / fname).read_text(), f"{fname}: line endings or final newline differ"


def test_golden_specs_use_every_construct():
    """The golden set keeps covering what it claims: every probe kind and metric form appears."""
    text = "\n".join(s.read_text() for s in SPECS)
    plans = "\n".join((GOLDEN / s.stem / f"{s.stem}.attach").read_text() for s in SPECS)
    for construct in ("tracepoint:", "syscall:", "function:", "uprobe:", "uretprobe:", "usdt:", "kernel:",
                      "fallback:", "profile:hz:", "interval:s:", "within:", ".total", "parts:", "active(",
                      "active_at(", "socket(", "count:", "sum:", "histogram:", "exp2(", "linear(", "buckets: [",
                      "series:", "sample: 1/", "at most", "ustack", "kstack", "args.saddr", "filter:",
                      "end_key:", "restart: false", "Inference::Forward"):
        assert construct in text, f"no golden spec uses {construct}"
    for attach in ("+4", "+0", "fentry", "kprobe", "usdt", "profile", "interval"):
        assert attach in plans, f"no golden attach plan shows {attach}"


@pytest.mark.parametrize("spec", SPECS, ids=[s.stem for s in SPECS])
def test_golden_c_compiles(spec: Path, workloads):
    """Each golden .bpf.c, with its header and probec.bpf.h, compiles with clang -Wall -Werror
    (the core backend's own flags), so the goldens are C that the toolchain accepts."""
    from probec.compiler.backends.core.toolchain import ToolchainError, compile_object
    if shutil.which("clang") is None:
        pytest.skip("clang is not installed")
    folder = GOLDEN / spec.stem
    name = spec.stem
    sources = {f"{name}.bpf.c": (folder / f"{name}.bpf.c").read_bytes(),
               f"{name}.h": (folder / f"{name}.h").read_bytes(),
               "probec.bpf.h": (TEMPLATES / "probec.bpf.h").read_bytes()}
    try:
        result = compile_object(sources, f"{name}.bpf.c", f"{name}.bpf.o")
    except ToolchainError as exc:
        pytest.skip(f"no BPF toolchain here: {exc}")
    assert result.error == "" and result.object and result.object[:4] == b"\x7fELF", result.error


@pytest.mark.parametrize("spec", SPECS, ids=[s.stem for s in SPECS])
def test_golden_bt_compiles(spec: Path, workloads, tmp_path):
    """Each golden .bt, with the repository root put back, passes bpftrace 0.17's parser, semantic
    checks and code generation (`--emit-elf`: a dry run that loads and attaches nothing, so it
    needs no kernel lock). bpftrace reads this machine's tracefs for the tracepoint formats."""
    if shutil.which("bpftrace") is None:
        pytest.skip("bpftrace is not installed")
    if kernel_unavailable() is not None:
        pytest.skip(f"bpftrace reads tracepoint formats from tracefs: {kernel_unavailable()}")
    script = tmp_path / f"{spec.stem}.bt"
    script.write_text((GOLDEN / spec.stem / f"{spec.stem}.bt").read_text().replace("$ROOT", str(ROOT)))
    result = subprocess.run(["bpftrace", "--emit-elf", str(tmp_path / "out.o"), str(script), "0"],
                            capture_output=True, text=True, timeout=120)
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line and "RLIMIT_MEMLOCK" not in line]
    assert result.returncode == 0 and not errors, result.stderr
    assert (tmp_path / "out.o").read_bytes()[:4] == b"\x7fELF"


@pytest.mark.kernel
@pytest.mark.parametrize("spec", SPECS, ids=[s.stem for s in SPECS])
def test_golden_bcc_loads(spec: Path, workloads, tmp_path):
    """Each golden bcc program, with the repository root put back, compiles with BCC against this
    host's kernel headers, and every function of it passes the verifier as the program type its
    probe attaches as (nothing is attached). The headers need not be the running kernel's: no
    golden function that BCC compiles here reads a kernel struct but socket(fd)'s, and the verifier
    checks the code, not the offsets it reads. Each is compiled as the runtime compiles it: with a
    target pid read from its map, and without one; with the ring buffer, and with the perf buffer
    (kernels before 5.8)."""
    from harness import bcc_verify
    from probec.runtime.bcc_runner import program_text
    require_bcc_kernel()
    name = spec.stem
    manifest = json.loads(build(spec, "bcc", tmp_path / "bcc").joinpath("manifest.json").read_text())
    program = tmp_path / f"{name}.py"
    program.write_text((GOLDEN / name / f"{name}.bcc.py").read_text().replace("$ROOT", str(ROOT)))
    assert bcc_verify(program_text(program), manifest)
    assert bcc_verify(program_text(program), manifest, ("-Dprobec_target_pid=0", "-Dprobec_use_ringbuf=0"))
