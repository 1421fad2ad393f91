#!/usr/bin/env python3
"""What labelling and filtering by container and pod costs.

User space, at every read: walking the cgroup v2 folders of a node (kubepods-shaped cgroups made
here: PODS pods of 2 containers), marking the cgroups that the spec's comparisons match, and
turning a metric's cgroup ids into pod, namespace and container labels.

Kernel side, per event: `pwork getpid N` run inside a container's cgroup, timed by the caller,
with the core backend counting getpid (filtered by comm), then the same with
`namespace == "serving"` (a hash lookup of the task's cgroup id), with `labels: [pod, namespace,
container]` (the cgroup id in the key), and with `probec run --cgroup` (one more lookup in every
probe); and bpftrace's count and count with the namespace filter.

    flock /tmp/probec-kernel.lock python benchmarks/containers.py [--quick]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from probec.host.containers import CgroupTree, cgroup2_root, cgroup_id  # noqa: E402
from probec.runtime.cgroups import CgroupMap, CgroupResolver, KubeletPods  # noqa: E402
from probec.runtime.manifest import CgroupMatchInfo, CgroupSection, Label, Manifest, MetricInfo, MetricKind  # noqa: E402
from probec.runtime.store import Health, MetricStore  # noqa: E402

COUNT = """
name: bench_pods
metrics:
  getpid_calls_total:
    count: syscall:getpid
    filter: comm == "podbench"FILTER
LABELS"""
VARIANTS = [  # (name, backend, filter, labels, --cgroup)
    ("core: count", "core", "", "", False),
    ("core: + namespace == \"serving\"", "core", ' and namespace == "serving"', "", False),
    ("core: + labels [pod, namespace, container]", "core", "", "    labels: [pod, namespace, container]", False),
    ("core: + --cgroup (the pod)", "core", "", "", True),
    ("bpftrace: count", "bpftrace", "", "", False),
    ("bpftrace: + namespace == \"serving\"", "bpftrace", ' and namespace == "serving"', "", False),
]


def uid(i: int) -> str:
    return f"{i:08x}-0000-4000-8000-{i:012x}"


def cid(i: int, k: int) -> str:
    return f"{i:060x}{k:04x}"


def make_pods(base: Path, pods: int) -> tuple[dict, list[Path]]:
    items, containers = [], []
    for i in range(pods):
        pod = base / "kubepods.slice/kubepods-burstable.slice" / f"kubepods-burstable-pod{uid(i).replace('-', '_')}.slice"
        statuses = []
        for k, name in enumerate(("server", "sidecar")):
            folder = pod / f"cri-containerd-{cid(i, k)}.scope"
            folder.mkdir(parents=True)
            containers.append(folder)
            statuses.append({"name": name, "containerID": f"containerd://{cid(i, k)}"})
        items.append({"metadata": {"name": f"model-{i}", "namespace": "serving" if i % 2 == 0 else "batch",
                                   "uid": uid(i)}, "status": {"containerStatuses": statuses}})
    return {"kind": "PodList", "apiVersion": "v1", "items": items}, containers


def remove(base: Path) -> None:
    for folder in sorted((p for p in [base, *base.rglob("*")] if p.is_dir()), key=lambda p: -len(p.parts)):
        try:
            folder.rmdir()
        except OSError:
            pass


def serve(body: bytes) -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/pods"


def timed(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def user_space(base: Path, url: str, pods: int, rounds: int) -> list[str]:
    tree = CgroupTree(str(base.parent), refresh_s=0)
    tree.scan()
    walk = timed(tree.scan, rounds)
    resolver = CgroupResolver(tree, KubeletPods(url, Health(), token_file=None))
    resolver.refresh()
    section = CgroupSection("probec_cgroups", 62, (CgroupMatchInfo(0, "namespace", "serving"),
                                                   CgroupMatchInfo(1, "container", "sidecar")))
    cmap = CgroupMap(section, resolver)
    marks = timed(cmap.wanted, rounds)
    ids = [cgroup_id(str(f)) for f in sorted(base.rglob("cri-containerd-*.scope"))]
    labels = tuple(Label(n, "int", n, ()) for n in ("pod", "namespace", "container"))
    meta = MetricInfo("calls_total", MetricKind.COUNTER, "", "", 1.0, labels, (), None, "m", 100_000, None, None)
    store = MetricStore(Manifest(3, "b", "b.yaml", "", "core", {}, (), (), (meta,), (), (), {}), cgroups=resolver)
    series = {(i, i, i): n for n, i in enumerate(ids)}
    store.replace("calls_total", dict(series))        # the first read resolves; later ones hit the cache
    resolve = timed(lambda: store.replace("calls_total", dict(series)), rounds)
    return [f"| walk the cgroup folders ({len(tree.paths):,} cgroups) | {walk * 1e3:.2f} ms |",
            f"| mark the cgroups of 2 comparisons ({len(cmap.wanted()):,} marked) | {marks * 1e3:.2f} ms |",
            f"| show {len(series):,} series as pod, namespace, container | {resolve * 1e3:.2f} ms |"]


def kernel(folder: Path, url: str, calls: int, rounds: int) -> list[str]:
    argv = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(folder),
            str(C.WORKLOADS / "pwork"), "--comm", "podbench", "getpid", str(calls)]
    rows, base_ns = [], None
    bare = [C.time_workload(argv)[0] / calls for _ in range(rounds)]
    rows.append(f"| no probe | {statistics.median(bare):,.0f} | - |")
    specs = C.build_dir() / "containers"
    specs.mkdir(exist_ok=True)
    for i, (name, backend, filt, labels, path) in enumerate(VARIANTS):
        spec = specs / f"variant{i}.yaml"        # one place per variant: its bundle is cached
        spec.write_text(COUNT.replace("FILTER", filt).replace("LABELS", labels))
        bundle = C.build_bundle(spec, backend)
        run = C.ProbecRun(bundle, interval=1.0)
        run.cmd += ["--kubelet", url] + (["--cgroup", str(folder.parent)] if path else [])
        with run:
            C.settle(1.5)
            per = [C.time_workload(argv)[0] / calls for _ in range(rounds)]
        med = statistics.median(per)
        if name.endswith(": count"):
            base_ns = med
        rows.append(f"| {name} | {med:,.0f} | {med - statistics.median(bare):+,.0f} (vs its count: "
                    f"{med - base_ns:+,.0f}) |")
    return rows


def main() -> None:
    quick = C.quick_flag()
    C.require_root()
    C.check_lock()
    C.ensure_workloads()
    pods, rounds, calls = (20, 3, 20_000) if quick else (300, 20, 1_000_000)
    base = Path(cgroup2_root()) / f"probec-bench-{os.getpid()}" / "node"
    try:
        doc, containers = make_pods(base, pods)
        server, url = serve(json.dumps(doc).encode())
        lines = C.header("Containers and pods: what labels and filters by cgroup cost", "containers.py", quick)
        lines += ["", f"## At every read (user space), {pods} pods of 2 containers", "", "| step | median |",
                  "| --- | --- |"]
        lines += user_space(base, url, pods, rounds)
        lines += ["", f"## Per event (kernel), `pwork getpid {calls:,}` in a serving pod's container, "
                  f"median of {min(rounds, 5)} runs", "", "| variant | ns per getpid | added |", "| --- | --- | --- |"]
        lines += kernel(containers[0], url, calls, min(rounds, 5))
        server.shutdown()
    finally:
        remove(base.parent)
    C.write_result("containers", lines, quick)


if __name__ == "__main__":
    main()
