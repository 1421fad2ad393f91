"""Checks of a core bundle against this host before anything is loaded: the tracefs layout the C
reads tracepoint fields at, and where uprobes past endbr64 sit in binaries that may have changed."""

from __future__ import annotations

from typing import Iterable

from .manifest import BundleError, ProbeInfo, TracepointCheck
from ..host.tracefs import read_format, tracefs_root


# --- tracepoint field offsets --------------------------------------------------------------------
def check_tracepoint_fields(checks: Iterable[TracepointCheck]) -> None:
    """Fields the C reads at offsets taken on the build host (where BTF had no record type for
    them): make sure this kernel's tracefs still puts them there, or fail before anything is
    loaded. Fields read through BTF record types are libbpf's to relocate at load."""
    checks = [c for c in checks if not c.btf_type]
    if not checks:
        return
    root = tracefs_root()
    if root is None:
        raise BundleError("tracefs is not mounted, so the tracepoint field offsets this bundle reads cannot "
                          "be checked: mount -t tracefs nodev /sys/kernel/tracing")
    formats: dict[str, dict | None] = {}
    problems = []
    for c in checks:
        tp = c.tracepoint
        if tp not in formats:
            formats[tp] = read_format(root, *tp.split(":", 1))
        fmt = formats[tp]
        if fmt is None:
            problems.append(f"tracepoint {tp} does not exist on this kernel")
            continue
        here = fmt.get(c.field)
        if here is None:
            problems.append(f"tracepoint {tp} has no field '{c.field}' on this kernel")
        elif (here.offset, here.size) != (c.offset, c.size):
            problems.append(f"tracepoint {tp} field '{c.field}' is at offset {here.offset} size {here.size} on "
                            f"this kernel, but the bundle reads offset {c.offset} size {c.size}")
    if problems:
        raise BundleError("the bundle was built for another kernel's tracepoint layout:\n  "
                          + "\n  ".join(sorted(set(problems)))
                          + "\n  help: rebuild the bundle on this kernel (probec build --backend core)")


def check_uprobe_placement(probes: Iterable[ProbeInfo]) -> None:
    """A uprobe 4 bytes into a function was placed past its endbr64 at build time. If the binary
    changed and the function no longer starts with endbr64, +4 may be the middle of an
    instruction: refuse rather than corrupt the traced process."""
    from ..host import elf
    for p in probes:
        if p.kind not in ("uprobe", "uretprobe") or p.offset != 4:
            continue
        try:
            ok = elf.open_elf(p.binary).starts_with_endbr64(p.symbol)
        except elf.ElfError:
            continue        # a missing binary or symbol fails at attach, with its own message
        if not ok:
            raise BundleError(f"probe '{p.address}' sits 4 bytes into {p.symbol}, past the endbr64 it "
                              f"started with when the bundle was built, but {p.binary} has changed and "
                              "no longer starts with endbr64 there: rebuild the bundle against this binary")
