"""What this kernel's BPF offers, asked the way libbpf asks it: a map type created, a helper
called from a tiny program (libbpf_probe_bpf_map_type, libbpf_probe_bpf_helper)."""

from __future__ import annotations

import os
import struct

from .ffi import lib


class ProgType:
    SOCKET_FILTER = 1
    KPROBE = 2
    TRACEPOINT = 5
    PERF_EVENT = 7
    RAW_TRACEPOINT = 17
    TRACING = 26


class Helper:           # enum bpf_func_id
    PERF_EVENT_OUTPUT = 25
    GET_CURRENT_TASK = 35
    RINGBUF_RESERVE = 131
    TASK_STORAGE_GET = 156
    GET_CURRENT_TASK_BTF = 158


def atomic_fetch_supported() -> bool:
    """Whether the kernel takes BPF_ATOMIC with BPF_FETCH (5.12): a socket filter that fetch-adds
    on its stack, loaded (kernels before refuse the instruction: "BPF_STX uses reserved fields")."""
    def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
        return struct.pack("<BBhi", code, dst | (src << 4), off, imm)

    code = (insn(0x7A, dst=10, off=-8)                          # *(u64 *)(r10 - 8) = 0
            + insn(0xB7, dst=1, imm=1)                          # r1 = 1
            + insn(0xDB, dst=10, src=1, off=-8, imm=0x01)       # r1 = atomic_fetch_add(r10 - 8, r1)
            + insn(0xB7, dst=0)                                 # r0 = 0
            + insn(0x95))                                       # exit
    fd = lib().bpf_prog_load(ProgType.SOCKET_FILTER, b"probec_fetch", b"GPL", code, len(code) // 8, None)
    if fd < 0:
        return False
    os.close(fd)
    return True


def map_type_supported(map_type: int) -> bool:
    """Whether the kernel creates maps of this type (an error to probe counts as no)."""
    return lib().libbpf_probe_bpf_map_type(map_type, None) == 1


def helper_supported(prog_type: int, helper: int) -> bool:
    """Whether programs of `prog_type` may call `helper` here (an error to probe counts as no)."""
    return lib().libbpf_probe_bpf_helper(prog_type, helper, None) == 1
