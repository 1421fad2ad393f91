"""Which container and pod: labels and filters by the task's cgroup.

The kernel tests create cgroups shaped as a kubelet makes them (systemd driver with containerd and
CRI-O, and the cgroupfs driver) in this host's cgroup v2 hierarchy, run a workload with an exact
number of syscalls in each, and check every series and filter under both backends. Names come from
a kubelet-shaped HTTP endpoint on loopback serving tests/recorded/kubelet_pods.json (a v1 PodList
in the kubelet's /pods shape, written for these cgroups: no kubelet runs here). The cgroups are
removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import ROOT, require_kernel
from harness import Run, build, children, value, write_spec
from probec.host.containers import CgroupTree, cgroup2_root, cgroup_id, parse_cgroup_path, parse_pod_list
from probec.runtime.cgroups import CgroupMap, CgroupResolver, KubeletPods
from probec.runtime.manifest import CgroupMatchInfo, CgroupSection, Label
from probec.runtime.store import Health, MetricStore

PODS = ROOT / "tests" / "recorded" / "kubelet_pods.json"
A_UID, A_CID = "4f6e2b9c-0d1a-4c55-9a2e-6b3f8d7e1a20", "3f1c9a0e5b7d4c2a8e6f1b3d5c7a9e0f2b4d6c8a1e3f5b7d9c0a2e4f6b8d1c3e"
B_UID, B_CID = "9d2f7a61-5c3e-4b8d-a1f0-2e6c4b9d7a35", "a7e3c5b1d9f2468ace0b1d3f5a7c9e2b4d6f8a0c1e3b5d7f9a2c4e6b8d0f1a3c"
C_UID, C_CID = "c1b2d3e4-f5a6-4789-8abc-def012345678", "0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c"
# Where each runtime and cgroup driver puts a container (relative to the cgroup v2 root); the
# tests make these under a folder of their own so that nothing of the host's is touched.
SHAPES = {
    "a": f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{A_UID.replace('-', '_')}.slice/"
         f"cri-containerd-{A_CID}.scope",
    "b": f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{B_UID.replace('-', '_')}.slice/"
         f"crio-{B_CID}.scope",
    "c": f"kubepods/burstable/pod{C_UID}/{C_CID}",
}
EXPECTED = {   # what each container's series carry, besides its cgroup_id
    "a": {"container_id": A_CID, "pod_uid": A_UID, "pod": "model-0", "namespace": "serving", "container": "server"},
    "b": {"container_id": B_CID, "pod_uid": B_UID, "pod": "ingest-7", "namespace": "batch", "container": "worker"},
    "c": {"container_id": C_CID, "pod_uid": C_UID, "pod": "model-1", "namespace": "serving", "container": "sidecar"},
}
CALLS = {"a": 300, "b": 200, "c": 100}


# --- without the kernel: path shapes, the pod list, caching, expiry -----------------------------
@pytest.mark.parametrize("path, container, pod", [
    ("/" + SHAPES["a"], A_CID, A_UID),
    ("/" + SHAPES["b"], B_CID, B_UID),
    ("/" + SHAPES["c"], C_CID, C_UID),
    (f"/kubepods.slice/kubepods-pod{A_UID.replace('-', '_')}.slice/docker-{A_CID}.scope", A_CID, A_UID),
    (f"/kubepods/besteffort/pod{B_UID}/crio-conmon-{B_CID}.scope", "", B_UID),   # CRI-O's monitor, not it
    (f"/system.slice/docker-{C_CID}.scope", C_CID, ""),                             # Docker without Kubernetes
    (f"/docker/{C_CID}", C_CID, ""),
    ("/user.slice/user-0.slice/session-3.scope", "", ""),
    ("/", "", ""),
])
def test_container_and_pod_from_the_cgroup_path(path, container, pod):
    ref = parse_cgroup_path(path)
    assert (ref.container_id, ref.pod_uid) == (container, pod)


def test_pod_list_indexes_pods_and_containers():
    pods = parse_pod_list(PODS.read_bytes())
    assert {(p.name, p.namespace) for p in pods.pods.values()} == {("model-0", "serving"), ("ingest-7", "batch"),
                                                                   ("model-1", "serving")}
    assert pods.containers[B_CID] == (B_UID, "worker")          # cri-o://ID
    assert pods.containers[C_CID] == (C_UID, "sidecar")
    with pytest.raises(ValueError):
        parse_pod_list(b'{"kind": "Status", "code": 403}')


class Kubelet:
    """A kubelet-shaped /pods endpoint on loopback; `failing` makes it answer 500."""

    def __init__(self, body: bytes):
        self.body, self.failing, self.requests = body, False, 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests += 1
                if outer.failing or self.path != "/pods":
                    self.send_response(500 if outer.failing else 404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/pods"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def kubelet():
    k = Kubelet(PODS.read_bytes())
    yield k
    k.close()


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def fake_tree(tmp_path: Path) -> tuple[CgroupTree, dict[str, int]]:
    """A folder tree shaped like the cgroup hierarchy: cgroup ids are folder inode numbers, so a
    plain folder stands in for cgroupfs here."""
    ids = {}
    for name, rel in SHAPES.items():
        (tmp_path / rel).mkdir(parents=True)
        ids[name] = cgroup_id(str(tmp_path / rel))
    return CgroupTree(str(tmp_path), refresh_s=0), ids


def test_names_come_from_the_kubelet_and_are_cached(tmp_path, kubelet):
    tree, ids = fake_tree(tmp_path)
    health, clock = Health(), Clock()
    pods = KubeletPods(kubelet.url, health, refresh_s=30, clock=clock, token_file=None)
    resolver = CgroupResolver(tree, pods, clock=clock)
    resolver.refresh()
    for name, expected in EXPECTED.items():
        assert {a: resolver.attribute(a, ids[name]) for a in expected} == expected
    assert kubelet.requests == 1 and health.kubelet_up == 1       # one fetch answered them all
    kubelet.failing = True
    clock.now += 31
    resolver.refresh()
    assert health.kubelet_up == 0 and health.kubelet_errors == 1
    assert resolver.attribute("pod", ids["a"]) == "model-0"       # the last list stays in use
    kubelet.failing = False
    clock.now += 31
    resolver.refresh()
    assert health.kubelet_up == 1 and kubelet.requests == 3


def test_kubelet_that_never_answers_is_a_health_metric(tmp_path):
    tree, ids = fake_tree(tmp_path)
    health = Health()
    dead = KubeletPods("http://127.0.0.1:9/pods", health, log=lambda m: None, token_file=None)   # discard port
    resolver = CgroupResolver(tree, dead)
    resolver.refresh()
    assert health.kubelet_up == 0 and health.kubelet_errors == 1
    assert resolver.attribute("pod", ids["a"]) == "" and resolver.attribute("container_id", ids["a"]) == A_CID


def test_series_of_gone_containers_are_dropped_after_the_grace_period(tmp_path, kubelet):
    from probec.runtime.manifest import Manifest, MetricInfo, MetricKind
    tree, ids = fake_tree(tmp_path)
    clock = Clock()
    resolver = CgroupResolver(tree, KubeletPods(kubelet.url, Health(), clock=clock, token_file=None), grace_s=60,
                              clock=clock)
    labels = (Label("cgroup_id", "int", "cgroup_id", ()), Label("pod", "int", "pod", ()))
    meta = MetricInfo("calls_total", MetricKind.COUNTER, "", "", 1.0, labels, (), None, "m_calls_total", 2, None, None)
    manifest = Manifest(3, "t", "t.yaml", "", "core", {}, (), (), (meta,), (), (), {})
    store = MetricStore(manifest, cgroups=resolver)
    raw = {(ids["a"], ids["a"]): 5, (ids["b"], ids["b"]): 7}
    store.replace("calls_total", dict(raw))
    assert store.metrics["calls_total"].series == {(ids["a"], "model-0"): 5, (ids["b"], "ingest-7"): 7}
    shutil.rmtree(tmp_path / SHAPES["b"].split("/", 1)[0] / SHAPES["b"].split("/", 1)[1].rsplit("/", 1)[0])
    clock.now += 11
    tree.scan()
    store.replace("calls_total", dict(raw))     # gone, within the grace period: still shown
    assert (ids["b"], "ingest-7") in store.metrics["calls_total"].series
    clock.now += 60
    store.replace("calls_total", dict(raw))
    assert store.metrics["calls_total"].series == {(ids["a"], "model-0"): 5}
    assert store.metrics["calls_total"].expired == {(ids["b"], ids["b"])}
    # its place under limits.series (2) is free again: a new container's series is kept, not folded
    store.replace("calls_total", {(ids["a"], ids["a"]): 5, (ids["c"], ids["c"]): 1})
    assert store.metrics["calls_total"].series == {(ids["a"], "model-0"): 5, (ids["c"], "model-1"): 1}


def test_series_carried_over_a_bpftrace_restart_are_dropped_after_the_grace_period(tmp_path, kubelet):
    """bpftrace's decoder carries its own keys (cgroup ids) over a restart, not what they showed,
    and a new bpftrace that has counted nothing yet prints no map: the whole dump still goes through
    the store, which drops the gone container's series and counts it."""
    from probec.runtime.bpftrace_runner import MapDecoder
    from probec.runtime.manifest import MANIFEST_VERSION, Manifest
    tree, ids = fake_tree(tmp_path)
    clock = Clock()
    resolver = CgroupResolver(tree, KubeletPods(kubelet.url, Health(), clock=clock, token_file=None), grace_s=60,
                              clock=clock)
    metric = {"name": "calls_total", "kind": "counter", "help": "c", "unit": "", "scale": 1.0, "edges": [],
              "labels": [{"name": name, "type": "int", "render": name, "names": []} for name in ("cgroup_id", "pod")],
              "sum_slot": None, "map": "m_calls_total", "series_limit": 10, "overflow_map": None, "folded_map": None}
    manifest = Manifest.from_dict({
        "probec_manifest": MANIFEST_VERSION, "name": "t", "spec": "t.yaml", "description": "", "backend": "bpftrace",
        "files": {"script": "t.bt"}, "maps": [], "spans": [], "metrics": [metric], "events": [], "probes": [],
        "groups": {}, "core": None,
        "bpftrace": {"version": "0.17", "interval_ms": 1000, "map_keys_max": 8192, "epoch_maps": [], "counters": [],
                     "metric_maps": [{"map": "@m_calls_total", "metric": "calls_total", "role": "main"}],
                     "ready_map": "@__probec_ready", "separator": "\x1f", "event_mark": "E",
                     "ready_mark": "probec: all probes attached", "dump_mark": "probec: dump end", "probes": []}})
    said = []
    store = MetricStore(manifest, log=said.append, cgroups=resolver)
    decoder = MapDecoder(manifest, store)
    decoder.feed("@m_calls_total", {f"{ids['a']},{ids['a']}": 5, f"{ids['b']},{ids['b']}": 7})
    decoder.dump_done()
    decoder.carry_over()                                    # bpftrace restarted
    shutil.rmtree(tmp_path / SHAPES["b"].split("/", 1)[0] / SHAPES["b"].split("/", 1)[1].rsplit("/", 1)[0])
    clock.now += 11
    tree.scan()
    decoder.dump_done()             # a dump without the map: within the grace period, still shown
    assert store.metrics["calls_total"].series == {(ids["a"], "model-0"): 5, (ids["b"], "ingest-7"): 7}
    clock.now += 60
    decoder.dump_done()
    assert store.metrics["calls_total"].series == {(ids["a"], "model-0"): 5}
    assert store.metrics["calls_total"].expired == {(ids["b"], ids["b"])} and len(said) == 1
    decoder.carry_over()                                    # restarted again: the dropped series stays dropped
    decoder.feed("@m_calls_total", {f"{ids['a']},{ids['a']}": 1})
    decoder.dump_done()
    assert store.metrics["calls_total"].series == {(ids["a"], "model-0"): 6} and len(said) == 1


def test_cgroup_map_marks_filters_and_path_and_forgets(tmp_path, kubelet):
    tree, ids = fake_tree(tmp_path)
    clock = Clock()
    resolver = CgroupResolver(tree, KubeletPods(kubelet.url, Health(), clock=clock, token_file=None), clock=clock)
    section = CgroupSection("probec_cgroups", 62, (CgroupMatchInfo(0, "namespace", "serving"),
                                                   CgroupMatchInfo(1, "container", "sidecar")))
    pod_b = str(tmp_path / SHAPES["b"].rsplit("/", 1)[0])
    cmap = CgroupMap(section, resolver, path=pod_b)
    kernel: dict[int, int] = {}
    assert cmap.sync(kernel.__setitem__, kernel.pop) == len(kernel)
    pod_a = cgroup_id(str(tmp_path / SHAPES["a"].rsplit("/", 1)[0]))
    assert kernel[ids["a"]] == 1 and kernel[pod_a] == 1          # the pod's own cgroup is in the pod too
    assert kernel[ids["c"]] == 0b11                              # serving, and the sidecar
    assert kernel[ids["b"]] == 1 << 62 and kernel[cgroup_id(pod_b)] == 1 << 62
    os.rmdir(tmp_path / SHAPES["a"])
    tree.scan()
    cmap.sync(kernel.__setitem__, kernel.pop)
    assert ids["a"] not in kernel


# --- in the kernel --------------------------------------------------------------------------------
SPEC = """
name: pod_calls
metrics:
  getpid_calls_total:
    count: syscall:getpid
    filter: comm == "podwork"
    labels: [cgroup_id, container_id, pod_uid, pod, namespace, container]
  serving_calls_total:
    count: syscall:getpid
    filter: comm == "podwork" and namespace == "serving" and container != "sidecar"
  calls_by_namespace_total:
    count: syscall:getpid
    filter: comm == "podwork"
    labels: [namespace]
events:
  call:
    on: syscall:getpid
    when: comm == "podwork"
    sample: 1/50
    fields: [cgroup_id, pod, namespace, container]
"""


@pytest.fixture
def pod_cgroups():
    """The three containers' cgroups, in a folder of this test's own under the cgroup v2 root."""
    require_kernel()
    root = cgroup2_root()
    if root is None:
        pytest.fail("this host has no cgroup v2 hierarchy; the container tests need one")
    base = Path(root) / f"probec-test-{os.getpid()}"
    made = {}
    try:
        for name, rel in SHAPES.items():
            (base / rel).mkdir(parents=True)
            made[name] = base / rel
        yield base, made
    finally:
        for folder in sorted((p for p in [base, *base.rglob("*")] if p.is_dir()), key=lambda p: -len(p.parts)):
            try:
                for pid in (folder / "cgroup.procs").read_text().split():
                    (Path(root) / "cgroup.procs").write_text(pid)
                folder.rmdir()
            except OSError:
                pass


def run_in(folder: Path | None, workloads: Path, calls: int) -> None:
    """pwork makes `calls` getpid syscalls, from inside the cgroup `folder` (None: where we are)."""
    argv = [str(workloads / "pwork"), "--comm", "podwork", "getpid", str(calls)]
    if folder is not None:
        argv = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(folder), *argv]
    subprocess.run(argv, check=True, timeout=60)


@pytest.mark.kernel
@pytest.mark.parametrize("backend", ["bpftrace", "core"], indirect=True)  # bcc refuses pod filters and --cgroup (test_bcc_backend)
def test_series_carry_each_containers_ids_and_names(backend, workloads, pod_cgroups, kubelet, tmp_path):
    base, made = pod_cgroups
    bundle = build(write_spec(tmp_path, SPEC), backend, tmp_path / "bundle")
    run = Run(bundle, tmp_path, "--kubelet", kubelet.url)
    try:
        for name, folder in made.items():
            run_in(folder, workloads, CALLS[name])
        run_in(None, workloads, 50)          # outside every container: empty names
        time.sleep(1.2)
    finally:
        metrics = run.stop()
    for name, folder in made.items():
        assert value(metrics, "getpid_calls_total", cgroup_id=cgroup_id(str(folder)), **EXPECTED[name]) == CALLS[name]
    outside = {k: v for k, v in metrics["getpid_calls_total"].items() if dict(k).get("pod") == ""}
    assert sum(outside.values()) == 50 and all(dict(k)["container_id"] == "" for k in outside), outside
    assert sum(metrics["getpid_calls_total"].values()) == 650
    assert value(metrics, "serving_calls_total") == 300                  # model-0's server; not the sidecar
    assert value(metrics, "calls_by_namespace_total", namespace="serving") == 400    # two cgroups, one series
    assert value(metrics, "calls_by_namespace_total", namespace="batch") == 200
    assert value(metrics, "probec_kubelet_up") == 1
    assert value(metrics, "probec_cgroups_marked") == 4    # both serving pods and their containers
    events = run.events()            # 1 in 50 of each workload's calls (each makes a multiple of 50)
    shown = {n: [(e["pod"], e["namespace"], e["container"]) for e in events if e["cgroup_id"] == cgroup_id(str(f))]
             for n, f in made.items()}
    for name, want in EXPECTED.items():
        assert shown[name] == [(want["pod"], want["namespace"], want["container"])] * (CALLS[name] // 50), shown
    assert len(events) == 650 // 50


@pytest.mark.kernel
@pytest.mark.parametrize("backend", ["bpftrace", "core"], indirect=True)  # bcc refuses pod filters and --cgroup (test_bcc_backend)
def test_cgroup_option_traces_one_pod_in_the_kernel(backend, workloads, pod_cgroups, tmp_path):
    base, made = pod_cgroups
    spec = write_spec(tmp_path, SPEC.split("  serving_calls_total:")[0].replace("pod, namespace, container", ""))
    bundle = build(spec, backend, tmp_path / "bundle")
    pod_b = made["b"].parent
    run = Run(bundle, tmp_path, "--cgroup", str(pod_b.relative_to(cgroup2_root())))
    try:
        for name, folder in made.items():
            run_in(folder, workloads, CALLS[name])
        run_in(None, workloads, 50)
        time.sleep(1.2)
    finally:
        metrics = run.stop()
    assert metrics["getpid_calls_total"] == {
        frozenset({"cgroup_id": str(cgroup_id(str(made["b"]))), "container_id": B_CID, "pod_uid": B_UID}.items()): 200}
    assert value(metrics, "probec_cgroups_marked") == 2        # the pod and its container


@pytest.mark.kernel
def test_series_of_a_removed_container_expire(backend, workloads, pod_cgroups, tmp_path):
    """A container that is gone keeps its series for --cgroup-grace, then they are dropped and
    counted; the core backend also deletes them from the kernel's map (bpftrace's map keeps its
    keys: the runtime only stops showing them)."""
    base, made = pod_cgroups
    spec = write_spec(tmp_path, SPEC.split("  serving_calls_total:")[0].replace("pod, namespace, container", ""))
    bundle = build(spec, backend, tmp_path / "bundle")
    run = Run(bundle, tmp_path, "--cgroup-grace", "1")
    try:
        for name in ("a", "b"):
            run_in(made[name], workloads, CALLS[name])
        time.sleep(1.2)
        made["b"].rmdir()              # its process has exited: the container is gone
        time.sleep(3.5)                # a tree walk (each read here), then the grace period
    finally:
        metrics = run.stop()
    series = metrics["getpid_calls_total"]
    assert list(series.values()) == [CALLS["a"]] and dict(next(iter(series)))["container_id"] == A_CID
    assert value(metrics, "probec_series_expired_total", metric="getpid_calls_total") == 1
    if backend == "core":
        assert value(metrics, "probec_map_entries", map="m_getpid_calls_total") == 1


@pytest.mark.kernel
def test_series_carried_over_a_bpftrace_restart_expire(workloads, pod_cgroups, tmp_path):
    """The same with bpftrace killed (and restarted) between the calls and the container's end: the
    series carried over the restart keep their counts, and the removed container's is dropped after
    --cgroup-grace all the same, counted and said once."""
    require_kernel(need_bpftrace=True)
    base, made = pod_cgroups
    spec = write_spec(tmp_path, SPEC.split("  serving_calls_total:")[0].replace("pod, namespace, container", ""))
    bundle = build(spec, "bpftrace", tmp_path / "bundle")
    run = Run(bundle, tmp_path, "--cgroup-grace", "1")
    try:
        for name in ("a", "b"):
            run_in(made[name], workloads, CALLS[name])
        time.sleep(1.2)                # dumps with both series, before the kill
        (child,) = children(run.proc.pid)
        os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while "restarted" not in run.stderr() and time.monotonic() < deadline:
            time.sleep(0.1)
        made["b"].rmdir()
        time.sleep(3.5)                # a tree walk (each read here), then the grace period
    finally:
        metrics = run.stop()
        print(f"probec run stderr:\n{run.stderr()}")
    assert value(metrics, "probec_backend_restarts_total") == 1
    series = metrics["getpid_calls_total"]
    assert list(series.values()) == [CALLS["a"]] and dict(next(iter(series)))["container_id"] == A_CID, series
    assert value(metrics, "probec_series_expired_total", metric="getpid_calls_total") == 1
    assert run.stderr().count("dropping the series of containers gone") == 1, run.stderr()


# --- binaries inside containers -------------------------------------------------------------------
IN_CONTAINER = "/opt/app/libpwork.so"       # exists only in the workloads' own mount namespaces
NAMESPACED = """#!/bin/sh
# $1: cgroup folder ("" for none), $2: the library, $3: pwork, $4: calls. pwork runs in a mount
# namespace of its own where the library is bind-mounted at /opt/app/libpwork.so (a tmpfs hides the
# host's /opt there) and /opt/app/current.so links to it (an absolute link, which only means the
# right file inside that namespace), waits for a line on stdin, then calls pwork_nop $4 times.
[ -n "$1" ] && echo $$ > "$1/cgroup.procs"
exec unshare -m --propagation private sh -c '
  mount -t tmpfs probec-test /opt && mkdir /opt/app && : > /opt/app/libpwork.so &&
  mount --bind "$0" /opt/app/libpwork.so && ln -s /opt/app/libpwork.so /opt/app/current.so &&
  LD_LIBRARY_PATH=/opt/app exec "$1" --comm ctrwork --wait-stdin nop "$2"
' "$2" "$3" "$4"
"""
NOP_SPEC = """
name: container_binary
binaries:
  lib: {path: /opt/app/libpwork.so, WHERE}
metrics:
  nop_calls_total:
    count: uprobe:lib:pwork_nop
"""


class Namespaced:
    """A pwork with its library at a path only its mount namespace has, waiting to start."""

    def __init__(self, tmp_path: Path, workloads: Path, library: Path, calls: int, cgroup: Path | None = None):
        script = tmp_path / "namespaced.sh"
        script.write_text(NAMESPACED)
        self.proc = subprocess.Popen(["sh", str(script), str(cgroup or ""), str(library), str(workloads / "pwork"),
                                      str(calls)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()       # "PID N": the library is mapped, the calls wait
        assert line.startswith("PID "), line
        self.pid = int(line.split()[1])
        assert IN_CONTAINER in Path(f"/proc/{self.pid}/maps").read_text()

    def release(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.close()
        assert self.proc.wait(60) == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def library_copy(workloads: Path, folder: Path) -> Path:
    """A copy of libpwork.so: an inode of its own, as a container image's file would be."""
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / "libpwork.so"
    shutil.copy(workloads / "libpwork.so", copy)
    return copy


@pytest.mark.kernel
def test_binary_of_a_process_in_its_own_mount_namespace(backend, workloads, tmp_path):
    """`pid: N`: the uprobe sits in the file process N maps, reached through /proc/N/root, though
    no path on the host leads to it any more."""
    assert not os.path.exists(IN_CONTAINER)
    copy = library_copy(workloads, tmp_path / "image")
    work = Namespaced(tmp_path, workloads, copy, 1000)
    run = None
    try:
        copy.unlink()                        # only the workload's mount namespace has the file now
        spec = write_spec(tmp_path, NOP_SPEC.replace("WHERE", f"pid: {work.pid}").replace("libpwork.so", "current.so"))
        bundle = build(spec, backend, tmp_path / "bundle")
        run = Run(bundle, tmp_path)
        work.release()
        time.sleep(1.2)
    finally:
        work.kill()
        metrics = run.stop() if run is not None else {}
    assert value(metrics, "nop_calls_total") == 1000


@pytest.mark.kernel
def test_binary_in_a_container_is_followed_into_new_containers(workloads, pod_cgroups, kubelet, tmp_path):
    """`container: server`: the build reads the file of a running process of that container; the
    core runtime attaches to the same file of every new container named so, once per file: a new
    container of the same image (the same file) adds nothing, one with another file is attached to
    without a restart."""
    require_kernel(need_clang=True)
    base, made = pod_cgroups
    second = base / f"kubepods/burstable/pod{C_UID}/5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f"
    second.mkdir()                           # model-1's "server" container (tests/recorded/kubelet_pods.json)
    image_1, image_2 = library_copy(workloads, tmp_path / "v1"), library_copy(workloads, tmp_path / "v2")
    first = Namespaced(tmp_path, workloads, image_1, 300, made["a"])      # model-0's "server"
    others: list[Namespaced] = []
    run = None
    try:
        spec = write_spec(tmp_path, NOP_SPEC.replace("WHERE", "container: server"))
        import sys
        result = subprocess.run([sys.executable, "-m", "probec", "build", str(spec), "--backend", "core",
                                 "-o", str(tmp_path / "bundle")], capture_output=True, text=True, timeout=180,
                                env={**os.environ, "PROBEC_KUBELET": kubelet.url})
        assert result.returncode == 0, result.stderr
        run = Run(tmp_path / "bundle", tmp_path, "--kubelet", kubelet.url)
        first.release()
        others.append(Namespaced(tmp_path, workloads, image_2, 200, second))   # a new container, a new file
        deadline = time.monotonic() + 20
        while "of container 'server'" not in run.stderr():
            assert time.monotonic() < deadline, run.stderr()
            time.sleep(0.1)
        others[-1].release()
        others.append(Namespaced(tmp_path, workloads, image_1, 100, made["a"]))  # the first file again
        time.sleep(1.2)                                                          # a read: nothing new to attach
        others[-1].release()
        time.sleep(1.2)
    finally:
        for w in [first, *others]:
            w.kill()
        metrics = run.stop() if run is not None else {}
    assert value(metrics, "nop_calls_total") == 600                    # each call once: no file twice
    assert value(metrics, "probec_container_files_attached_total", container="server") == 1
