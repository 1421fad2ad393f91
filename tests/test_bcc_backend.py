"""The bcc backend without a kernel: which kernel headers BCC would compile against, what `probec
check --backend bcc` and `probec build --backend bcc` say about them, and the refusal of constructs
that read kernel structs through headers of another kernel, at build time and at load time.

Headers are made up in a temporary folder (BCC_KERNEL_SOURCE names them, as BCC reads it), so
these tests say the same on any machine; the kernel tests (test_kernel_paths, test_examples,
test_core_backend's parity test, test_golden's bcc load) run the backend for real."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import probec

from probec.host import headers as kernel_headers

SOCKET_SPEC = """\
name: by_socket
spans:
  request:
    begin: {probe: syscall:sendto, key: socket(args.fd)}
    end: {probe: syscall:recvfrom, key: socket(args.fd)}
metrics:
  request_seconds:
    histogram: request.duration
    buckets: [1ms, 10ms]
"""

PLAIN_SPEC = """\
name: plain
metrics:
  sends_total:
    count: syscall:sendto
"""


def fake_headers(folder: Path, release: str) -> Path:
    """A kernel header tree that says it was made for `release` (all BCC or probec reads of it here)."""
    (folder / "include" / "generated").mkdir(parents=True)
    (folder / "include" / "generated" / "utsrelease.h").write_text(f'#define UTS_RELEASE "{release}"\n')
    return folder


def spec_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def with_headers(folder: Path) -> dict:
    return {**os.environ, "BCC_KERNEL_SOURCE": str(folder)}


def test_headers_of_another_kernel_refuse_socket_at_check_and_build(tmp_path):
    spec = spec_file(tmp_path, SOCKET_SPEC)
    env = with_headers(fake_headers(tmp_path / "h", "4.18.0-other"))
    for command in (("check", "--backend", "bcc", str(spec)), ("build", str(spec), "--backend", "bcc",
                                                                 "-o", str(tmp_path / "out"))):
        r = probec(*command, env=env)
        assert r.returncode == 1, r.stderr
        assert "warning[W530]: the kernel headers BCC compiles against" in r.stderr
        assert ", 4.18.0-other) are not the running kernel's (" + os.uname().release + ")" in r.stderr
        assert r.stderr.count("cannot do socket(fd) with these kernel headers") == 2   # begin and end
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_matching_headers_let_socket_build(tmp_path):
    spec = spec_file(tmp_path, SOCKET_SPEC)
    env = with_headers(fake_headers(tmp_path / "h", os.uname().release))
    r = probec("build", str(spec), "--backend", "bcc", "-o", str(tmp_path / "out"), env=env)
    assert r.returncode == 0, r.stderr
    assert "W530" not in r.stderr and "socket(fd)" not in r.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["backend"] == "bcc"
    assert manifest["bcc"]["kernel_struct_reads"] == ["syscall:sendto", "syscall:recvfrom"]
    assert "probec_fd_socket" in (tmp_path / "out" / "by_socket.py").read_text()


def test_headers_of_another_kernel_only_warn_where_no_struct_is_read(tmp_path):
    spec = spec_file(tmp_path, PLAIN_SPEC)
    env = with_headers(fake_headers(tmp_path / "h", "4.18.0-other"))
    r = probec("check", "--backend", "bcc", str(spec), env=env)
    assert r.returncode == 0, r.stderr
    assert "warning[W530]" in r.stderr and "0 error(s), 1 warning(s)" in r.stderr
    r = probec("check", str(spec), env=env)            # without --backend nothing asks about headers
    assert r.returncode == 0 and "W530" not in r.stderr, r.stderr


POD_FILTER_SPEC = """
name: bcc_pods
metrics:
  labelled_total:
    count: syscall:getpid
    labels: [cgroup_id, container_id, namespace]
  serving_total:
    count: syscall:getpid
    filter: namespace == "serving"
"""


def test_pod_name_filters_are_refused_and_cgroup_labels_build(tmp_path):
    spec = spec_file(tmp_path, POD_FILTER_SPEC)
    r = probec("check", "--backend", "bcc", str(spec))
    assert r.returncode == 1
    assert 'error[E501]: the bcc backend cannot do filters on container and pod names (namespace == "serving")' \
        in r.stderr, r.stderr
    assert probec("check", "--backend", "core", str(spec)).returncode == 0
    labels_only = spec_file(tmp_path, POD_FILTER_SPEC.split("  serving_total")[0])
    r = probec("build", "--backend", "bcc", str(labels_only), "-o", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    program = (tmp_path / "b" / "bcc_pods.py").read_text()
    assert "bpf_get_current_cgroup_id" in program and "#define probec_filter_cgroup 0ULL" in program


def test_no_headers_at_all_is_said(monkeypatch):
    from probec.compiler.backends.bcc import generator
    from probec.compiler.driver import build_bundle, check_file
    from probec.compiler.ir.host import RecordedHost
    monkeypatch.setattr(generator, "find_kernel_headers", lambda: None)
    tests = Path(__file__).parent
    result = check_file(str(tests / "golden" / "specs" / "golden_sockets.yaml"),
                        RecordedHost.from_file(str(tests / "hosts" / "firecracker-6.18.json")))
    assert build_bundle(result, "bcc") is None
    said = {(d.code, d.message.split(":")[0]) for d in result.diagnostics.sorted()}
    assert ("W531", "BCC finds no kernel headers on this host") in said
    assert any(code == "E501" and "socket(fd) with these kernel headers" in message for code, message in said)


def test_a_build_for_another_kernel_leaves_the_headers_to_the_host_that_runs_it(tmp_path):
    """--kernel any: this machine's headers say nothing about the target; the runtime checks its own."""
    spec = spec_file(tmp_path, SOCKET_SPEC)
    env = with_headers(fake_headers(tmp_path / "h", "4.18.0-other"))
    r = probec("build", str(spec), "--backend", "bcc", "--kernel", "any", "-o", str(tmp_path / "out"), env=env)
    assert r.returncode == 0, r.stderr
    assert "W530" not in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="probec run refuses to start without root")
def test_run_refuses_a_socket_bundle_where_the_headers_do_not_match(tmp_path):
    """Built where the headers matched, run where they do not: refused before BCC compiles anything."""
    spec = spec_file(tmp_path, SOCKET_SPEC)
    r = probec("build", str(spec), "--backend", "bcc", "-o", str(tmp_path / "out"),
               env=with_headers(fake_headers(tmp_path / "match", os.uname().release)))
    assert r.returncode == 0, r.stderr
    r = probec("run", str(tmp_path / "out"), "--duration", "1", "--port", "0",
               env=with_headers(fake_headers(tmp_path / "other", "4.18.0-other")))
    assert r.returncode == 1, r.stderr
    assert "syscall:sendto, syscall:recvfrom read kernel structs (socket(fd))" in r.stderr
    assert "are not the running kernel's" in r.stderr and "nothing is attached" in r.stderr
    assert "Traceback" not in r.stderr and "attached (bcc)" not in r.stderr


def test_debian_headers_are_joined_into_one_tree(tmp_path):
    """Debian splits a kernel's headers into an arch folder (generated headers) and -common (the
    rest); BCC reads one tree, so the runtime joins them with symbolic links."""
    root = tmp_path / "src"
    arch = fake_headers(root / "linux-headers-6.1.0-57-amd64", "6.1.0-57-amd64")
    (arch / "arch" / "x86" / "include" / "generated").mkdir(parents=True)
    common = root / "linux-headers-6.1.0-57-common"
    for sub in ("include/linux", "include/uapi", "arch/x86/include/asm"):
        (common / sub).mkdir(parents=True)
    (common / "include" / "linux" / "kconfig.h").write_text("/* kconfig */\n")
    (common / "Makefile").write_text("# top\n")
    fake_headers(root / "linux-headers-5.10.0-1-amd64", "5.10.0-1-amd64")      # older: not chosen
    found = kernel_headers.debian_headers("6.18.44", root)
    assert found is not None and found.build == arch and found.source == common
    assert found.release == "6.1.0-57-amd64" and not found.matches
    tree = kernel_headers.joined_tree(found, tmp_path / "trees")
    assert (tree / "include" / "linux" / "kconfig.h").read_text() == "/* kconfig */\n"
    assert (tree / "include" / "generated" / "utsrelease.h").exists()
    assert sorted(p.name for p in (tree / "arch" / "x86" / "include").iterdir()) == ["asm", "generated"]
    assert kernel_headers.joined_tree(found, tmp_path / "trees") == tree       # made once


def test_a_build_link_without_source_finds_debians_common_folder(tmp_path, monkeypatch):
    """Debian's linux-headers-RELEASE makes /lib/modules/RELEASE/build (its arch folder) and no
    `source`: the rest of the headers, in the -common folder beside it, is joined in, since BCC
    given `build` alone finds no include/linux (as in the 6.1 guest of the kernel matrix)."""
    root = tmp_path / "src"
    arch = fake_headers(root / "linux-headers-6.1.0-57-amd64", "6.1.0-57-amd64")
    common = root / "linux-headers-6.1.0-57-common"
    (common / "include" / "linux").mkdir(parents=True)
    modules = tmp_path / "modules"
    (modules / "6.1.0-57-amd64").mkdir(parents=True)
    (modules / "6.1.0-57-amd64" / "build").symlink_to(arch)
    monkeypatch.setattr(kernel_headers, "MODULES", modules)
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    found = kernel_headers.find_kernel_headers("6.1.0-57-amd64")
    assert found.build == modules / "6.1.0-57-amd64" / "build" and found.source == common
    assert found.matches and not found.found_by_bcc          # the runtime joins them for BCC
    (modules / "6.1.0-57-amd64" / "source").symlink_to(common)
    found = kernel_headers.find_kernel_headers("6.1.0-57-amd64")
    assert found.source == modules / "6.1.0-57-amd64" / "source" and found.found_by_bcc


def test_bucket_search_is_the_edge_table_search():
    """The comparisons the bcc program makes for a histogram give the bucket probec_bucket_u64
    finds in the core backend's table: the number of edges below v, for 0, 1, each edge, each
    edge +-1 and past the last."""
    from probec.compiler.backends.bcc.generator import BccBackend
    from probec.compiler.diagnostics import Diagnostics
    from probec.compiler.ir import nodes as ir
    for edges in ((5,), (0, 1, 2, 3, 4, 1023, 1024, 1025), tuple(1 << k for k in range(20)), (1, 10, 100)):
        metric = ir.Metric("m", "histogram", "", "", 1.0, (), edges, None, 0)
        lines = BccBackend(Diagnostics(), check_headers=False).bucket_function(metric, False)["lines"]
        python = ["def bucket(v):"]
        for line in lines:
            body = line.strip()
            indent = "    " * line.count("\t")
            if body.startswith("if ("):
                python.append(indent + "if " + body[4:-3].replace("ULL", "") + ":")
            elif body == "} else {":
                python.append(indent + "else:")
            elif body.startswith("return "):
                python.append(indent + body.rstrip(";"))
        python = "\n".join(python) + "\n"
        scope: dict = {}
        exec(python, scope)   # the comparisons as written, run in Python
        for v in sorted({0, 1, *edges, *(e + 1 for e in edges), *(max(e - 1, 0) for e in edges)}):
            assert scope["bucket"](v) == sum(e < v for e in edges), (edges, v)


def test_fentry_needs_btf_and_a_kernel_span_falls_back_to_its_kprobe(tmp_path):
    """fentry/fexit need kernel BTF, which the hosts bcc is for lack: a `kernel:` span keeps its
    kprobe variant (and its fallback), a lone fentry probe is refused."""
    from probec.compiler.driver import build_bundle, check_file
    from probec.compiler.ir.host import RecordedHost
    host = RecordedHost.from_file(str(Path(__file__).parent / "hosts" / "debian-6.1.json"))
    spec = spec_file(tmp_path, "name: k\nspans:\n  send:\n    kernel: tcp_sendmsg\n    fallback: syscall:sendto\n"
                               "metrics:\n  send_seconds:\n    histogram: send.duration\n    buckets: [1ms]\n"
                               "  sends_total:\n    count: fentry:tcp_sendmsg\n")
    result = check_file(str(spec), host, kernel="any")
    assert result.program is not None, result.diagnostics.items
    assert build_bundle(result, "bcc", check_headers=False) is None
    errors = [d.message for d in result.diagnostics.items if d.code == "E501"]
    assert len(errors) == 1 and errors[0].startswith("the bcc backend cannot do fentry probes (fentry:tcp_sendmsg)")
    spec.write_text(spec.read_text().replace("  sends_total:\n    count: fentry:tcp_sendmsg\n", ""))
    result = check_file(str(spec), host, kernel="any")
    bundle = build_bundle(result, "bcc", check_headers=False)
    assert bundle is not None, result.diagnostics.items
    kinds = [p.kind for p in bundle.manifest.core.programs]
    assert "fentry" not in kinds and "fexit" not in kinds and "kprobe" in kinds and "kretprobe" in kinds
    assert "tracepoint" in kinds          # the fallback, tried after the kprobe


DROPS_SPEC = """\
name: bcc_drops
limits:
  ringbuf: 4KiB
events:
  every_write:
    on: syscall:write
    when: comm == "bcc_drops"
    fields: [comm, args.count, args.fd]
"""


@pytest.mark.kernel
@pytest.mark.parametrize("missing", ["", "ring_buffer"], ids=["ring_buffer", "perf_buffer"])
def test_events_and_drops_are_counted_as_core_counts_them(tmp_path, workloads, monkeypatch, missing):
    """Events go through the ring buffer where the kernel has one, else (kernels before 5.8, or
    PROBEC_PRETEND_MISSING=ring_buffer as core honours it) through a perf buffer, chosen as BCC
    compiles the program. Either way the program counts what it could not hand over in the same
    health slot as core: every event is either written or counted lost (probec_events_lost_total),
    and health and the start line say which mechanism ran."""
    import subprocess
    from conftest import WORKLOADS, require_bcc_kernel
    from probec.compiler.driver import build_bundle, check_file
    from probec.runtime.bcc_runner import BccRunner
    from probec.runtime.events import EventSink
    from probec.runtime.manifest import load_bundle
    from probec.runtime.store import MetricStore
    require_bcc_kernel()
    monkeypatch.setenv("PROBEC_PRETEND_MISSING", missing)
    result = check_file(str(spec_file(tmp_path, DROPS_SPEC)))
    built = build_bundle(result, "bcc")
    assert built is not None, result.diagnostics.items
    built.write(tmp_path / "bundle")
    bundle = load_bundle(tmp_path / "bundle")
    store = MetricStore(bundle.manifest)
    events = tmp_path / "events.jsonl"
    sink = EventSink(str(events), bundle.manifest)
    runner = BccRunner(bundle, store, sink, log=lambda line: None)
    try:
        runner.start()
        subprocess.run([str(WORKLOADS / "pwork"), "--comm", "bcc_drops", "write", "20000", "0"], check=True, timeout=60)
        runner.poll()
        assert runner.failure is None, runner.failure
    finally:
        runner.stop()
        sink.close()
    written = [json.loads(line) for line in events.read_text().splitlines()]
    health = store.health
    assert health.events_emitted["every_write"] == 20000
    assert len(written) + health.events_lost == 20000
    assert all(e["comm"] == "bcc_drops" and e["args_count"] == 0 for e in written), written[:3]
    mechanism = "perf_buffer" if missing else "ring_buffer"
    if not missing:
        assert health.events_lost > 0, "a 4 KiB ring should overflow"
    assert health.mechanisms == {"events": mechanism, "tracepoint_fields": "offsets",
                                 "current_task": "get_current_task", "event_counters": "atomic_fetch_add"}
    assert runner.describe() == (f"events: {mechanism}, tracepoint_fields: offsets, current_task: get_current_task, "
                                 "event_counters: atomic_fetch_add")
