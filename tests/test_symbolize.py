"""Stack symbolisation (probec.runtime.symbolize) against live processes compiled here and the
running kernel's kallsyms."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from probec.runtime.symbolize import KernelSymbols, UserSymbols, read_maps, symbolize_stack

TARGET_C = r"""
#include <stdio.h>
#include <unistd.h>
int lib_fn(int x);
__attribute__((noinline)) int work_fn(int x) { return x * 7 + 1; }
int main(void) {
    char buf[8];
    printf("%p %p\n", (void *)work_fn, (void *)lib_fn);
    fflush(stdout);
    ssize_t n = read(0, buf, sizeof buf); /* blocks until the test closes stdin */
    return work_fn((int)n) + lib_fn(1) > 0 ? 0 : 1;
}
"""

LIB_C = r"""
__attribute__((noinline)) int lib_fn(int x) { return x + 1; }
"""

TARGET_CPP = r"""
#include <cstdio>
#include <unistd.h>
namespace serving {
__attribute__((noinline)) int Schedule(int n) { return n * 2; }
struct Engine { __attribute__((noinline)) static int Step(int n); };
int Engine::Step(int n) { return n + 1; }
}
int main() {
    char buf[8];
    std::printf("%p %p\n", (void *)&serving::Schedule, (void *)&serving::Engine::Step);
    std::fflush(stdout);
    ssize_t n = read(0, buf, sizeof buf);
    return serving::Schedule((int)n) + serving::Engine::Step(1) > 0 ? 0 : 1;
}
"""


def _run(*cmd: str | Path) -> str:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{cmd}: {result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def binaries(tmp_path_factory) -> dict[str, Path]:
    if shutil.which("gcc") is None or shutil.which("g++") is None:
        pytest.skip("needs gcc and g++ to build the target processes")
    d = tmp_path_factory.mktemp("symwork")
    (d / "target.c").write_text(TARGET_C)
    (d / "lib.c").write_text(LIB_C)
    (d / "target_cpp.cpp").write_text(TARGET_CPP)
    _run("gcc", "-O1", "-fPIC", "-shared", "-o", d / "libtarget.so", d / "lib.c")
    _run("gcc", "-O1", "-o", d / "target", d / "target.c", "-L", d, "-ltarget",
         f"-Wl,-rpath,{d}")
    _run("g++", "-O1", "-o", d / "target_cpp", d / "target_cpp.cpp")
    return {"target": d / "target", "lib": d / "libtarget.so", "target_cpp": d / "target_cpp"}


class Child:
    """A compiled target blocked on stdin, with the two addresses it printed."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen([str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        first, second = self.proc.stdout.readline().split()
        self.addresses = (int(first, 16), int(second, 16))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def finish(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


@pytest.fixture
def target(binaries):
    child = Child(binaries["target"])
    yield child
    child.finish()


@pytest.fixture
def target_cpp(binaries):
    child = Child(binaries["target_cpp"])
    yield child
    child.finish()


# -- user space -----------------------------------------------------------------------------


def _nm_address(path: Path, name: str) -> int:
    for line in _run("nm", path).splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == name:
            return int(parts[0], 16)
    raise AssertionError(f"{name} not in {path}")


def _load_file_offset(path: Path, vaddr: int) -> int:
    """File offset of vaddr through the LOAD rows of `readelf -lW` (independent of our ELF code)."""
    for line in _run("readelf", "-lW", path).splitlines():
        parts = line.split()
        if parts and parts[0] == "LOAD":
            offset, start, filesz = int(parts[1], 16), int(parts[2], 16), int(parts[4], 16)
            if start <= vaddr < start + filesz:
                return vaddr - start + offset
    raise AssertionError(f"{vaddr:#x} not in a LOAD segment of {path}")


@pytest.mark.skipif(shutil.which("nm") is None or shutil.which("readelf") is None,
                    reason="needs binutils (nm, readelf) for the independent check")
def test_maps_arithmetic_agrees_with_binutils(binaries, target):
    """The address the process printed, mapped back through /proc/PID/maps, is the file offset
    that nm + readelf give for the function."""
    for address, name, path in ((target.addresses[0], "work_fn", binaries["target"]),
                                (target.addresses[1], "lib_fn", binaries["lib"])):
        (mapping,) = [m for m in read_maps(target.pid) if m.start <= address < m.end]
        assert os.path.samefile(mapping.path, path) and mapping.executable
        assert address - mapping.start + mapping.offset == _load_file_offset(
            path, _nm_address(path, name))


def test_user_symbols_of_a_live_process(target):
    work, lib = target.addresses
    symbols = UserSymbols(target.pid)
    assert symbols.error is None
    assert symbols.symbolize(work) == "work_fn+0x0 (target)"
    assert symbols.symbolize(work + 5) == "work_fn+0x5 (target)"
    assert symbols.symbolize(lib) == "lib_fn+0x0 (libtarget.so)"
    assert symbols.symbolize(0x10) == "0x10 [unknown]"
    mapping, name, offset = symbols.lookup(lib + 2)
    assert (mapping.module, name, offset) == ("libtarget.so", "lib_fn", 2)


def test_user_symbols_demangle(target_cpp):
    schedule, step = target_cpp.addresses
    symbols = UserSymbols(target_cpp.pid)
    assert symbols.symbolize(schedule) == "serving::Schedule(int)+0x0 (target_cpp)"
    assert symbols.symbolize(step + 1) == "serving::Engine::Step(int)+0x1 (target_cpp)"


def test_symbolize_stack_user(target):
    work, lib = target.addresses
    frames = symbolize_stack([lib, work + 3, 0x10, 0, 0], pid=target.pid)
    assert frames == ["lib_fn+0x0 (libtarget.so)", "work_fn+0x3 (target)", "0x10 [unknown]"]
    assert symbolize_stack([work, 0], pid=None) == [hex(work)]


def test_return_addresses_are_looked_up_one_byte_earlier(target):
    """A return address equal to a function's start belongs to the function before it (a call
    that was the last instruction); only the first frame is an exact instruction address."""
    work, _ = target.addresses
    symbols = UserSymbols(target.pid)
    assert symbols.symbolize(work) == "work_fn+0x0 (target)"
    assert not symbols.symbolize(work, return_address=True).startswith("work_fn")


def test_exited_process_gives_raw_addresses(binaries):
    child = Child(binaries["target"])
    work, lib = child.addresses
    before = UserSymbols(child.pid)
    child.finish()
    after = UserSymbols(child.pid)
    assert after.error is not None and str(child.pid) in after.error
    assert after.symbolize(work) == f"{work:#x} [unknown]"
    assert symbolize_stack([work, lib], pid=child.pid) == [f"{work:#x} [unknown]",
                                                           f"{lib:#x} [unknown]"]
    # what was read while it lived still resolves
    assert before.symbolize(work) == "work_fn+0x0 (target)"
    before.refresh()
    assert before.symbolize(lib) == "lib_fn+0x0 (libtarget.so)"


def test_nonexistent_pid():
    symbols = UserSymbols(2**22 + 12345)  # above the largest pid_max
    assert symbols.error and symbols.symbolize(0x401000) == "0x401000 [unknown]"


# -- kernel ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel():
    symbols = KernelSymbols.shared()
    if not symbols.available:
        pytest.skip(f"kernel symbols unavailable here: {symbols.unavailable_reason}")
    return symbols


def _unique_text_symbol(preferred: str = "schedule") -> tuple[str, int, int]:
    """(name, address, gap to the next symbol) of a kernel text symbol alone at its address,
    read straight from /proc/kallsyms."""
    rows = []
    with open("/proc/kallsyms") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[1] in "tTwW":
                rows.append((int(parts[0], 16), parts[2]))
    rows.sort()
    candidates = []
    for i in range(1, len(rows) - 1):
        (prev, _), (address, name), (following, _) = rows[i - 1], rows[i], rows[i + 1]
        if prev < address < following and following - address >= 0x20:
            if name == preferred:
                return name, address, following - address
            candidates.append((name, address, following - address))
    return candidates[len(candidates) // 2]


def test_kernel_round_trip(kernel):
    name, address, gap = _unique_text_symbol()
    assert kernel.address_of(name) == address
    assert kernel.symbolize(address) == f"{name}+0x0"
    assert kernel.symbolize(address + 0x10) == f"{name}+0x10"
    assert kernel.lookup(address + gap - 1)[:2] == (name, gap - 1)
    assert symbolize_stack([address, address + 0x10, 0], kernel=True) == [
        f"{name}+0x0", f"{name}+0x10"]


def test_kernel_symbols_hidden(tmp_path):
    fake = tmp_path / "kallsyms"
    fake.write_text("0000000000000000 T _stext\n0000000000000000 T schedule\n"
                    "0000000000000000 t helper\t[some_module]\n")
    symbols = KernelSymbols(str(fake))
    assert not symbols.available and "kptr_restrict" in symbols.unavailable_reason
    assert symbols.symbolize(0xFFFFFFFF81000010) == "0xffffffff81000010"


def test_kernel_symbols_modules_and_order(tmp_path):
    fake = tmp_path / "kallsyms"
    fake.write_text("ffffffff81000100 T second\n"
                    "ffffffff81000000 T first\n"
                    "ffffffff81000080 D some_data\n"
                    "ffffffffc0001000 t nv_ioctl\t[nvidia]\n")
    symbols = KernelSymbols(str(fake))
    assert symbols.available and len(symbols) == 3  # data symbols are left out
    assert symbols.symbolize(0xFFFFFFFF81000090) == "first+0x90"
    assert symbols.symbolize(0xFFFFFFFF81000104) == "second+0x4"
    assert symbols.symbolize(0xFFFFFFFFC0001010) == "nv_ioctl+0x10 [nvidia]"
    assert symbols.symbolize(0x1000) == "0x1000"


def test_kernel_symbols_unreadable(tmp_path):
    symbols = KernelSymbols(str(tmp_path / "missing"))
    assert not symbols.available and "cannot read" in symbols.unavailable_reason
    assert symbols.symbolize(0xFFFFFFFF81000000) == "0xffffffff81000000"
