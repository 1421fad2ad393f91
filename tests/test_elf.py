"""ELF inspection (probec.host.elf) against binaries compiled here and checked with binutils."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from probec.host import elf
from probec.host.elf import (ElfError, ElfFile, close_names, demangle, find_function,
                             resolve_binary)
from probec.host.elf import demangling
from probec.host.elf.symbols import _searchable

TOOLS = ("gcc", "g++", "nm", "readelf", "objdump", "strip")
pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                                reason="needs gcc, g++ and binutils (nm, readelf, objdump)")

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
LIBSTDCXX = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6"

PROG_C = r"""
#include <stdio.h>
#include <sys/sdt.h>
int lib_fn(int x);
int gated_fn(int x);
__attribute__((noinline)) int work_fn(int x) {
    DTRACE_PROBE2(probec_test, work_start, x, (long)x * 2);
    return x * 7 + 1;
}
__attribute__((noinline)) int other_fn(int x) { return x - 1; }
int main(int argc, char **argv) {
    (void)argv;
    printf("%d\n", work_fn(argc) + other_fn(argc) + lib_fn(argc) + gated_fn(argc));
    return 0;
}
"""

# sys/sdt.h gives every probe of a translation unit a semaphore once _SDT_HAS_SEMAPHORES is
# defined, so the gated probe lives in a file of its own.
GATED_C = r"""
#define _SDT_HAS_SEMAPHORES 1
#include <sys/sdt.h>
unsigned short probec_test_gated_semaphore __attribute__((unused))
    __attribute__((section(".probes")));
__attribute__((noinline)) int gated_fn(int x) {
    if (probec_test_gated_semaphore)
        DTRACE_PROBE1(probec_test, gated, x);
    return x + 3;
}
"""

LIB_C = r"""
#include <sys/sdt.h>
__attribute__((noinline)) int lib_fn(int x) {
    DTRACE_PROBE2(probec_lib, lib_call, x, x + 1);
    return x + 1;
}
"""

INFERENCE_CPP = r"""
#include <cstdio>
#include <string>
namespace serving {
class Engine { public: __attribute__((noinline)) int Step(int n); };
int Engine::Step(int n) { return n * 3; }
}
class Inference {
 public:
  Inference();
  __attribute__((noinline)) void Warmup(int n);
  __attribute__((noinline)) void Warmup(double d);
  __attribute__((noinline)) int Forward(int x) const;
  __attribute__((noinline)) std::string name() const;
  int v = 0;
};
Inference::Inference() { v = 1; }
void Inference::Warmup(int n) { v += n; }
void Inference::Warmup(double d) { v += (int)d; }
int Inference::Forward(int x) const { return x + v; }
std::string Inference::name() const { return "inf"; }
template <typename T> __attribute__((noinline)) T twice(T x) { return x + x; }
int main(int argc, char **) {
  Inference inf; inf.Warmup(argc); inf.Warmup(2.0);
  serving::Engine e;
  std::printf("%d %d %d %s\n", inf.Forward(3), e.Step(argc), twice<int>(argc), inf.name().c_str());
  return 0;
}
"""


def _run(*cmd: str | Path) -> str:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{cmd}: {result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """prog (CET on), prog_nocet, libusdtlib.so and the C++ inference binary."""
    d = tmp_path_factory.mktemp("elfwork")
    for name, text in (("prog.c", PROG_C), ("gated.c", GATED_C), ("lib.c", LIB_C),
                       ("inference.cpp", INFERENCE_CPP)):
        (d / name).write_text(text)
    lib = d / "libusdtlib.so"
    _run("gcc", "-O1", "-fPIC", "-shared", "-fcf-protection=full", "-o", lib, d / "lib.c")
    link = ["-L", d, "-lusdtlib", f"-Wl,-rpath,{d}"]
    _run("gcc", "-O1", "-fcf-protection=full", "-o", d / "prog", d / "prog.c", d / "gated.c", *link)
    _run("gcc", "-O1", "-fcf-protection=none", "-o", d / "prog_nocet", d / "prog.c",
         d / "gated.c", *link)
    _run("g++", "-O1", "-o", d / "inference", d / "inference.cpp")
    return {"prog": d / "prog", "prog_nocet": d / "prog_nocet", "lib": lib,
            "inference": d / "inference", "dir": d}


# -- headers, symbols, addresses -----------------------------------------------------------


def _nm_functions(path: Path, dynamic: bool = False) -> set[tuple[str, int]]:
    """(name without @VERSION, address) of FUNC and GNU_IFUNC symbols, from `nm -f sysv`."""
    out = _run("nm", "-f", "sysv", "--defined-only", *(["-D"] if dynamic else []), path)
    found = set()
    for line in out.splitlines():
        fields = [field.strip() for field in line.split("|")]
        if len(fields) == 7 and fields[3] in ("FUNC", "<OS specific>: 10"):
            found.add((fields[0].split("@", 1)[0], int(fields[1], 16)))
    return found


def _readelf_loads(path: Path) -> list[tuple[int, int, int]]:
    """(offset, vaddr, filesz) of each LOAD row of `readelf -lW`."""
    rows = []
    for line in _run("readelf", "-lW", path).splitlines():
        parts = line.split()
        if parts and parts[0] == "LOAD":
            rows.append((int(parts[1], 16), int(parts[2], 16), int(parts[4], 16)))
    return rows


def _readelf_text_section(path: Path) -> tuple[int, int, int]:
    """(address, offset, size) of .text from `readelf -SW`."""
    for line in _run("readelf", "-SW", path).splitlines():
        match = re.search(r"\]\s+\.text\s+PROGBITS\s+([0-9a-f]+)\s+([0-9a-f]+)\s+([0-9a-f]+)", line)
        if match:
            return tuple(int(g, 16) for g in match.groups())
    raise AssertionError(f"no .text in {path}")


def test_header_sections_segments(built):
    with ElfFile(built["prog"]) as f:
        assert (f.elf_type, f.machine) == ("DYN", "x86-64")
        assert f.section(".text") is not None and f.section(".note.stapsdt") is not None
        assert [s.vaddr for s in f.segments if s.is_load] == [v for _, v, _ in
                                                                _readelf_loads(built["prog"])]
        assert any(s.is_load and s.is_executable for s in f.segments)


def test_build_id_matches_readelf(built):
    for path in (built["prog"], built["lib"], LIBC):
        expected = re.search(r"Build ID: ([0-9a-f]+)", _run("readelf", "-n", path)).group(1)
        assert ElfFile(path).build_id == expected


@pytest.mark.parametrize("key,dynamic", [("prog", False), ("lib", False), ("lib", True),
                                         ("inference", False)])
def test_functions_match_nm(built, key, dynamic):
    path = built[key]
    table = ".dynsym" if dynamic else ".symtab"
    ours = {(s.name, s.value) for s in ElfFile(path).defined_functions() if s.table == table}
    assert ours == _nm_functions(path, dynamic)


def test_libc_dynamic_functions_match_nm():
    ours = {(s.name, s.value) for s in ElfFile(LIBC).defined_functions()}
    assert ours == _nm_functions(Path(LIBC), dynamic=True)


def test_symbol_fields(built):
    f = ElfFile(built["prog"])
    (work,) = f.find_function("work_fn")
    assert (work.type, work.bind, work.table) == ("FUNC", "GLOBAL", ".symtab")
    assert work.size > 0 and work.defined
    assert f.sections[work.shndx].name == ".text"
    semaphores = [s for s in f.symbols if s.name == "probec_test_gated_semaphore"]
    assert semaphores and semaphores[0].type == "OBJECT" and semaphores[0].size == 2


@pytest.mark.parametrize("key", ["prog", "lib", "inference"])
def test_vaddr_to_file_offset_agrees_with_readelf(built, key):
    path = built[key]
    f = ElfFile(path)
    text_addr, text_offset, _ = _readelf_text_section(path)
    loads = _readelf_loads(path)
    checked = 0
    for name, address in _nm_functions(path):
        section = f.sections[f.find_function(name)[0].shndx] if f.find_function(name) else None
        offset = f.vaddr_to_file_offset(address)
        # independent 1: through the LOAD rows of readelf -l
        (expected,) = [address - vaddr + off for off, vaddr, size in loads
                       if vaddr <= address < vaddr + size]
        assert offset == expected, name
        # independent 2: what libbpf does, through the section header of .text
        if section is not None and section.name == ".text":
            assert offset == address - text_addr + text_offset, name
            checked += 1
        assert f.file_offset_to_vaddr(offset) == address
    assert checked >= 2


def test_vaddr_outside_segments_is_an_error(built):
    f = ElfFile(built["prog"])
    with pytest.raises(ElfError, match="not inside any PT_LOAD"):
        f.vaddr_to_file_offset(0x7FFF_0000_0000)


# -- function bytes, endbr64 ----------------------------------------------------------------


def _objdump_first_bytes(path: Path, function: str, count: int) -> bytes:
    out = _run("objdump", "-d", f"--disassemble={function}", path)
    data = bytearray()
    for line in out.splitlines():
        match = re.match(r"\s+[0-9a-f]+:\t((?:[0-9a-f]{2} )+)", line)
        if match:
            data += bytes.fromhex(match.group(1))
            if len(data) >= count:
                break
    return bytes(data[:count])


def test_entry_bytes_and_endbr64(built):
    cet, nocet = ElfFile(built["prog"]), ElfFile(built["prog_nocet"])
    expected = _objdump_first_bytes(built["prog"], "work_fn", 8)
    assert cet.function_entry_bytes("work_fn", 8) == expected
    assert cet.function_entry_bytes("work_fn")[:4] == b"\xf3\x0f\x1e\xfa"
    assert cet.starts_with_endbr64("work_fn") and cet.starts_with_endbr64("other_fn")
    assert not nocet.starts_with_endbr64("work_fn")
    assert not nocet.starts_with_endbr64(nocet.find_function("other_fn")[0])
    assert ElfFile(built["lib"]).starts_with_endbr64("lib_fn")


def test_entry_bytes_are_capped_by_function_size(built):
    f = ElfFile(built["prog_nocet"])
    (other,) = f.find_function("other_fn")
    assert len(f.function_entry_bytes(other, 4096)) == other.size


def test_entry_bytes_of_unknown_or_ambiguous_function(built):
    f = ElfFile(built["inference"])
    with pytest.raises(ElfError, match="no function 'nope'"):
        f.function_entry_bytes("nope")
    with pytest.raises(ElfError, match=r"ambiguous.*Warmup\(int\).*Warmup\(double\)"):
        f.starts_with_endbr64("Inference::Warmup")


# -- C++ names ------------------------------------------------------------------------------


def test_demangle():
    assert demangle("_ZN9Inference6WarmupEi") == "Inference::Warmup(int)"
    assert demangle("_ZNK9Inference7ForwardEi") == "Inference::Forward(int) const"
    assert demangle("_ZN9Inference6WarmupEi@@VERS_1") == "Inference::Warmup(int)"
    assert demangle("work_fn") == "work_fn"
    assert demangle("_Znot_really") == "_Znot_really"


def test_demangle_without_libstdcxx(monkeypatch):
    monkeypatch.setattr(demangling, "_cxa_demangle", lambda: None)
    elf.demangle.cache_clear()
    try:
        assert demangle("_ZN9Inference6WarmupEi") == "_ZN9Inference6WarmupEi"
    finally:
        elf.demangle.cache_clear()


def _demangled(path: Path, name: str) -> list[str]:
    return [s.demangled for s in find_function(path, name)]


def test_overloads_are_ambiguous(built):
    assert _demangled(built["inference"], "Inference::Warmup") == [
        "Inference::Warmup(int)", "Inference::Warmup(double)"]


@pytest.mark.parametrize("query,expected", [
    ("Inference::Warmup(int)", "Inference::Warmup(int)"),
    ("Inference::Warmup( double )", "Inference::Warmup(double)"),
    ("Inference::Forward", "Inference::Forward(int) const"),
    ("Inference::Forward(int)", "Inference::Forward(int) const"),
    ("Inference::Forward(int) const", "Inference::Forward(int) const"),
    ("serving::Engine::Step", "serving::Engine::Step(int)"),
    ("::serving::Engine::Step(int)", "serving::Engine::Step(int)"),
    ("Inference::name", "Inference::name[abi:cxx11]() const"),
    ("twice", "int twice<int>(int)"),
    ("twice<int>(int)", "int twice<int>(int)"),
    ("_ZN9Inference6WarmupEd", "Inference::Warmup(double)"),
    ("main", "main"),
])
def test_find_function_cpp(built, query, expected):
    assert _demangled(built["inference"], query) == [expected]


def test_constructor_aliases_are_one_candidate(built):
    path = built["inference"]
    aliases = [line for line in _run("nm", path).splitlines() if "9InferenceC" in line]
    assert len(aliases) == 2 and len({line.split()[0] for line in aliases}) == 1  # C1 == C2
    (ctor,) = find_function(path, "Inference::Inference")
    assert ctor.demangled == "Inference::Inference()"


def test_unqualified_or_wrong_names_do_not_match(built):
    for query in ("Warmup", "Engine::Step", "Inference::Warmup(float)", "work_fn", ""):
        assert find_function(built["inference"], query) == []


def test_close_names(built):
    assert close_names(built["inference"], "Inference::Froward")[0] == "Inference::Forward"
    assert "Inference::Warmup" in close_names(built["inference"], "Warmpu")
    assert set(close_names(built["inference"], "Inference::Warmup(float)", n=2)) == {
        "Inference::Warmup(double)", "Inference::Warmup(int)"}
    assert close_names(built["prog"], "work_fm") == ["work_fn"]
    assert close_names(built["prog"], "zzzzzzzz") == []


def test_libc_versions_and_ifunc():
    (malloc,) = find_function(LIBC, "malloc")
    assert malloc.version and malloc.version.startswith("GLIBC_") and not malloc.hidden_version
    # memcpy has a default (GLIBC_2.14) and an old hidden version at two addresses
    (memcpy,) = find_function(LIBC, "memcpy")
    assert memcpy.type == "GNU_IFUNC" and memcpy.version == "GLIBC_2.14"
    (getpid,) = find_function(LIBC, "getpid")  # getpid and __getpid are aliases
    assert getpid.name == "getpid"


VERSIONED_C = r"""
__attribute__((noinline)) int foo_old(int x) { return x; }
__attribute__((noinline)) int foo_new(int x) { return x + 1; }
__asm__(".symver foo_old,foo@VER_1");
__asm__(".symver foo_new,foo@@VER_2");
"""


def test_symbol_versions(tmp_path):
    (tmp_path / "ver.c").write_text(VERSIONED_C)
    (tmp_path / "ver.map").write_text("VER_1 { global: foo; local: *; };\n"
                                      "VER_2 { global: foo; } VER_1;\n")
    lib = tmp_path / "libver.so"
    _run("gcc", "-O1", "-shared", "-fPIC", f"-Wl,--version-script={tmp_path / 'ver.map'}",
         "-o", lib, tmp_path / "ver.c")
    f = ElfFile(lib)
    nm = {line.split()[2]: int(line.split()[0], 16) for line in _run("nm", "-D", lib).splitlines()
          if "foo@" in line}
    (default,) = f.find_function("foo")
    assert (default.value, default.version, default.hidden_version) == (nm["foo@@VER_2"], "VER_2",
                                                                        False)
    (old,) = f.find_function("foo@VER_1")
    assert (old.value, old.version, old.hidden_version) == (nm["foo@VER_1"], "VER_1", True)
    stripped = tmp_path / "libver_stripped.so"
    _run("strip", "-o", stripped, lib)  # .dynsym and .gnu.version only
    assert [s.value for s in find_function(stripped, "foo")] == [nm["foo@@VER_2"]]
    assert [s.value for s in find_function(stripped, "foo@VER_1")] == [nm["foo@VER_1"]]


def test_libstdcxx_lookup():
    joins = find_function(LIBSTDCXX, "std::thread::join")
    assert [s.demangled for s in joins] == ["std::thread::join()"]
    assert find_function(LIBSTDCXX, "_ZNSt6thread4joinEv") == joins
    assert len(find_function(LIBSTDCXX, "std::__cxx11::basic_string::append")) > 1
    ctors = find_function(LIBSTDCXX, "std::allocator<char>::allocator")  # Sa: no prefilter
    assert "std::allocator<char>::allocator()" in [s.demangled for s in ctors]


def _lookup_queries(f: ElfFile, every: int) -> list[str]:
    """Names a spec could use for every `every`-th function of `f`, plus some that miss."""
    queries = {"nope", "nope@VER_1", "Inference::Nope", "std::nope::join", "operator new",
               "caf\u00e9", "a\0b"}
    for symbol in f.defined_functions()[::every]:
        queries |= {symbol.name, symbol.name.split("@", 1)[0]}
        if symbol.name.startswith("_Z"):
            full = demangle(symbol.name)
            queries |= {full, elf.qualified_name(full), full.rsplit("::", 1)[-1]}
    return sorted(queries)


@pytest.mark.parametrize("key,every", [("workloads:inference", 1), ("workloads:libinference.so", 1),
                                       ("workloads:pwork", 1), ("workloads:libpwork.so", 1),
                                       ("inference", 1), ("prog", 1), ("libc", 25),
                                       ("libstdc++", 150)])
def test_string_table_search_agrees_with_decoded_names(built, workloads, key, every):
    """Lookups search the string tables' bytes; walking every decoded name, as the tables
    were read before (and still are once something decoded them), gives the same answers.
    The binaries hold names that start inside another string (linkers share tails)."""
    path = {"libc": Path(LIBC), "libstdc++": Path(LIBSTDCXX)}.get(key) or (
        workloads / key.split(":", 1)[1] if key.startswith("workloads:") else built[key])
    searched = ElfFile(path)
    decoded = ElfFile(path)
    decoded.symbols  # decodes every name: lookups then use the name lists
    queries = _lookup_queries(decoded, every)
    for query in queries:
        for table in searched._tables():
            if _searchable(query):
                assert table._named_by_search(query) == table._named_in_list(query), query
        assert (searched._demangled_matches(query, search=True)
                == searched._demangled_matches(query, search=False)), query
    for query in queries:  # a fresh file: nothing decoded on the searching side
        assert ElfFile(path).find_function(query) == decoded.find_function(query), query


TAIL_CPP = r"""
namespace tail { __attribute__((noinline)) int shared(int x) { return x + 1; } }
extern "C" __attribute__((noinline)) int x_ZN4tail6sharedEi(int x) { return x + 2; }
"""


def test_mangled_name_inside_another_string(tmp_path):
    """The linker keeps `_ZN4tail6sharedEi` only as the tail of `x_ZN4tail6sharedEi`, so the
    entry of tail::shared points into the middle of a string; the search still finds it."""
    (tmp_path / "tail.cpp").write_text(TAIL_CPP)
    lib = tmp_path / "libtail.so"
    _run("g++", "-O1", "-shared", "-fPIC", "-o", lib, tmp_path / "tail.cpp")
    f = ElfFile(lib)
    for table in f._tables():
        (cpp,) = table.functions_named("_ZN4tail6sharedEi")
        (c,) = table.functions_named("x_ZN4tail6sharedEi")
        assert table.entry(cpp)[0] == table.entry(c)[0] + 1  # shares the string
    for query in ("tail::shared", "tail::shared(int)", "_ZN4tail6sharedEi"):
        assert [s.demangled for s in ElfFile(lib).find_function(query)] == ["tail::shared(int)"]
        assert (f._demangled_matches(query, search=True)
                == f._demangled_matches(query, search=False))
    (c_function,) = ElfFile(lib).find_function("x_ZN4tail6sharedEi")
    assert c_function.name == "x_ZN4tail6sharedEi"

# -- USDT -----------------------------------------------------------------------------------


def _readelf_usdt(path: Path | str) -> list[dict[str, object]]:
    probes = []
    for block in _run("readelf", "-nW", path).split("Provider: ")[1:]:
        location = re.search(r"Location: (0x[0-9a-f]+), Base: (0x[0-9a-f]+), "
                             r"Semaphore: (0x[0-9a-f]+)", block)
        arguments = re.search(r"Arguments: ?(.*)", block)
        probes.append({
            "provider": block.split()[0],
            "name": re.search(r"Name: (\S+)", block).group(1),
            "pc": int(location.group(1), 16),
            "base": int(location.group(2), 16),
            "semaphore": int(location.group(3), 16),
            "arguments": arguments.group(1).strip() if arguments else "",
        })
    return probes


def _as_dicts(probes) -> list[dict[str, object]]:
    return [{"provider": p.provider, "name": p.name, "pc": p.pc, "base": p.base,
             "semaphore": p.semaphore, "arguments": p.arguments} for p in probes]


@pytest.mark.parametrize("key", ["prog", "lib"])
def test_usdt_matches_readelf(built, key):
    probes = elf.usdt_probes(built[key])
    assert probes and _as_dicts(probes) == _readelf_usdt(built[key])


def test_usdt_probe_details(built):
    f = ElfFile(built["prog"])
    by_name = {(p.provider, p.name): p for p in f.usdt_probes()}
    work = by_name["probec_test", "work_start"]
    assert work.semaphore == 0
    assert [(a.size, a.signed) for a in work.args] == [(4, True), (8, True)]
    (work_fn,) = f.find_function("work_fn")
    assert work_fn.value <= work.pc < work_fn.value + work_fn.size
    gated = by_name["probec_test", "gated"]
    (semaphore,) = [s for s in f.symbols if s.name == "probec_test_gated_semaphore"]
    assert gated.semaphore == semaphore.value != 0
    assert f.sections[semaphore.shndx].name == ".probes"
    (lib_probe,) = ElfFile(built["lib"]).usdt_probes()
    assert (lib_probe.provider, lib_probe.name) == ("probec_lib", "lib_call")
    assert len(lib_probe.args) == 2


def test_usdt_in_libstdcxx_matches_readelf():
    # a real-world note in a non-allocated section with a .stapsdt.base
    assert _as_dicts(elf.usdt_probes(LIBSTDCXX)) == _readelf_usdt(LIBSTDCXX)


def test_usdt_base_adjustment(built, tmp_path):
    """A note whose recorded base differs from .stapsdt.base (as after prelink) has its pc and
    semaphore moved by the difference, as the SDT note specification says."""
    original = ElfFile(built["prog"])
    before = {p.name: p for p in original.usdt_probes()}
    note = original.section(".note.stapsdt")
    data = bytearray(built["prog"].read_bytes())
    shift = 0x1000
    pos = note.offset
    while pos < note.offset + note.size:  # rewrite the base field of every note
        namesz, descsz, _ = struct.unpack_from("<III", data, pos)
        desc = pos + 12 + ((namesz + 3) & ~3)
        pc, base, semaphore = struct.unpack_from("<QQQ", data, desc)
        struct.pack_into("<QQQ", data, desc, pc, base - shift, semaphore)
        pos = desc + ((descsz + 3) & ~3)
    patched = tmp_path / "prog_moved"
    patched.write_bytes(bytes(data))
    after = {p.name: p for p in ElfFile(patched).usdt_probes()}
    assert after["work_start"].pc == before["work_start"].pc + shift
    assert after["work_start"].base == before["work_start"].base - shift
    assert after["work_start"].semaphore == 0
    assert after["gated"].semaphore == before["gated"].semaphore + shift


def test_no_usdt(built):
    assert ElfFile(built["inference"]).usdt_probes() == []


# -- errors ---------------------------------------------------------------------------------


def _elf_error(path: Path | str) -> ElfError:
    with pytest.raises(ElfError) as info:
        ElfFile(path)
    assert str(path) in str(info.value) and info.value.path == str(path)
    return info.value


def test_error_cases(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("just some text\n")
    assert "not an ELF file" in str(_elf_error(text))
    assert "no such file" in str(_elf_error(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert "empty file" in str(_elf_error(empty))
    assert "directory" in str(_elf_error(tmp_path))
    elf32 = tmp_path / "elf32"
    elf32.write_bytes(b"\x7fELF\x01\x01\x01" + bytes(60))
    assert "32-bit" in str(_elf_error(elf32))
    big = tmp_path / "big"
    big.write_bytes(b"\x7fELF\x02\x02\x01" + bytes(60))
    assert "big-endian" in str(_elf_error(big))
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"\x7fELF\x02\x01")
    assert "truncated" in str(_elf_error(tiny))


def test_truncated_files_raise_elf_error_saying_so(built, tmp_path):
    """A file cut anywhere (a copy in progress, a full disk) is refused when opened, with a
    message naming it and the table that runs past its end, whatever the cut."""
    data = built["prog"].read_bytes()
    f = ElfFile(built["prog"])
    interesting = sorted({64, 100, 1000, len(data) // 2, len(data) - 1}
                         | {s.offset + 8 for s in f.sections if s.size}
                         | {s.offset + s.size - 1 for s in f.sections if s.size})
    sample = tmp_path / "sample"
    for cut in interesting:
        sample.write_bytes(data[:cut])
        error = _elf_error(sample)
        assert re.search(r"truncated or corrupt ELF file: section header \d+ at offset 0x[0-9a-f]+ \(64 bytes\) "
                         rf"runs past the end of the file \({cut} bytes\)", str(error)), (cut, str(error))


def test_corrupt_header_fields_raise_elf_error_naming_them(built, tmp_path):
    data = built["prog"].read_bytes()
    sample = tmp_path / "sample"
    shentsize = bytearray(data)
    shentsize[58] ^= 0xFF                            # e_shentsize 64 -> 191
    sample.write_bytes(bytes(shentsize))
    assert "corrupt ELF file: section header size 191" in str(_elf_error(sample))
    shnum = bytearray(data)
    shnum[60] ^= 0xFF                                # e_shnum n -> n ^ 255: more headers than the file holds
    sample.write_bytes(bytes(shnum))
    assert "runs past the end of the file" in str(_elf_error(sample))


def test_corrupt_files_raise_only_elf_error(built, tmp_path):
    """Flipped bytes in the headers and tables: each file either reads or raises ElfError naming
    it; no other exception escapes (see _exercise)."""
    data = built["prog"].read_bytes()
    f = ElfFile(built["prog"])
    sample = tmp_path / "sample"
    refused = 0
    for position in [16, 32, 40, 58, 60, 62] + [s.offset for s in f.sections if s.size][:20]:
        corrupt = bytearray(data)
        corrupt[position] ^= 0xFF
        sample.write_bytes(bytes(corrupt))
        refused += not _exercise(sample)
    assert refused >= 2        # at least the two header fields above


def _exercise(path: Path) -> bool:
    """Whether every reader accepts the file; an ElfError must name it."""
    try:
        f = ElfFile(path)
        f.symbols
        f.build_id
        f.usdt_probes()
        for symbol in f.find_function("work_fn"):
            f.function_entry_bytes(symbol)
        f.close_names("work_fm")
    except ElfError as exc:
        assert str(path) in str(exc)
        return False
    return True


# -- finding binaries -----------------------------------------------------------------------


def test_resolve_binary_paths(built, monkeypatch):
    assert resolve_binary(str(built["prog"])) == os.path.realpath(built["prog"])
    monkeypatch.chdir(built["dir"])
    assert resolve_binary("./libusdtlib.so") == os.path.realpath(built["lib"])
    with pytest.raises(ElfError, match=r"/no/such/libx\.so: no such file"):
        resolve_binary("/no/such/libx.so")


def test_resolve_binary_by_library_name():
    libc = resolve_binary("libc.so.6")
    assert libc == os.path.realpath(LIBC)
    assert ElfFile(libc).find_function("malloc")
    assert resolve_binary("libstdc++.so.6") == os.path.realpath(LIBSTDCXX)
    assert resolve_binary("libc.so") == libc  # unique NAME.* match in the ldconfig cache
    assert resolve_binary("gcc") == os.path.realpath(shutil.which("gcc"))  # on $PATH


def test_resolve_binary_reports_where_it_looked():
    with pytest.raises(ElfError) as info:
        resolve_binary("libprobec-no-such-lib.so.9")
    message = str(info.value)
    assert message.startswith("libprobec-no-such-lib.so.9: binary not found")
    assert "ldconfig" in message
    assert "/usr/lib/x86_64-linux-gnu/libprobec-no-such-lib.so.9" in message
