"""The bundle manifest as a contract: what the compiler writes, the runtime reads back the same,
and a manifest from another probec or a damaged one is refused with a message that says what to do."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from probec.compiler.driver import build_bundle, check_file
from probec.runtime import manifest as contract
from probec.runtime.manifest import BundleError, Manifest, ManifestError, load_bundle

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def built(tmp_path_factory, workloads):
    folder = tmp_path_factory.mktemp("contract")
    spec = folder / "contract.yaml"
    text = (ROOT / "specs" / "pwork_sleep.yaml").read_text()     # a span, both metric kinds, an event
    spec.write_text(text.replace("name: pwork_sleep", "name: contract")
                    .replace("../tests/workloads/build/libpwork.so", str(workloads / "libpwork.so")))
    result = check_file(str(spec))
    assert result.program is not None, result.diagnostics.items
    out = {}
    for backend in ("core", "bpftrace"):
        bundle = build_bundle(result, backend, **({"compile": False} if backend == "core" else {}))
        assert bundle is not None, result.diagnostics.items
        bundle.write(folder / backend)
        out[backend] = folder / backend
    return out


@pytest.mark.parametrize("backend", ["core", "bpftrace"])
def test_a_written_manifest_reads_back_the_same(built, backend):
    data = json.loads((built[backend] / "manifest.json").read_text())
    typed = load_bundle(built[backend]).manifest
    assert typed.to_dict() == data
    assert Manifest.from_dict(typed.to_dict()) == typed
    assert typed.to_json() == (built[backend] / "manifest.json").read_text()
    assert {m.kind for m in typed.metrics} == {contract.MetricKind.HISTOGRAM, contract.MetricKind.COUNTER}
    assert all(isinstance(m.purpose, contract.MapPurpose) for m in typed.maps)


def test_the_bpftrace_section_names_every_map_the_runner_reads(built):
    typed = load_bundle(built["bpftrace"]).manifest
    script = (built["bpftrace"] / "contract.bt").read_text()
    section = typed.bpftrace
    assert {(c.map, c.kind, c.name) for c in section.counters} == {
        ("@__ev_slow_sleep_seen", contract.HealthSlot.EVENT_SEEN, "slow_sleep"),
        ("@__ev_slow_sleep_limited", contract.HealthSlot.EVENT_RATE_LIMITED, "slow_sleep"),
        ("@__span_sleep_overflow", contract.HealthSlot.SPAN_OVERFLOW, "sleep")}
    assert {(mm.map, mm.role) for mm in section.metric_maps} == {
        ("@m_pwork_sleep_duration_seconds", contract.MetricMapRole.MAIN),
        ("@m_pwork_sleep_duration_seconds_sum", contract.MetricMapRole.SUM),
        ("@m_pwork_records_total", contract.MetricMapRole.MAIN),
        ("@m_pwork_record_value", contract.MetricMapRole.MAIN),
        ("@m_pwork_record_value_sum", contract.MetricMapRole.SUM)}
    for name in [mm.map for mm in section.metric_maps] + [section.ready_map] + [c.map for c in section.counters]:
        assert re.search(re.escape(name) + r"\b", script), name


def test_event_records_start_with_the_one_header(built):
    typed = load_bundle(built["core"]).manifest
    record = typed.events[0].record
    assert tuple(f.name for f in record.fields[:len(contract.EVENT_HEADER)]) == contract.EVENT_HEADER_NAMES
    assert [(f.ctype, f.size) for f in record.fields[:5]] == [(h.ctype, h.size) for h in contract.EVENT_HEADER]
    header = (built["core"] / "contract.h").read_text()
    for h in contract.EVENT_HEADER:
        assert f"{h.ctype} {h.name};" in header
    source = (built["core"] / "contract.bpf.c").read_text()
    for h in contract.EVENT_HEADER:
        assert f"probec_e->{h.name} = " in source


def test_a_manifest_from_another_version_says_to_rebuild(built, tmp_path):
    data = json.loads((built["core"] / "manifest.json").read_text())
    data["probec_manifest"] = contract.MANIFEST_VERSION - 1
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError) as err:
        load_bundle(tmp_path)
    message = str(err.value)
    assert f"manifest version {contract.MANIFEST_VERSION - 1}" in message
    assert f"reads version {contract.MANIFEST_VERSION}" in message and "rebuild it with this probec" in message


def test_a_missing_key_is_named_with_its_place(built, tmp_path):
    data = json.loads((built["core"] / "manifest.json").read_text())
    del data["metrics"][1]["edges"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"manifest.json.metrics\[1\] has no 'edges'.*rebuild it with this probec"):
        load_bundle(tmp_path)


def test_a_wrong_type_or_unknown_value_is_named(built):
    data = json.loads((built["core"] / "manifest.json").read_text())
    bad = json.loads(json.dumps(data))
    bad["core"]["health"][0]["kind"] = "span_overflows"
    with pytest.raises(ManifestError, match=r"manifest.core.health\[0\].kind is 'span_overflows', not one of"):
        Manifest.from_dict(bad)
    bad = json.loads(json.dumps(data))
    bad["probes"][0]["offset"] = "4"
    with pytest.raises(ManifestError, match=r"manifest.probes\[0\].offset should be int, not str"):
        Manifest.from_dict(bad)
    with pytest.raises(ManifestError, match="not a JSON object"):
        Manifest.from_dict([data])


def test_the_contract_module_imports_nothing_of_probec():
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(contract))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("probec"), ast.dump(node)
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("probec") for a in node.names)
