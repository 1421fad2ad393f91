"""The bundle manifest: everything the runtime needs to read maps and export metrics.

It is written from the same IR layouts that generate the C structs and bpftrace keys, so the
runtime never guesses a size or an offset. The contract itself (its types and version) lives in
the runtime's leaf module `runtime/manifest.py`; this module fills it from the IR.
"""

from __future__ import annotations

from collections.abc import Mapping

from ...runtime import manifest as contract
from ...runtime.manifest import Manifest
from ..ir.nodes import CGROUP_MAP, CGROUP_PATH_BIT, Field, Layout, MapSpec, Program

__all__ = ["MANIFEST_VERSION", "Manifest", "contract", "field_ctype", "manifest_for", "map_info", "task_map_name"]

MANIFEST_VERSION = contract.MANIFEST_VERSION


# How the manifest (and the core backend's C structs, which the runtime reads with it) spell a
# field's type.
CTYPES = {("unsigned", 4): "__u32", ("unsigned", 8): "__u64", ("signed", 8): "__s64"}


def field_ctype(f: Field) -> str:
    return "char" if f.kind == "bytes" else CTYPES[(f.kind, f.size)]


def layout_info(layout: Layout | None) -> contract.Layout | None:
    if layout is None:
        return None
    return contract.Layout(layout.name, layout.size, layout.pyformat,
                           tuple(contract.LayoutField(f.name, field_ctype(f), f.length, f.size, f.offset, f.label)
                                 for f in layout.fields))


def task_map_name(span: str) -> str:
    """core: the TASK_STORAGE map a thread-keyed span keeps its begin times in, where the kernel
    that loads the bundle has it (beside the span's begin map, used where it has not)."""
    return f"span_{span}_task"


def map_info(m: MapSpec, map_type: str, max_entries: int) -> contract.MapInfo:
    """A map as the backend that holds it made it (its type and size there)."""
    return contract.MapInfo(m.name, map_type, max_entries, contract.MapPurpose(m.purpose),
                            layout_info(m.key), layout_info(m.value))


def rendering(t) -> tuple[str, tuple[str, ...]]:
    """How the runtime shows a value of type `t`: as an address, by name, or as it is."""
    if t is None or not t.render:
        return "", ()
    return t.render, tuple(t.names) if t.render == "enum" else ()


def event_field_kind(f) -> str:
    return f.stack + "stack" if f.stack else ("str" if f.is_string else "int")


def manifest_for(program: Program, backend: str, files: dict[str, str], *, maps: tuple[contract.MapInfo, ...] = (),
                 sum_slots: Mapping[str, int] = {}, task_maps: frozenset[str] = frozenset(),
                 core: contract.CoreSection | None = None, bpftrace: contract.BpftraceSection | None = None,
                 cgroup_map: str = CGROUP_MAP,
                 bcc: contract.BccSection | None = None) -> contract.Manifest:
    """The manifest of a bundle: the program's spans, metrics, events and probes, with what the
    backend chose for them: `maps` as it made them, the slot of each histogram's sum in its map
    (`sum_slots`), the begin maps it keeps in task storage (`task_maps`), its own section, and the
    name its program gives the cgroup map (`cgroup_map`)."""
    checked = set(program.checked_at_end())
    return contract.Manifest(
        probec_manifest=MANIFEST_VERSION,
        name=program.name,
        spec=program.source,
        description=program.description,
        backend=backend,
        files=dict(files),
        maps=maps,
        spans=tuple(contract.SpanInfo(s.name, s.begin_map.name, s.begin_map.max_entries, s.name in checked,
                                      s.begin_map.name in task_maps,
                                      task_map_name(s.name) if s.begin_map.name in task_maps else "")
                    for s in program.spans),
        metrics=tuple(contract.MetricInfo(
            name=m.name, kind=contract.MetricKind(m.kind), help=m.help, unit=m.unit, scale=m.scale,
            labels=tuple(contract.Label(lab.name, lab.expr.type.kind, *rendering(lab.expr.type))
                         for lab in m.labels),
            edges=tuple(m.edges), sum_slot=sum_slots.get(m.name),
            map=m.map.name, series_limit=m.series_limit,
            overflow_map=m.overflow_map.name if m.overflow_map else None,
            folded_map=m.folded_map.name if m.folded_map else None,
            otel_name=m.otel_name,
        ) for m in program.metrics),
        events=tuple(contract.EventInfo(
            name=e.name, index=e.index, sample_every=e.sample_every, max_per_second=e.max_per_second,
            record=layout_info(e.record),
            fields=tuple(contract.EventField(f.name, event_field_kind(f),
                                             f.expr.type.dimension if f.expr is not None else "none",
                                             *rendering(f.expr.type if f.expr is not None else None))
                         for f in e.fields),
        ) for e in program.events),
        probes=tuple(contract.ProbeInfo(
            id=p.id, kind=p.kind, category=p.category, name=p.name, binary=p.binary, symbol=p.symbol,
            offset=p.offset, provider=p.provider, rate=p.rate, group=p.group, variant=p.variant,
            address=p.spec_text, container=p.container, path_in_container=p.path_in_container,
        ) for p in program.probes),
        groups={name: tuple(variants) for name, variants in program.variant_groups},
        core=core,
        bpftrace=bpftrace,
        cgroups=contract.CgroupSection(cgroup_map, CGROUP_PATH_BIT, tuple(
            contract.CgroupMatchInfo(bit, attribute, value) for bit, (attribute, value) in enumerate(program.cgroup_sets))),
        bcc=bcc,
    )
