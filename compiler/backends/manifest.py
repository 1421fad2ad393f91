"""The bundle manifest: everything the runtime needs to read maps and export metrics.

It is written from the same IR layouts that generate the C structs and bpftrace keys, so the
runtime never guesses a size or an offset.
"""

from __future__ import annotations

from ..ir.nodes import Layout, MapSpec, Program

MANIFEST_VERSION = 1


def layout_dict(layout: Layout | None) -> dict | None:
    if layout is None:
        return None
    return {"name": layout.name, "size": layout.size, "format": layout.pyformat,
            "fields": [{"name": f.name, "ctype": f.ctype, "length": f.length, "size": f.size,
                        "offset": f.offset, "label": f.label} for f in layout.fields]}


def map_dict(m: MapSpec) -> dict:
    return {"name": m.name, "type": m.type, "max_entries": m.max_entries, "purpose": m.purpose,
            "key": layout_dict(m.key), "value": layout_dict(m.value)}


def rendering(t) -> dict:
    """How the runtime shows a value of type `t`: as an address, by name, or as it is."""
    if t is None or not t.render:
        return {}
    return {"render": t.render, **({"names": list(t.names)} if t.render == "enum" else {})}


def manifest_for(program: Program, backend: str, **extra) -> dict:
    checked = set(program.checked_at_end())
    manifest = {
        "probec_manifest": MANIFEST_VERSION,
        "name": program.name,
        "spec": program.source,
        "description": program.description,
        "backend": backend,
        "maps": [map_dict(m) for m in program.maps],
        "spans": [{"name": s.name, "map": s.begin_map.name, "capacity": s.begin_map.max_entries,
                   "checked_at_end": s.name in checked}
                  for s in program.spans],
        "metrics": [{
            "name": m.name, "kind": m.kind, "help": m.help, "unit": m.unit, "scale": m.scale,
            "labels": [{"name": lab.name, "type": lab.expr.type.kind, "render": lab.expr.type.render,
                        **rendering(lab.expr.type)} for lab in m.labels],
            "edges": list(m.edges), "sum_slot": m.sum_slot if m.kind == "histogram" else None,
            "map": m.map.name, "series_limit": m.series_limit,
            "overflow_map": m.overflow_map.name if m.overflow_map else None,
            "folded_map": m.folded_map.name if m.folded_map else None,
        } for m in program.metrics],
        "events": [{
            "name": e.name, "index": e.index, "sample_every": e.sample_every,
            "max_per_second": e.max_per_second, "record": layout_dict(e.record),
            "fields": [{"name": f.name, "kind": f.stack + "stack" if f.stack else
                        ("str" if f.is_string else "int"),
                        "unit": (f.expr.type.dimension if f.expr is not None else "none"),
                        **rendering(f.expr.type if f.expr is not None else None)} for f in e.fields],
        } for e in program.events],
        "probes": [{
            "id": p.id, "kind": p.kind, "category": p.category, "name": p.name, "binary": p.binary,
            "symbol": p.symbol, "offset": p.offset, "provider": p.provider, "rate": p.rate,
            "group": p.group, "variant": p.variant, "address": p.spec_text,
        } for p in program.probes],
        "groups": {name: list(variants) for name, variants in program.variant_groups},
    }
    manifest.update(extra)
    return manifest
