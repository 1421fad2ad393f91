"""Objects and programs: a BPF ELF object opened, configured (``.rodata`` settings, autoload, map
sizes), loaded and closed; its programs, attached by kind; run-time stats of a program."""

from __future__ import annotations

import ctypes
import errno as _errno
import os
from ctypes import byref, c_size_t, c_uint32, sizeof
from dataclasses import dataclass
from typing import Callable, Sequence

from . import perf
from .errors import BpfError, Call, kprobe_hint, load_hint, logger, tracefs_hint
from .ffi import (BpfProgInfo, BtfType, BtfVarSecinfo, Closing, ObjectOpenOpts, UprobeOpts, UsdtOpts, claim_print, cstr,
                  lib)
from .links import Link, LinkGroup
from .maps import Map

BPF_STATS_RUN_TIME = 0
BTF_KIND_DATASEC = 15


# --------------------------------------------------------------------------
# programs


@dataclass(frozen=True)
class ProgramInfo:
    id: int
    type: int
    name: str
    tag: str
    run_time_ns: int
    run_cnt: int
    recursion_misses: int
    verified_insns: int
    xlated_prog_len: int
    jited_prog_len: int


def program_info(prog: "Program | int") -> ProgramInfo:
    """bpf_obj_get_info_by_fd on a program (or a raw program fd).

    run_time_ns/run_cnt only advance while stats are enabled (enable_stats()).
    """
    fd = prog.fd if isinstance(prog, Program) else int(prog)
    info = BpfProgInfo()
    info_len = c_uint32(sizeof(info))
    call = Call(f"bpf_obj_get_info_by_fd(prog fd {fd})")
    call.check_int(lib().bpf_obj_get_info_by_fd(fd, byref(info), byref(info_len)))
    return ProgramInfo(
        id=info.id,
        type=info.type,
        name=info.name.decode(errors="replace"),
        tag=bytes(info.tag).hex(),
        run_time_ns=info.run_time_ns,
        run_cnt=info.run_cnt,
        recursion_misses=info.recursion_misses,
        verified_insns=info.verified_insns,
        xlated_prog_len=info.xlated_prog_len,
        jited_prog_len=info.jited_prog_len,
    )


def enable_stats() -> int:
    """Turn on BPF run-time stats (BPF_STATS_RUN_TIME); returns an fd.

    Stats stay on while the fd is open: keep it, and os.close() it when done.
    """
    call = Call("bpf_enable_stats(BPF_STATS_RUN_TIME)")
    return call.check_int(lib().bpf_enable_stats(BPF_STATS_RUN_TIME))


class Program:
    """One program of a BpfObject (struct bpf_program)."""

    def __init__(self, obj: "BpfObject", ptr: int):
        self._obj = obj
        self._ptr = ptr
        libbpf = lib()
        self.name: str = libbpf.bpf_program__name(ptr).decode()
        self.section_name: str = (libbpf.bpf_program__section_name(ptr) or b"").decode()

    @property
    def ptr(self) -> int:
        self._obj._check_open()
        return self._ptr

    @property
    def fd(self) -> int:
        fd = lib().bpf_program__fd(self.ptr)
        if fd < 0:
            raise BpfError(f"program '{self.name}' has no fd (object not loaded, or autoload off)")
        return fd

    @property
    def type(self) -> int:
        return lib().bpf_program__type(self.ptr)

    @property
    def autoload(self) -> bool:
        return bool(lib().bpf_program__autoload(self.ptr))

    @autoload.setter
    def autoload(self, value: bool) -> None:
        call = Call(f"bpf_program__set_autoload({self.name}, {bool(value)})")
        call.check_int(lib().bpf_program__set_autoload(self.ptr, bool(value)))

    def info(self) -> ProgramInfo:
        return program_info(self)

    INSN_BYTES = 8      # struct bpf_insn

    def insns(self) -> bytes:
        """The program's instructions as libbpf holds them (before load: as in the object file)."""
        libbpf = lib()
        n = libbpf.bpf_program__insn_cnt(self.ptr)
        return ctypes.string_at(libbpf.bpf_program__insns(self.ptr), n * self.INSN_BYTES) if n else b""

    def set_insns(self, code: bytes) -> None:
        """Replace the instructions before load (libbpf applies its relocations to them at load)."""
        self._obj._before_load(f"set the instructions of {self.name}")
        buf = ctypes.create_string_buffer(code, len(code))
        call = Call(f"bpf_program__set_insns({self.name})")
        call.check_int(lib().bpf_program__set_insns(self.ptr, buf, len(code) // self.INSN_BYTES))

    def _attach(
        self,
        op: str,
        attach: Callable[[], int | None],
        description: str,
        hint: Callable[[int], str | None] | None = None,
    ) -> Link:
        """Run one bpf_program__attach_*() call (``op`` names it in errors); keep its link."""
        claim_print()
        call = Call(op)
        ptr = call.check_ptr(attach(), hint)
        return self._obj._keep_link(Link(ptr, description, self._obj))

    def attach(self) -> Link:
        """Auto-attach from the SEC() name (tp/, raw_tp/, tp_btf/, uprobe/x:y, ...)."""
        return self._attach(
            f"bpf_program__attach({self.name}, SEC {self.section_name!r})",
            lambda: lib().bpf_program__attach(self.ptr),
            f"{self.name}@{self.section_name}",
            lambda err: f"SEC({self.section_name!r}) names no attach target: use attach_uprobe(), "
            "attach_usdt(), attach_cpu_clock() or attach_tracepoint() with one"
            if err == _errno.EOPNOTSUPP
            else None,
        )

    def attach_tracepoint(self, category: str, name: str) -> Link:
        return self._attach(
            f"bpf_program__attach_tracepoint({self.name} -> {category}:{name})",
            lambda: lib().bpf_program__attach_tracepoint(self.ptr, category.encode(), name.encode()),
            f"{self.name}@tracepoint:{category}:{name}",
            tracefs_hint,
        )

    def attach_raw_tracepoint(self, name: str) -> Link:
        return self._attach(
            f"bpf_program__attach_raw_tracepoint({self.name} -> {name})",
            lambda: lib().bpf_program__attach_raw_tracepoint(self.ptr, name.encode()),
            f"{self.name}@raw_tp:{name}",
        )

    def attach_kprobe(self, func_name: str, retprobe: bool = False) -> Link:
        kind = "kretprobe" if retprobe else "kprobe"
        return self._attach(
            f"bpf_program__attach_kprobe({self.name} -> {kind}:{func_name})",
            lambda: lib().bpf_program__attach_kprobe(self.ptr, bool(retprobe), func_name.encode()),
            f"{self.name}@{kind}:{func_name}",
            kprobe_hint,
        )

    def attach_uprobe(
        self,
        binary_path: str | os.PathLike,
        func_name: str | None = None,
        offset: int = 0,
        *,
        retprobe: bool = False,
        pid: int = -1,
        cookie: int = 0,
        ref_ctr_offset: int = 0,
    ) -> Link:
        """uprobe/uretprobe on ``binary_path``.

        With ``func_name``, ``offset`` is relative to the symbol; without it,
        ``offset`` is a file offset.  ``pid`` -1 means every process.
        """
        opts = UprobeOpts(
            ref_ctr_offset=ref_ctr_offset,
            bpf_cookie=cookie,
            retprobe=bool(retprobe),
            func_name=cstr(func_name),
        )
        kind = "uretprobe" if retprobe else "uprobe"
        where = f"{os.fspath(binary_path)}:{func_name or ''}{'+' if func_name and offset else ''}"
        where += f"{offset:#x}" if offset or not func_name else ""
        return self._attach(
            f"bpf_program__attach_uprobe_opts({self.name} -> {kind}:{where}, pid {pid})",
            lambda: lib().bpf_program__attach_uprobe_opts(
                self.ptr, pid, cstr(binary_path), offset, ctypes.addressof(opts)
            ),
            f"{self.name}@{kind}:{where}",
            lambda err: f"no symbol '{func_name}' in {os.fspath(binary_path)}? check `nm -D`/`nm` on it"
            if err == _errno.ENOENT and func_name
            else None,
        )

    def attach_usdt(
        self,
        binary_path: str | os.PathLike,
        provider: str,
        name: str,
        *,
        pid: int = -1,
        cookie: int = 0,
    ) -> Link:
        opts = UsdtOpts(usdt_cookie=cookie)
        where = f"{os.fspath(binary_path)}:{provider}:{name}"
        return self._attach(
            f"bpf_program__attach_usdt({self.name} -> usdt:{where}, pid {pid})",
            lambda: lib().bpf_program__attach_usdt(
                self.ptr, pid, cstr(binary_path), provider.encode(), name.encode(), ctypes.addressof(opts)
            ),
            f"{self.name}@usdt:{where}",
            lambda err: f"no USDT probe {provider}:{name} in {os.fspath(binary_path)}? check `readelf -n`"
            if err == _errno.ENOENT
            else None,
        )

    def attach_perf_event(self, pfd: int, description: str | None = None) -> Link:
        """Attach to an open perf event fd; the link takes ownership of ``pfd``."""
        return self._attach(
            f"bpf_program__attach_perf_event({self.name} -> perf fd {pfd})",
            lambda: lib().bpf_program__attach_perf_event(self.ptr, pfd),
            description or f"{self.name}@perf_event:fd{pfd}",
        )

    def attach_cpu_clock(self, frequency_hz: int, cpus: Sequence[int] | None = None) -> LinkGroup:
        """``profile``: a software cpu-clock event at ``frequency_hz`` on each CPU."""
        return perf.attach_cpu_clock(self, frequency_hz, cpus)

    def attach_interval(self, period_ns: int) -> LinkGroup:
        """``interval``: the cpu-clock event once every ``period_ns`` on one CPU (the first
        online), as bpftrace's interval probes fire on one CPU."""
        return perf.attach_interval(self, period_ns)

    def __repr__(self) -> str:
        return f"<Program {self.name} SEC {self.section_name!r}>"


# --------------------------------------------------------------------------
# the object


class BpfObject(Closing):
    """A BPF ELF object: open, configure, load, attach, read; close when done."""

    def __init__(self, ptr: int, path: str):
        self._ptr: int | None = ptr
        self.path = path
        self.loaded = False
        self._links: list[Link] = []
        libbpf = lib()
        self.name: str = (libbpf.bpf_object__name(ptr) or b"").decode()
        self.programs: dict[str, Program] = {}
        p = libbpf.bpf_object__next_program(ptr, None)
        while p:
            prog = Program(self, p)
            self.programs[prog.name] = prog
            p = libbpf.bpf_object__next_program(ptr, p)
        self.maps: dict[str, Map] = {}
        m = libbpf.bpf_object__next_map(ptr, None)
        while m:
            bmap = Map(self, m)
            self.maps[bmap.name] = bmap
            m = libbpf.bpf_object__next_map(ptr, m)

    @classmethod
    def open(cls, path: str | os.PathLike, btf_custom_path: str | os.PathLike | None = None) -> "BpfObject":
        """Open an object file; with ``btf_custom_path``, CO-RE relocations resolve against that
        BTF instead of /sys/kernel/btf/vmlinux (hosts without kernel BTF)."""
        path = os.fspath(path)
        libbpf = lib()
        claim_print()
        opts = ObjectOpenOpts(btf_custom_path=cstr(btf_custom_path)) if btf_custom_path else None
        call = Call(f"bpf_object__open_file({path}" + (f", btf_custom_path {os.fspath(btf_custom_path)})"
                                                       if btf_custom_path else ")"))
        ptr = call.check_ptr(libbpf.bpf_object__open_file(os.fsencode(path),
                                                          ctypes.addressof(opts) if opts is not None else None))
        return cls(ptr, path)

    # -- lifetime

    def _check_open(self) -> None:
        if self._ptr is None:
            raise BpfError(f"BPF object {self.path} is closed")

    def _keep_link(self, link: Link) -> Link:
        self._links.append(link)
        return link

    def _forget_link(self, link: Link) -> None:
        try:
            self._links.remove(link)
        except ValueError:
            pass

    @property
    def links(self) -> list[Link]:
        return list(self._links)

    def destroy_links(self) -> None:
        for link in reversed(self.links):
            try:
                link.destroy()
            except BpfError as exc:
                logger.warning("%s", exc)

    def close(self) -> None:
        """Destroy every link made through this object, then close it."""
        if self._ptr is None:
            return
        self.destroy_links()
        ptr, self._ptr = self._ptr, None
        lib().bpf_object__close(ptr)

    # -- lookup by name

    def program(self, name: str) -> Program:
        try:
            return self.programs[name]
        except KeyError:
            raise KeyError(f"no program '{name}' in {self.path}; have: {', '.join(sorted(self.programs))}") from None

    def map(self, name: str) -> Map:
        """A map by its libbpf name; internal maps also by section (".rodata", ".bss")."""
        if name in self.maps:
            return self.maps[name]
        self._check_open()
        ptr = lib().bpf_object__find_map_by_name(self._ptr, name.encode())
        if ptr:
            for m in self.maps.values():
                if m._ptr == ptr:
                    return m
        raise KeyError(f"no map '{name}' in {self.path}; have: {', '.join(sorted(self.maps))}")

    # -- settings before load

    def set_autoload(self, prog_name: str, autoload: bool) -> None:
        self._before_load("set_autoload")
        self.program(prog_name).autoload = autoload

    def set_max_entries(self, map_name: str, n: int) -> None:
        self._before_load("set_max_entries")
        self.map(map_name).set_max_entries(n)

    def _before_load(self, what: str) -> None:
        self._check_open()
        if self.loaded:
            raise BpfError(f"{what}: {self.path} is already loaded (settings apply before load)")

    def _section_buffer(self, section: str) -> tuple[int, int]:
        bmap = self.map(section)
        size = c_size_t(0)
        addr = lib().bpf_map__initial_value(bmap.ptr, byref(size))
        if not addr:
            raise BpfError(f"bpf_map__initial_value({section}): no initial value buffer")
        return addr, size.value

    def rodata_buffer(self, section: str = ".rodata") -> bytes:
        """A copy of the section's initial contents (what load() will freeze)."""
        self._check_open()
        addr, size = self._section_buffer(section)
        return ctypes.string_at(addr, size)

    def write_rodata(self, offset: int, data: bytes, section: str = ".rodata") -> None:
        """Write ``data`` at ``offset`` into the section's initial value, before load."""
        self._before_load("write_rodata")
        addr, size = self._section_buffer(section)
        data = bytes(data)
        if offset < 0 or offset + len(data) > size:
            raise ValueError(f"write_rodata: [{offset}, {offset + len(data)}) outside {section} of {size} bytes")
        ctypes.memmove(addr + offset, data, len(data))

    def rodata_variables(self, section: str = ".rodata") -> dict[str, tuple[int, int]]:
        """name -> (offset, size) of the section's variables, from the object's BTF."""
        self._check_open()
        libbpf = lib()
        btf = libbpf.bpf_object__btf(self._ptr)
        if not btf:
            raise BpfError(f"{self.path} has no BTF: build it with clang -g")
        type_id = libbpf.btf__find_by_name_kind(btf, section.encode(), BTF_KIND_DATASEC)
        if type_id < 0:
            raise BpfError(f"no BTF DATASEC '{section}' in {self.path}", -type_id)
        t = BtfType.from_address(libbpf.btf__type_by_id(btf, type_id))
        vlen = t.info & 0xFFFF
        base = ctypes.addressof(t) + sizeof(BtfType)
        out = {}
        for i in range(vlen):
            si = BtfVarSecinfo.from_address(base + i * sizeof(BtfVarSecinfo))
            var = BtfType.from_address(libbpf.btf__type_by_id(btf, si.type))
            out[libbpf.btf__name_by_offset(btf, var.name_off).decode()] = (si.offset, si.size)
        return out

    def set_rodata(self, name: str, value: bytes, section: str = ".rodata") -> None:
        """Set one ``const volatile`` global by name (size must match exactly)."""
        variables = self.rodata_variables(section)
        if name not in variables:
            raise KeyError(f"no variable '{name}' in {section} of {self.path}; have: {', '.join(sorted(variables))}")
        offset, size = variables[name]
        if len(value) != size:
            raise ValueError(f"{section} variable '{name}' is {size} bytes, got {len(value)}")
        self.write_rodata(offset, value, section)

    # -- load

    def load(self) -> None:
        self._before_load("load")
        claim_print()
        call = Call(f"bpf_object__load({self.path})")
        call.check_int(lib().bpf_object__load(self._ptr), load_hint)
        self.loaded = True

    def attach(self, prog_name: str) -> Link:
        """Auto-attach one program from its SEC() name."""
        return self.program(prog_name).attach()

    def __repr__(self) -> str:
        state = "closed" if self._ptr is None else ("loaded" if self.loaded else "opened")
        return f"<BpfObject {self.path} {state} programs={list(self.programs)} maps={list(self.maps)}>"
