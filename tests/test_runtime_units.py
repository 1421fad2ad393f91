"""Runtime pieces that need no kernel: quantiles, series caps, bpftrace map decoding, exposition."""

from __future__ import annotations

import dataclasses

import pytest
from prometheus_client.parser import text_string_to_metric_families

from probec.runtime.bpftrace_runner import MapDecoder
from probec.runtime.exporter import Exporter
from probec.runtime.manifest import MANIFEST_VERSION, Manifest
from probec.runtime.store import OVERFLOW, HistogramSeries, MetricStore, quantile

HIST = {"name": "lat_seconds", "kind": "histogram", "help": "h", "unit": "seconds", "scale": 1e-9,
        "labels": [{"name": "comm", "type": "str", "render": "", "names": []}], "edges": [1000, 2000, 4000],
        "sum_slot": 4, "map": "m_lat_seconds", "series_limit": 2, "overflow_map": None, "folded_map": None}
COUNTER = {"name": "calls_total", "kind": "counter", "help": "c", "unit": "", "scale": 1.0,
           "labels": [{"name": "comm", "type": "str", "render": "", "names": []},
                      {"name": "pid", "type": "int", "render": "", "names": []}], "edges": [],
           "sum_slot": None, "map": "m_calls_total", "series_limit": 10, "overflow_map": None, "folded_map": None}


def bpftrace_section(metrics, **settings) -> dict:
    """The bpftrace section the backend writes for these metrics (its maps as the script names them)."""
    maps = [{"map": "@" + m["map"], "metric": m["name"], "role": "main"} for m in metrics]
    maps += [{"map": "@" + m["map"] + "_sum", "metric": m["name"], "role": "sum"}
             for m in metrics if m["kind"] == "histogram"]
    return {"version": "0.17", "interval_ms": 1000, "map_keys_max": 8192, "metric_maps": maps, "epoch_maps": [],
            "counters": [], "ready_map": "@__probec_ready", "separator": "\x1f", "event_mark": "E",
            "ready_mark": "probec: all probes attached", "dump_mark": "", "probes": [], **settings}


def manifest(metrics, **top) -> Manifest:
    """A bpftrace bundle's manifest with these metrics and nothing else unless `top` says."""
    return Manifest.from_dict({"probec_manifest": MANIFEST_VERSION, "name": "t", "spec": "t.yaml", "description": "",
                               "backend": "bpftrace", "files": {"script": "t.bt"}, "maps": [], "spans": [],
                               "metrics": metrics, "events": [], "probes": [], "groups": {}, "core": None,
                               "bpftrace": bpftrace_section(metrics), **top})


MANIFEST = manifest([HIST, COUNTER])


def test_quantile_interpolates_like_histogram_quantile():
    edges = [1.0, 2.0, 4.0]
    assert quantile(0.5, edges, [0, 10, 0, 0]) == 1.5
    assert quantile(0.99, edges, [100, 0, 0, 0]) == 0.99
    assert quantile(0.5, edges, [0, 0, 0, 5]) == 4.0          # +Inf: the last edge
    assert quantile(0.5, edges, [0, 0, 0, 0]) is None


def test_series_cap_folds_the_smallest_into_overflow():
    store = MetricStore(MANIFEST)
    store.replace("lat_seconds", {("a",): HistogramSeries([5, 0, 0, 0], 10), ("b",): HistogramSeries([0, 9, 0, 0], 9),
                                  ("c",): HistogramSeries([1, 0, 0, 0], 1), ("d",): HistogramSeries([0, 0, 2, 0], 6)})
    snap = store.snapshot()["lat_seconds"]
    assert set(snap.series) == {("a",), ("b",), (OVERFLOW,)}
    assert snap.series[(OVERFLOW,)].buckets == [1, 0, 2, 0] and snap.dropped_series == 2


def test_bpftrace_keys_with_commas_in_a_string_label():
    store = MetricStore(MANIFEST)
    dec = MapDecoder(MANIFEST, store)
    dec.feed("@m_calls_total", {"a,b,c,42": 3, "plain,7": 1})
    assert store.snapshot()["calls_total"].series == {("a,b,c", 42): 3, ("plain", 7): 1}
    dec.feed("@m_lat_seconds", {"x,y,1": 4, "x,y,3": 1})
    dec.feed("@m_lat_seconds_sum", {"x,y": 9000})
    series = store.snapshot()["lat_seconds"].series[("x,y",)]
    assert series.buckets == [0, 4, 0, 1] and series.sum == 9000


def test_counts_carry_over_a_restart():
    store = MetricStore(MANIFEST)
    dec = MapDecoder(MANIFEST, store)
    dec.feed("@m_calls_total", {"a,1": 5})
    dec.carry_over()
    dec.feed("@m_calls_total", {"a,1": 2, "b,2": 1})
    assert store.snapshot()["calls_total"].series == {("a", 1): 7, ("b", 2): 1}


GAUGE = {"name": "requests_in_flight", "kind": "gauge", "help": "g", "unit": "", "scale": 1.0, "labels": [],
         "edges": [], "sum_slot": None, "map": "m_requests_in_flight", "series_limit": 10, "overflow_map": None,
         "folded_map": None}


def test_a_gauge_starts_again_with_bpftrace_and_exports_its_zero():
    """What a gauge showed before a restart is not carried over (the spans it counted open are gone
    with the old bpftrace); a gauge at 0 is exported as 0, where a counter at 0 has no sample."""
    gauges = manifest([GAUGE, COUNTER])
    store = MetricStore(gauges)
    dec = MapDecoder(gauges, store)
    dec.feed("@m_requests_in_flight", 3)
    dec.feed("@m_calls_total", {"a,1": 5})
    dec.carry_over()
    dec.feed("@m_requests_in_flight", 1)
    dec.feed("@m_calls_total", {"a,1": 2})
    assert store.snapshot()["requests_in_flight"].series == {(): 1}
    assert store.snapshot()["calls_total"].series == {("a", 1): 7}
    dec.feed("@m_requests_in_flight", 0)
    fams = {f.name: f for f in text_string_to_metric_families(Exporter(store, "t", "bpftrace").text())}
    assert fams["requests_in_flight"].type == "gauge"
    assert [(s.name, s.value) for s in fams["requests_in_flight"].samples] == [("requests_in_flight", 0)]


def test_exposition_uses_le_edges_in_seconds():
    store = MetricStore(MANIFEST)
    store.replace("lat_seconds", {("srv",): HistogramSeries([1, 2, 0, 1], 9000)})
    store.remember()
    text = Exporter(store, "t", "core").text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    buckets = {s.labels["le"]: s.value for s in fams["lat_seconds"].samples if s.name.endswith("_bucket")}
    assert buckets == {"1e-06": 1, "2e-06": 3, "4e-06": 3, "+Inf": 4}
    total = [s.value for s in fams["lat_seconds"].samples if s.name.endswith("_sum")]
    assert abs(total[0] - 9e-6) < 1e-15
    assert "probec_up" in fams and "probec_events_lost" in fams


PARTS = {"name": "parts_seconds", "kind": "histogram", "help": "p", "unit": "seconds", "scale": 1e-9,
         "labels": [{"name": "part", "type": "int", "render": "enum", "names": ["send", "offcpu"]},
                    {"name": "thread", "type": "str", "render": "", "names": []}],
         "edges": [1000, 2000, 4000], "sum_slot": 4, "map": "m_parts_seconds", "series_limit": 10,
         "overflow_map": None, "folded_map": None}


def test_parts_export_their_names_and_keep_quantiles_apart():
    store = MetricStore(manifest([PARTS]))
    store.replace("parts_seconds", {(0, "w0"): HistogramSeries([10, 0, 0, 0], 5000),
                                    (0, "w1"): HistogramSeries([10, 0, 0, 0], 5000),
                                    (1, "w0"): HistogramSeries([0, 0, 20, 0], 60000)})
    store.remember()
    fams = {f.name: f for f in text_string_to_metric_families(Exporter(store, "t", "core").text())}
    counts = {(s.labels["part"], s.labels["thread"]): s.value for s in fams["parts_seconds"].samples
              if s.name.endswith("_count")}
    assert counts == {("send", "w0"): 10, ("send", "w1"): 10, ("offcpu", "w0"): 20}
    # Quantiles per part (threads merged): a median over both parts would mean nothing.
    p50 = {s.labels["part"]: s.value for s in fams["parts_seconds_window"].samples if s.labels["quantile"] == "0.5"}
    assert p50 == pytest.approx({"send": 0.5e-6, "offcpu": 3e-6})


def test_bpftrace_health_counts_carry_over_a_restart(tmp_path):
    """bpftrace's own counts (events seen, spans dropped for outliving their `within` span)
    restart at zero with the process; the exported counters must not go down."""
    from probec.runtime.bpftrace_runner import BpftraceRunner
    from probec.runtime.manifest import Bundle
    (tmp_path / "t.bt").write_text("")
    counters = [{"map": "@__ev_slow_seen", "kind": "event_seen", "name": "slow"},
                {"map": "@__ev_slow_limited", "kind": "event_rate_limited", "name": "slow"},
                {"map": "@__span_offcpu_outside", "kind": "span_outside", "name": "offcpu"}]
    typed = manifest([HIST, COUNTER], events=[
        {"name": "slow", "index": 0, "fields": [], "sample_every": 1, "max_per_second": 0,
         "record": {"name": "event_slow", "size": 24, "format": "<IIQII4x", "fields": []}}],
        spans=[{"name": "offcpu", "map": "span_offcpu_begin", "capacity": 2, "checked_at_end": True,
                "task_storage": False, "task_map": ""},
               {"name": "req", "map": "span_req_begin", "capacity": 2, "checked_at_end": False,
                "task_storage": False, "task_map": ""}],
        bpftrace=bpftrace_section([HIST, COUNTER], counters=counters))
    store = MetricStore(typed)
    runner = BpftraceRunner(Bundle(tmp_path, typed), store, None, log=lambda *_: None)
    assert store.health.span_outside == {"offcpu": 0}          # exported from the start, as 0
    runner.handle({"type": "map", "data": {"@__ev_slow_seen": 5, "@__span_offcpu_outside": 2}})
    runner.carry_over()
    runner.handle({"type": "map", "data": {"@__ev_slow_seen": 1, "@__span_offcpu_outside": 1}})
    assert store.health.events_emitted["slow"] == 6 and store.health.span_outside == {"offcpu": 3}


def test_bpftrace_dump_cut_by_a_kill_is_not_applied(tmp_path):
    """A dump is applied once its mark arrives: maps of a dump that a kill cut short never reach
    the store, so what a restart carries over (counters and histograms alike) is one dump."""
    from probec.runtime.bpftrace_runner import BpftraceRunner
    from probec.runtime.manifest import Bundle
    (tmp_path / "t.bt").write_text("")
    typed = manifest([HIST, COUNTER], bpftrace=bpftrace_section([HIST, COUNTER], dump_mark="probec: dump end"))
    store = MetricStore(typed)
    runner = BpftraceRunner(Bundle(tmp_path, typed), store, None, log=lambda *_: None)
    mark = {"type": "printf", "data": "probec: dump end\n"}
    runner.handle({"type": "map", "data": {"@m_calls_total": {"a,1": 5}}})
    assert store.snapshot()["calls_total"].series == {}          # not before its mark
    runner.handle({"type": "map", "data": {"@m_lat_seconds": {"a,0": 5}}})
    runner.handle({"type": "map", "data": {"@m_lat_seconds_sum": {"a": 500}}})
    runner.handle(mark)
    assert store.snapshot()["calls_total"].series == {("a", 1): 5}
    assert store.snapshot()["lat_seconds"].series[("a",)].count == 5
    runner.handle({"type": "map", "data": {"@m_calls_total": {"a,1": 9}}})   # then killed: no mark
    runner.pending = {}                                          # what the reader does at a kill
    runner.carry_over()
    runner.handle({"type": "map", "data": {"@m_calls_total": {"a,1": 1}}})
    runner.handle({"type": "map", "data": {"@m_lat_seconds": {"a,0": 1}}})
    runner.handle(mark)
    assert store.snapshot()["calls_total"].series == {("a", 1): 6}
    assert store.snapshot()["lat_seconds"].series[("a",)].count == 6


def test_bpftrace_epochs_add_up_to_one_instant(tmp_path):
    """Metric maps are keyed by an epoch that each dump flips: the runner adds the epoch a dump
    froze to the other one as the dump before froze it, and ignores the epoch still counting."""
    from probec.runtime.bpftrace_runner import BpftraceRunner
    from probec.runtime.manifest import Bundle
    (tmp_path / "t.bt").write_text("")
    maps = ["@m_calls_total", "@m_lat_seconds", "@m_lat_seconds_sum"]
    typed = manifest([HIST, COUNTER], bpftrace=bpftrace_section([HIST, COUNTER], dump_mark="probec: dump end",
                                                                 epoch_maps=maps))
    store = MetricStore(typed)
    runner = BpftraceRunner(Bundle(tmp_path, typed), store, None, log=lambda *_: None)

    def dump(frozen, calls, lat, lat_sum):
        runner.handle({"type": "map", "data": {"@m_calls_total": calls}})
        runner.handle({"type": "map", "data": {"@m_lat_seconds": lat}})
        runner.handle({"type": "map", "data": {"@m_lat_seconds_sum": lat_sum}})
        if frozen is not None:
            runner.handle({"type": "printf", "data": f"probec: dump end {frozen}\n"})

    def shown():
        snap = store.snapshot()
        return snap["calls_total"].series[("a", 1)], snap["lat_seconds"].series[("a",)].count
    dump(0, {"0,a,1": 5, "1,a,1": 1}, {"0,a,0": 5, "1,a,0": 2}, {"0,a": 50, "1,a": 20})
    assert shown() == (5, 5)                      # epoch 1 is still counting: not shown yet
    dump(1, {"0,a,1": 7, "1,a,1": 3}, {"0,a,0": 8, "1,a,0": 3}, {"0,a": 80, "1,a": 30})
    assert shown() == (8, 8)                      # 5 (epoch 0 at the first flip) + 3
    dump(None, {"0,a,1": 9, "1,a,1": 3}, {"0,a,0": 9, "1,a,0": 3}, {"0,a": 90, "1,a": 30})
    runner.apply_dump(final=True)                 # printed at exit, after the probes detached
    assert shown() == (12, 12)


def test_bpftrace_dump_mark_says_when_it_froze(tmp_path):
    """A dump mark carries the instant its epoch froze (nsecs, CLOCK_MONOTONIC): promote reads core
    on either side of it. A mark without it (a bundle of an older probec) still applies."""
    from probec.runtime.bpftrace_runner import BpftraceRunner
    from probec.runtime.manifest import Bundle
    (tmp_path / "t.bt").write_text("")
    typed = manifest([HIST, COUNTER], bpftrace=bpftrace_section([HIST, COUNTER], dump_mark="probec: dump end",
                                                                 epoch_maps=["@m_calls_total"]))
    store = MetricStore(typed)
    runner = BpftraceRunner(Bundle(tmp_path, typed), store, None, log=lambda *_: None)
    runner.handle({"type": "map", "data": {"@m_calls_total": {"0,a,1": 4}}})
    runner.handle({"type": "printf", "data": "probec: dump end 0 123456789\n"})
    assert (runner.dumps, runner.flipped_ns) == (1, 123456789)
    assert store.snapshot()["calls_total"].series[("a", 1)] == 4
    runner.handle({"type": "map", "data": {"@m_calls_total": {"0,a,1": 4, "1,a,1": 2}}})
    runner.handle({"type": "printf", "data": "probec: dump end 1\n"})
    assert (runner.dumps, runner.flipped_ns) == (2, 0)
    assert store.snapshot()["calls_total"].series[("a", 1)] == 6


def test_series_cap_keeps_the_first_label_sets_seen():
    """Once in, a label set stays: a later, heavier one folds instead (as the core kernel does)."""
    store = MetricStore(MANIFEST)
    said = []
    store.log = said.append
    state = store.metrics["calls_total"]
    state.meta = dataclasses.replace(state.meta, series_limit=2)
    store.replace("calls_total", {("a", 1): 1, ("b", 1): 2})
    store.replace("calls_total", {("a", 1): 1, ("b", 1): 2, ("c", 1): 50, ("d", 1): 1}, overflow=7, folded=3)
    snap = store.snapshot()["calls_total"]
    assert snap.series == {("a", 1): 1, ("b", 1): 2, (OVERFLOW, OVERFLOW): 50 + 1 + 7}
    assert snap.dropped_series == 2 + 3          # folded here, and folded by the kernel
    assert len(said) == 1 and "calls_total" in said[0]
    store.replace("calls_total", {("a", 1): 2, ("b", 1): 2, ("c", 1): 60, ("d", 1): 1}, overflow=7, folded=3)
    assert len(said) == 1 and store.snapshot()["calls_total"].series[(OVERFLOW, OVERFLOW)] == 68
    # after a bpftrace restart: the folded counts come back carried in __overflow__, and a folded
    # label set not seen again since is still counted
    store.replace("calls_total", {("a", 1): 2, ("b", 1): 2, (OVERFLOW, OVERFLOW): 61, ("c", 1): 1})
    snap = store.snapshot()["calls_total"]
    assert snap.series[(OVERFLOW, OVERFLOW)] == 62 and snap.dropped_series == 2


def test_window_quantiles_are_a_summary_that_promtool_accepts():
    """Prometheus reserves the `quantile` label for summaries: `promtool check metrics` flagged
    every histogram's quantile gauges."""
    import shutil
    import subprocess
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    store = MetricStore(manifest([PARTS, COUNTER]))
    store.replace("parts_seconds", {(0, "w0"): HistogramSeries([10, 0, 0, 0], 5000)})
    store.replace("calls_total", {("a", 1): 3})
    store.remember()
    text = Exporter(store, "t", "core").text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["parts_seconds_window"].type == "summary"
    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert (lint.returncode, lint.stdout + lint.stderr) == (0, "")


def test_a_burst_of_scrapers_connects_at_once():
    """64 scrapers connecting at the same moment all get through the handshake without waiting
    for a SYN to be sent again (1 s): the listen backlog holds them until they are accepted."""
    import select
    import socket
    import time
    store = MetricStore(MANIFEST)
    store.replace("calls_total", {("a", 1): 3})
    exporter = Exporter(store, "t", "core")
    port = exporter.serve("127.0.0.1", 0)
    socks = [socket.socket() for _ in range(64)]
    try:
        started = time.monotonic()
        for s in socks:
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
        pending = set(socks)
        while pending and time.monotonic() - started < 3:
            _, writable, _ = select.select([], list(pending), [], 0.1)
            pending -= set(writable)
        # a SYN dropped from a full queue is sent again after 1 s: none may need it
        assert not pending and time.monotonic() - started < 0.9, (len(pending), time.monotonic() - started)
        for s in socks:
            s.setblocking(True)
            s.settimeout(10)
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        for s in socks:
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
            assert reply.startswith(b"HTTP/1.0 200") and b'calls_total{comm="a",pid="1"} 3.0' in reply
    finally:
        for s in socks:
            s.close()
        exporter.close()


def test_binary_watch_tells_a_replaced_file_from_one_changed_in_place(tmp_path):
    """A new inode at the path is reported once it has stayed the same for one check (a copy still
    being written is not), until accepted; a change in place is reported once per change."""
    import os
    from probec.runtime.watch import BinaryWatch
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"old")
    watch = BinaryWatch([str(lib)])
    assert watch.check() == ([], [])
    held = open(lib, "rb")     # as a uprobe or a process mapping it does: its inode is not reused
    lib.unlink()
    assert watch.check() == ([], [])                      # removed, the new copy not there yet
    lib.write_bytes(b"new, being written")
    held.close()
    assert watch.check() == ([], [])                      # first seen: wait one check
    assert watch.check() == ([str(lib)], [])
    assert watch.check() == ([str(lib)], [])              # until the probes are on it
    watch.accept(str(lib))
    assert watch.check() == ([], [])
    with open(lib, "ab") as f:
        f.write(b"more")
    os.utime(lib, ns=(1, 1))
    assert watch.check() == ([], [str(lib)])
    assert watch.check() == ([], [])


def test_process_target_follows_the_pid_file(tmp_path):
    import os
    import subprocess
    from probec.runtime.watch import ProcessTarget, TargetError
    pid_file = tmp_path / "svc.pid"
    for text, why in (("", "does not hold a process id"), ("12ab\n", "does not hold a process id")):
        pid_file.write_text(text)
        with pytest.raises(TargetError, match=why):
            ProcessTarget(-1, str(pid_file))
    with pytest.raises(TargetError, match="cannot read it"):
        ProcessTarget(-1, str(tmp_path / "missing.pid"))
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(TargetError, match="not a regular file"):
        ProcessTarget(-1, str(tmp_path / "fifo"))
    first = subprocess.Popen(["sleep", "30"])
    second = subprocess.Popen(["sleep", "30"])
    try:
        pid_file.write_text(f"{first.pid}\n")
        target = ProcessTarget(-1, str(pid_file))
        assert target.pid == first.pid and target.check() == (False, None)
        first.kill()
        first.wait()
        assert target.check() == (True, None)
        assert target.check() == (False, None)           # said once
        pid_file.write_text(f"{second.pid}")
        exited, new = target.check()
        assert not exited and new[0] == second.pid
        target.follow(*new)
        assert target.check() == (False, None)
    finally:
        for p in (first, second):
            p.kill()
            p.wait()
    with pytest.raises(TargetError, match=f"no running process {first.pid}"):
        ProcessTarget(first.pid)


def test_a_full_bpftrace_map_is_shown_and_said_once(tmp_path):
    """bpftrace 0.17 drops updates to new keys of a full map silently: the runner shows each metric
    map's entries against BPFTRACE_MAP_KEYS_MAX and warns once when one fills."""
    from probec.runtime.bpftrace_runner import BpftraceRunner
    from probec.runtime.manifest import Bundle
    (tmp_path / "t.bt").write_text("")
    typed = manifest([HIST, COUNTER], bpftrace=bpftrace_section([HIST, COUNTER], dump_mark="probec: dump end",
                                                                 map_keys_max=4))
    said = []
    store = MetricStore(typed)
    runner = BpftraceRunner(Bundle(tmp_path, typed), store, None, log=said.append)
    mark = {"type": "printf", "data": "probec: dump end\n"}
    runner.handle({"type": "map", "data": {"@m_calls_total": {"a,1": 5, "b,1": 1, "c,1": 1}}})
    runner.handle(mark)
    assert store.health.map_entries["m_calls_total"] == 3 and store.health.map_capacity["m_calls_total"] == 4
    assert not said
    for _ in range(2):
        runner.handle({"type": "map", "data": {"@m_calls_total": {"a,1": 5, "b,1": 1, "c,1": 1, "d,1": 1}}})
        runner.handle(mark)
    assert store.health.map_entries["m_calls_total"] == 4
    assert len(said) == 1 and "@m_calls_total is full" in said[0]
