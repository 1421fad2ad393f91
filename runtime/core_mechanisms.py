"""Mechanisms a core bundle chooses when it loads, not when it is built: each object carries both
ways of doing a thing and a `const volatile` setting that picks one (the verifier keeps only the
code of the one picked). Before load, the kernel is asked what it has, the settings are filled,
and the maps of the way not taken are shrunk to one-slot stand-ins the kernel can create:

- events: the ring buffer, else a perf buffer (kernels before 5.8);
- span begin times: task-local storage, else the span's HASH (before 5.11);
- the current task: bpf_get_current_task_btf, else bpf_get_current_task (before 5.11);
- the events' sampling tickets and rate counts: atomic fetch-and-add, else an add then a read
  (before 5.12; two CPUs at once may read the same count). Kernels before 5.12 refuse the fetch
  instruction anywhere in a program, even where the setting makes it dead: it is rewritten into a
  plain load of the same length before load;
- sched tracepoints: their typed raw form (tp_btf), else the classic tracepoint (no kernel BTF,
  before 5.5): variants of the group the core backend names, tried at load (core_attach.py).

$PROBEC_PRETEND_MISSING (comma-separated: ring_buffer, task_storage, get_current_task_btf,
atomic_fetch, fentry, tp_btf) makes a kernel that has them look as if it had not, to run the
fallbacks where every feature exists. `fentry` and `tp_btf` are decided where the variants of a
group are tried (core_attach.py): the fentry/fexit variant of a `kernel:` span is passed over, so
the span runs on kprobe, or where the kernel has no kprobes on the spec's fallback, as on a kernel
that refuses function tracing; the tp_btf variants of sched tracepoints are passed over for the
classic ones.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from .manifest import USE_ATOMIC_FETCH, USE_RINGBUF, USE_TASK_BTF, USE_TASK_STORAGE, BundleError, Manifest

PRETEND_ENV = "PROBEC_PRETEND_MISSING"
FEATURES = ("ring_buffer", "task_storage", "get_current_task_btf", "atomic_fetch", "fentry", "tp_btf")


def _libbpf():
    from . import libbpf
    return libbpf


def pretended_missing() -> frozenset[str]:
    names = {n.strip() for n in os.environ.get(PRETEND_ENV, "").split(",") if n.strip()}
    unknown = sorted(names - set(FEATURES))
    if unknown:
        raise BundleError(f"{PRETEND_ENV} names {', '.join(unknown)}, which probec does not know; "
                          f"it takes {', '.join(FEATURES)}")
    return frozenset(names)


@dataclass(frozen=True)
class Mechanisms:
    ring_buffer: bool
    task_storage: bool
    task_btf: bool
    atomic_fetch: bool = True

    def settings(self) -> dict[str, int]:
        return {USE_RINGBUF: int(self.ring_buffer), USE_TASK_STORAGE: int(self.task_storage),
                USE_TASK_BTF: int(self.task_btf), USE_ATOMIC_FETCH: int(self.atomic_fetch)}

    def describe(self, manifest: Manifest) -> dict[str, str]:
        """What the bundle uses for each thing it does: feature -> mechanism (for health and logs)."""
        core = manifest.core
        out = {}
        if core.ringbuf is not None:
            out["events"] = "ring_buffer" if self.ring_buffer else "perf_buffer"
        if any(s.task_map for s in manifest.spans):
            out["span_begin_times"] = "task_storage" if self.task_storage else "hash"
        if core.tracepoint_fields:
            kinds = {"btf" if c.btf_type else "offsets" for c in core.tracepoint_fields}
            out["tracepoint_fields"] = "btf" if kinds == {"btf"} else ("offsets" if kinds == {"offsets"}
                                                                        else "btf_and_offsets")
        out["current_task"] = "get_current_task_btf" if self.task_btf else "get_current_task"
        if any(s.name == USE_ATOMIC_FETCH for s in core.settings):
            out["event_counters"] = "atomic_fetch_add" if self.atomic_fetch else "add_then_read"
        return out


# program types whose helpers are asked for (fentry/fexit programs get the same helpers and more)
_PROG_TYPES = {"tracepoint": "TRACEPOINT", "uprobe": "KPROBE", "uretprobe": "KPROBE", "usdt": "KPROBE",
               "kprobe": "KPROBE", "kretprobe": "KPROBE", "profile": "PERF_EVENT", "interval": "PERF_EVENT"}


@functools.lru_cache(maxsize=None)
def _kernel_has(prog_types: tuple[str, ...]) -> tuple[bool, bool, bool, bool]:
    L = _libbpf()
    types = [getattr(L.ProgType, t) for t in prog_types] or [L.ProgType.KPROBE]

    def helper(h: int) -> bool:
        return all(L.helper_supported(t, h) for t in types)

    task_btf = helper(L.Helper.GET_CURRENT_TASK_BTF)
    task_storage = task_btf and L.map_type_supported(L.MapType.TASK_STORAGE) and helper(L.Helper.TASK_STORAGE_GET)
    ring = L.map_type_supported(L.MapType.RINGBUF) and helper(L.Helper.RINGBUF_RESERVE)
    return ring, task_storage, task_btf, L.atomic_fetch_supported()


def choose(manifest: Manifest) -> Mechanisms:
    """What this kernel has (and $PROBEC_PRETEND_MISSING does not take away)."""
    missing = pretended_missing()
    kinds = tuple(sorted({_PROG_TYPES[p.kind] for p in manifest.core.programs if p.kind in _PROG_TYPES}))
    ring, task_storage, task_btf, atomic_fetch = _kernel_has(kinds)
    task_btf = task_btf and "get_current_task_btf" not in missing
    return Mechanisms(ring_buffer=ring and "ring_buffer" not in missing,
                      task_storage=task_storage and task_btf and "task_storage" not in missing,
                      task_btf=task_btf, atomic_fetch=atomic_fetch and "atomic_fetch" not in missing)


def shape_maps(obj, manifest: Manifest, mech: Mechanisms) -> None:
    """Before load: the maps of the mechanisms not taken become one-slot arrays (any kernel
    creates those; the code that names them is the code the verifier drops)."""
    L = _libbpf()
    ring = manifest.core.ringbuf
    if ring is not None and not mech.ring_buffer:
        obj.map(ring.map).set_shape(L.MapType.ARRAY, 4, 8, 1)
    for span in manifest.spans:
        if not span.task_map:
            continue
        if mech.task_storage:
            obj.map(span.map).set_max_entries(1)             # the HASH stays empty
        else:
            obj.map(span.task_map).set_shape(L.MapType.ARRAY, 4, 8, 1)


# struct bpf_insn: code, dst_reg:4 src_reg:4, off, imm
_STX_ATOMIC = 0x03 | 0xC0        # BPF_STX | BPF_ATOMIC (with BPF_W 0x00 or BPF_DW 0x18)
_BPF_FETCH = 0x01
_LDX_MEM = 0x01 | 0x60           # BPF_LDX | BPF_MEM


def rewrite_atomic_fetch(obj, manifest: Manifest, mech: Mechanisms) -> int:
    """Before load, on a kernel without atomic fetch: each `src = atomic_fetch_add(*(dst + off), src)`
    becomes `src = *(dst + off)`, one instruction for one, so no jump or relocation moves. The
    setting probec_use_atomic_fetch (0 here) makes that code dead; the verifier of kernels before
    5.12 checks every instruction's encoding first, dead or not. Returns how many were rewritten."""
    if mech.atomic_fetch:
        return 0
    settings = {s.name for s in manifest.core.settings}
    rewritten = 0
    for prog in manifest.core.programs:
        program = obj.program(prog.program)
        code = bytearray(program.insns())
        changed = False
        for i in range(0, len(code), 8):
            op, regs, imm = code[i], code[i + 1], int.from_bytes(code[i + 4:i + 8], "little", signed=True)
            if op & 0xE7 != _STX_ATOMIC:
                continue
            if imm & _BPF_FETCH == 0:
                continue                        # the plain atomic add every kernel has
            if imm != _BPF_FETCH or USE_ATOMIC_FETCH not in settings:
                raise BundleError(f"program {prog.program} uses an atomic operation that this kernel lacks "
                                  f"(atomic fetch came in 5.12)"
                                  + ("" if USE_ATOMIC_FETCH in settings else
                                     "; rebuild the bundle with this probec, which falls back where it is missing"))
            dst, src = regs & 0x0F, regs >> 4
            code[i] = _LDX_MEM | (op & 0x18)
            code[i + 1] = src | (dst << 4)      # load into the fetch's register from its address
            code[i + 4:i + 8] = bytes(4)
            changed = True
            rewritten += 1
        if changed:
            program.set_insns(bytes(code))
    return rewritten
