"""What the build host knows: tracepoints and their fields, kernel functions and mechanisms,
binaries and their symbols. Every look-up degrades to `None` (unknown) rather than failing, so
that `probec check` runs without root and says which host checks it skipped.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from ...host import elf, features
from ...host.btf import btf_strings, load_btf, tracepoint_type
from ...host.tracefs import TRACEFS_ROOTS, FormatField, available_events, read_format, tracefs_root

__all__ = ["FormatField", "HostFactsError", "HostInfo", "RecordedHost"]


class HostInfo:
    """Facts about this machine, each read once."""

    which = "this kernel"     # how diagnostics name the kernel whose facts these are

    def __init__(self, enabled: bool = True, tracefs_roots: tuple[str, ...] = TRACEFS_ROOTS,
                 btf_path: str = "/sys/kernel/btf/vmlinux"):
        self.enabled = enabled
        self.tracefs_roots = tracefs_roots
        self.btf_path = btf_path

    @functools.cached_property
    def tracefs(self) -> Path | None:
        return tracefs_root(self.tracefs_roots) if self.enabled else None

    @functools.cached_property
    def tracepoints(self) -> set[str] | None:
        """`category:name` of every tracepoint, or None where tracefs is not readable."""
        return available_events(self.tracefs) if self.tracefs is not None else None

    @functools.cached_property
    def btf_tracepoints(self) -> set[str] | None:
        """Tracepoint names (without category) from kernel BTF, where tracefs is not readable:
        every tracepoint has a `btf_trace_NAME` typedef. None when BTF is not readable either."""
        if not self.enabled:
            return None
        names = btf_strings(self.btf_path)
        if names is None:
            return None
        return {n[len("btf_trace_"):] for n in names if n.startswith("btf_trace_")}

    @functools.lru_cache(maxsize=None)
    def tracepoint_format(self, category: str, name: str) -> dict[str, FormatField] | None:
        return read_format(self.tracefs, category, name) if self.tracefs is not None else None

    @functools.lru_cache(maxsize=None)
    def tracepoint_type(self, category: str, name: str) -> str | None:
        """The BTF record type of a tracepoint (trace_event_raw_...), through which the core backend
        reads its fields with CO-RE relocations; None when BTF or tracefs cannot tell."""
        fields = self.tracepoint_format(category, name)
        btf = load_btf(self.btf_path) if self.enabled else None
        if fields is None or btf is None:
            return None
        return tracepoint_type(btf, category, name, fields)

    @functools.cached_property
    def kernel_functions(self) -> set[str] | None:
        """Names of kernel functions (text symbols), or None when they cannot be read."""
        return features.kernel_functions() if self.enabled else None

    @functools.cached_property
    def has_kprobes(self) -> bool | None:
        return features.kprobes_available(self.tracefs) if self.enabled else None

    @functools.cached_property
    def has_fentry(self) -> bool | None:
        """Loading a do-nothing fentry program is the only honest test; needs root and libbpf."""
        return features.probe_fentry() if self.enabled else None

    @functools.cached_property
    def bpftrace_kfunc(self) -> bool | None:
        """Whether bpftrace attaches kfunc probes here (it may not where the kernel has fentry)."""
        return features.bpftrace_kfunc() if self.enabled else None

    def binary(self, path: str):
        return _open_elf(path)


class HostFactsError(Exception):
    """A recorded host-facts file that cannot be used, with a message a person can act on."""


class RecordedHost(HostInfo):
    """The kernel of another machine, as `probec doctor --format json` recorded it there:
    tracepoints and their fields, kernel functions and mechanisms. Binaries are still read here,
    where the build has them. A fact the record does not hold is unknown (None), as on a host
    where it cannot be read."""

    def __init__(self, facts: dict, origin: str = "host facts"):
        super().__init__(enabled=True)
        if not isinstance(facts, dict) or facts.get("probec_host_facts") != features.HOST_FACTS_VERSION:
            raise HostFactsError(f"{origin} is not a probec host-facts record of version "
                                 f"{features.HOST_FACTS_VERSION}; record one with 'probec doctor --format json'")
        self.origin = origin
        self.facts = facts
        try:
            tps = _typed(facts, "tracepoints", dict)
            self._formats = None if tps is None else {
                str(tp): None if rows is None else {r[0]: FormatField.from_list(r) for r in rows}
                for tp, rows in tps.items()}
            types = _typed(facts, "tracepoint_types", dict) or {}
            self._types = {str(tp): str(t) for tp, t in types.items() if t}
            functions = _typed(facts, "kernel_functions", list)
            self._functions = None if functions is None else {str(f) for f in functions}
            mech = _typed(facts, "mechanisms", dict) or {}
            self._mechanisms = {k: None if mech.get(k) is None else bool(mech[k])
                                for k in ("kprobe", "fentry", "bpftrace_kfunc")}
            if "bpftrace_kfunc" not in mech:     # a record made before bpftrace's own answer was kept
                self._mechanisms["bpftrace_kfunc"] = self._mechanisms["fentry"]
        except (AttributeError, TypeError, ValueError, KeyError, IndexError) as exc:
            raise HostFactsError(f"{origin} is malformed ({exc}); record it again with "
                                 "'probec doctor --format json'") from None

    @classmethod
    def from_file(cls, path: str) -> "RecordedHost":
        import json
        import stat
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise HostFactsError(f"host facts '{path}' is not a regular file")
            with open(path, "rb") as f:
                facts = json.loads(f.read(64 << 20))
        except OSError as exc:
            raise HostFactsError(f"cannot read host facts '{path}': {exc.strerror or exc}") from None
        except ValueError as exc:
            raise HostFactsError(f"host facts '{path}' are not JSON: {exc}") from None
        return cls(facts, f"'{path}'")

    @property
    def which(self) -> str:
        return f"the target kernel ({self.facts.get('kernel') or 'unknown'})"

    @functools.cached_property
    def tracefs(self) -> Path | None:
        return None

    @functools.cached_property
    def tracepoints(self) -> set[str] | None:
        return None if self._formats is None else set(self._formats)

    @functools.cached_property
    def btf_tracepoints(self) -> set[str] | None:
        return None

    def tracepoint_format(self, category: str, name: str) -> dict[str, FormatField] | None:
        return None if self._formats is None else self._formats.get(f"{category}:{name}")

    def tracepoint_type(self, category: str, name: str) -> str | None:
        return self._types.get(f"{category}:{name}")

    @functools.cached_property
    def kernel_functions(self) -> set[str] | None:
        return self._functions

    @functools.cached_property
    def has_kprobes(self) -> bool | None:
        return self._mechanisms["kprobe"]

    @functools.cached_property
    def has_fentry(self) -> bool | None:
        return self._mechanisms["fentry"]

    @functools.cached_property
    def bpftrace_kfunc(self) -> bool | None:
        return self._mechanisms["bpftrace_kfunc"]


def _typed(facts: dict, key: str, kind: type):
    value = facts.get(key)
    if value is not None and not isinstance(value, kind):
        raise TypeError(f"'{key}' should be a {'JSON object' if kind is dict else 'list'}")
    return value


@functools.lru_cache(maxsize=64)
def _open_elf(path: str):
    return elf.ElfFile(path)
