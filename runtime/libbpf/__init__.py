"""ctypes binding over the system libbpf (``libbpf.so.1``, Debian ``libbpf1``).

This is the production loader's only way into the kernel: it opens a compiled
BPF object, fills ``const volatile`` settings in ``.rodata``, loads, attaches,
reads maps and drains ring buffers.  It needs the standard library and
``libbpf.so.1`` (>= 1.0) and nothing else; it never imports the compiler.

Errors from libbpf become :class:`BpfError`, which carries the errno name, the
strerror text and the lines libbpf logged during the failing call (for a
failed load that includes the tail of the verifier log).

Set ``PROBEC_LIBBPF=/path/to/libbpf.so.1`` to use a libbpf other than the one
the dynamic loader finds (for hosts without the Debian package).

The package's modules, each importing only those above it:

- ``errors``: BpfError, errno names and hints, the capture of libbpf's log lines
- ``ffi``: loading libbpf.so.1, every function's prototype, the C structs we mirror
- ``links``: Link and LinkGroup
- ``maps``: Map (settings before load, element access, batch lookup)
- ``perf``: cpu-clock perf events, ``profile`` and ``interval`` attachments
- ``ringbuf``: RingBuffer (a callback per record), RingReader (bulk reads), PolledBuffer (what
  RingBuffer and PerfBuffer share)
- ``perfbuf``: PerfBuffer (kernels without ring buffers)
- ``probes``: what the kernel's BPF offers (map types, helpers)
- ``objects``: BpfObject and Program, program info and run-time stats

Callers use this package's names (``libbpf.BpfObject``), not its modules.
"""

from .errors import (
    ENOTSUPP,
    LIBBPF_DEBUG,
    LIBBPF_INFO,
    LIBBPF_WARN,
    BpfError,
    LibbpfMissing,
    errno_name,
    recent_log_lines,
    set_debug_logging,
)
from .ffi import LIBBPF_SONAME, MIN_VERSION, libbpf_version
from .links import Link, LinkGroup
from .maps import BPF_ANY, BPF_EXIST, BPF_NOEXIST, FdMap, Map, MapType, num_possible_cpus
from .objects import BPF_STATS_RUN_TIME, BTF_KIND_DATASEC, BpfObject, Program, ProgramInfo, enable_stats, program_info
from .perf import PERF_COUNT_SW_CPU_CLOCK, PERF_FLAG_FD_CLOEXEC, PERF_TYPE_SOFTWARE, online_cpus, perf_event_open_cpu_clock
from .perfbuf import PerfBuffer
from .probes import Helper, ProgType, atomic_fetch_supported, helper_supported, map_type_supported
from .ringbuf import RingBuffer, RingReader

__all__ = [
    "BpfError",
    "LibbpfMissing",
    "BpfObject",
    "Program",
    "Map",
    "FdMap",
    "Link",
    "LinkGroup",
    "RingBuffer",
    "RingReader",
    "PerfBuffer",
    "Helper",
    "ProgType",
    "helper_supported",
    "atomic_fetch_supported",
    "map_type_supported",
    "ProgramInfo",
    "MapType",
    "libbpf_version",
    "num_possible_cpus",
    "online_cpus",
    "enable_stats",
    "program_info",
    "perf_event_open_cpu_clock",
    "recent_log_lines",
    "set_debug_logging",
    "errno_name",
    "BPF_ANY",
    "BPF_NOEXIST",
    "BPF_EXIST",
]
