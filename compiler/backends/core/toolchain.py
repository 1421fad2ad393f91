"""The C toolchain of the core backend: a cached vmlinux.h and a reproducible clang build.

vmlinux.h is generated once per kernel BTF by bpftool and kept under ~/.cache/probec (or
$XDG_CACHE_HOME/probec); $PROBEC_VMLINUX_H names a header to use instead. The object is compiled
in a scratch folder with relative paths and a fixed debug compilation folder, so the same sources
give the same bytes wherever the bundle is written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

BTF_PATH = "/sys/kernel/btf/vmlinux"
CLANG_FLAGS = ("-O2", "-g", "-target", "bpf", "-mcpu=v3", "-D__TARGET_ARCH_x86", "-Wall", "-Werror",
               "-fdebug-compilation-dir=.", "-fno-ident")
MULTIARCH_INCLUDE = "/usr/include/x86_64-linux-gnu"


class ToolchainError(Exception):
    """The toolchain cannot build here; the message says what is missing and how to get it."""


@dataclass
class CompileResult:
    object: bytes | None
    error: str = ""            # clang's complaint (a probec bug: generated C must compile)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "probec"


def vmlinux_header() -> Path:
    """The vmlinux.h for this kernel's BTF, generated on first use and cached."""
    override = os.environ.get("PROBEC_VMLINUX_H")
    if override:
        if not os.path.isfile(override):
            raise ToolchainError(f"PROBEC_VMLINUX_H names '{override}', which does not exist")
        return Path(override)
    try:
        with open(BTF_PATH, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
    except OSError as exc:
        raise ToolchainError(f"cannot read {BTF_PATH} ({exc.strerror or exc}): this kernel has no BTF; "
                             "set PROBEC_VMLINUX_H to a vmlinux.h for the target kernel") from None
    target = cache_dir() / f"vmlinux-{digest}.h"
    if target.is_file() and target.stat().st_size > 0:
        return target
    bpftool = shutil.which("bpftool")
    if bpftool is None:
        raise ToolchainError("bpftool is not installed (apt-get install bpftool), so vmlinux.h cannot be "
                             "generated; or set PROBEC_VMLINUX_H to an existing vmlinux.h")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("wb", dir=target.parent, prefix=".vmlinux-", delete=False) as tmp:
            result = subprocess.run([bpftool, "btf", "dump", "file", BTF_PATH, "format", "c"],
                                    stdout=tmp, stderr=subprocess.PIPE, timeout=120)
        if result.returncode != 0:
            os.unlink(tmp.name)
            raise ToolchainError("bpftool could not dump the kernel BTF: "
                                 + result.stderr.decode(errors="replace").strip()[-400:])
        os.replace(tmp.name, target)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolchainError(f"cannot write {target}: {exc}") from None
    return target


def clang_command() -> str:
    exe = shutil.which("clang")
    if exe is None:
        raise ToolchainError("clang is not installed (apt-get install clang)")
    return exe


def compile_object(sources: dict[str, bytes], main: str, out_name: str) -> CompileResult:
    """Compile `main` (one of `sources`, all written side by side) into BPF object bytes."""
    clang = clang_command()
    vmlinux = vmlinux_header()
    with tempfile.TemporaryDirectory(prefix="probec-cc-") as tmp:
        work = Path(tmp)
        for name, data in sources.items():
            (work / name).write_bytes(data)
        (work / "vmlinux.h").symlink_to(vmlinux.resolve())
        cmd = [clang, *CLANG_FLAGS, "-I."]
        if os.path.isdir(MULTIARCH_INCLUDE):
            cmd += ["-idirafter", MULTIARCH_INCLUDE]
        cmd += ["-c", main, "-o", out_name]
        try:
            result = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            return CompileResult(None, "clang did not finish within 300 s")
        if result.returncode != 0:
            return CompileResult(None, (result.stderr or result.stdout).strip())
        data = (work / out_name).read_bytes()
    return CompileResult(data)


def min_core_btf(source: str, output: str, objects: list[str]) -> int:
    """Write to `output` the part of the BTF in `source` that the CO-RE relocations of `objects`
    need (`bpftool gen min_core_btf`); returns its size in bytes."""
    bpftool = shutil.which("bpftool")
    if bpftool is None:
        raise ToolchainError("bpftool is not installed (apt-get install bpftool): it cuts the BTF")
    if not os.path.isfile(source):
        raise ToolchainError(f"no BTF at {source}: pass the target kernel's with --from")
    try:
        result = subprocess.run([bpftool, "gen", "min_core_btf", source, output, *objects],
                                capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise ToolchainError("bpftool gen min_core_btf did not finish within 120 s") from None
    if result.returncode != 0:
        raise ToolchainError(f"bpftool gen min_core_btf {source} failed: "
                             + (result.stderr or result.stdout).strip()[-400:])
    return os.path.getsize(output)
