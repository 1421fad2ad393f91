"""What this kernel's BPF offers, asked the way libbpf asks it: a map type created, a helper
called from a tiny program (libbpf_probe_bpf_map_type, libbpf_probe_bpf_helper)."""

from __future__ import annotations

from .ffi import lib


class ProgType:
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


def map_type_supported(map_type: int) -> bool:
    """Whether the kernel creates maps of this type (an error to probe counts as no)."""
    return lib().libbpf_probe_bpf_map_type(map_type, None) == 1


def helper_supported(prog_type: int, helper: int) -> bool:
    """Whether programs of `prog_type` may call `helper` here (an error to probe counts as no)."""
    return lib().libbpf_probe_bpf_helper(prog_type, helper, None) == 1
