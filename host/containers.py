"""Which container and pod a task runs in, from facts of this host: the cgroup v2 hierarchy (a
task's cgroup id is the inode number of its cgroup's folder there), the path shapes container
runtimes give those folders, and the node's kubelet pod list (names by pod uid and container id).
Also a file as a container sees it: `/proc/PID/root/PATH`.

The kernel side of probec only ever sees the cgroup id (`bpf_get_current_cgroup_id()`, bpftrace's
`cgroup`); everything here runs in user space, at read time, and is cached.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import time
import urllib.request
from dataclasses import dataclass, field

MOUNTINFO = "/proc/self/mountinfo"
CGROUP2_ROOTS = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")   # hybrid mode first, then unified

# What container runtimes name a container's cgroup folder: a 64-hex-digit container id inside
# `cri-containerd-ID.scope`, `crio-ID.scope`, `docker-ID.scope` (the systemd driver), or the bare
# id (the cgroupfs driver: kubepods/burstable/podUID/ID, docker/ID). `crio-conmon-ID.scope` is
# CRI-O's monitor process, not the container.
CONTAINER_FOLDER = re.compile(r"^(?:(?:cri-containerd|crio|docker|containerd|libpod)-)?([0-9a-f]{64})(?:\.scope)?$")
# A pod's folder: `kubepods-burstable-pod<UID>.slice` (systemd: '-' in the uid written '_') or
# `pod<UID>` (cgroupfs).
POD_FOLDER = re.compile(r"^(?:kubepods(?:-[a-z]+)*-)?pod([0-9a-fA-F]{8}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_]"
                        r"[0-9a-fA-F]{4}[-_][0-9a-fA-F]{12})(?:\.slice)?$")
# Kubernetes names: namespaces and container names are DNS labels, pod names DNS subdomains.
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
POD_UID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
CONTAINER_ID = re.compile(r"^[0-9a-f]{1,64}$")

# The names a spec may use, what each one is, and what a literal compared with it must look like.
CGROUP_ATTRIBUTES = {
    "cgroup_id": "a cgroup id",
    "container_id": "a container id",
    "pod_uid": "a pod uid",
    "pod": "a pod name",
    "namespace": "a namespace",
    "container": "a container name",
}
ATTRIBUTE_SHAPES = {
    "container_id": (CONTAINER_ID, "a container id is lowercase hex, 64 digits (a prefix of one matches nothing)"),
    "pod_uid": (POD_UID, "a pod uid is a UUID in lowercase: 8-4-4-4-12 hex digits"),
    "pod": (DNS_SUBDOMAIN, "a pod name is a DNS subdomain: lowercase letters, digits, '-' and '.'"),
    "namespace": (DNS_LABEL, "a namespace is a DNS label: lowercase letters, digits and '-', at most 63"),
    "container": (DNS_LABEL, "a container name is a DNS label: lowercase letters, digits and '-', at most 63"),
}


def literal_problem(attribute: str, text: str) -> str:
    """Why `text` can never be a value of `attribute` ("" when it can)."""
    shape = ATTRIBUTE_SHAPES.get(attribute)
    if shape is None or shape[0].match(text):
        return ""
    if attribute == "container_id" and len(text) < 64 and CONTAINER_ID.match(text):
        return ""      # a short id: matched as a prefix of the full one
    return shape[1]


def cgroup2_root(mountinfo: str = MOUNTINFO) -> str | None:
    """Where the cgroup v2 hierarchy is mounted (hybrid hosts: /sys/fs/cgroup/unified)."""
    try:
        with open(mountinfo) as f:
            for line in f:
                pre, _, post = line.partition(" - ")
                if post.split(" ", 1)[0] == "cgroup2":
                    return pre.split(" ")[4].replace("\\040", " ")
    except OSError:
        pass
    for root in CGROUP2_ROOTS:
        if os.path.exists(os.path.join(root, "cgroup.controllers")):
            return root
    return None


def cgroup_id(path: str) -> int:
    """The id the kernel gives a cgroup v2 folder (bpf_get_current_cgroup_id): its inode number."""
    return os.stat(path).st_ino


@dataclass(frozen=True)
class ContainerRef:
    """What a cgroup's path says: the container id and pod uid ("" where the path has none)."""
    container_id: str = ""
    pod_uid: str = ""


def parse_cgroup_path(path: str) -> ContainerRef:
    """The container and pod of a cgroup path, for containerd, CRI-O and Docker under the
    systemd or cgroupfs driver. The innermost container folder wins (a nested one is the task's)."""
    container, pod = "", ""
    for part in path.strip("/").split("/"):
        m = POD_FOLDER.match(part)
        if m:
            pod = m.group(1).replace("_", "-").lower()
            continue
        m = CONTAINER_FOLDER.match(part)
        if m and not part.startswith("crio-conmon-"):
            container = m.group(1)
    return ContainerRef(container, pod)


@dataclass(frozen=True)
class PodEntry:
    uid: str
    name: str
    namespace: str


@dataclass
class PodList:
    """The kubelet's /pods, indexed: pods by uid, container names by container id."""
    pods: dict[str, PodEntry] = field(default_factory=dict)
    containers: dict[str, tuple[str, str]] = field(default_factory=dict)   # container id -> (pod uid, name)


def parse_pod_list(data: bytes | str) -> PodList:
    """A kubelet /pods answer (a v1 PodList). Raises ValueError for anything else."""
    doc = json.loads(data)
    if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
        raise ValueError("not a PodList: no 'items' list")
    out = PodList()
    for item in doc["items"]:
        meta = item.get("metadata") or {} if isinstance(item, dict) else {}
        uid = str(meta.get("uid") or "")
        if not uid:
            continue
        out.pods[uid] = PodEntry(uid, str(meta.get("name") or ""), str(meta.get("namespace") or ""))
        status = item.get("status") or {}
        for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
            for c in status.get(key) or ():
                cid = str(c.get("containerID") or "")
                if "://" in cid:       # containerd://ID, cri-o://ID, docker://ID
                    out.containers[cid.split("://", 1)[1]] = (uid, str(c.get("name") or ""))
    return out


SERVICE_ACCOUNT_CA = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"


def fetch_pod_list(url: str, timeout: float = 2.0, token: str | None = None) -> PodList:
    """GET the kubelet's pod list (read-only). Over https the kubelet's certificate is checked
    against the service account's CA where there is one (a kubelet serving certificate signed by
    the cluster), else the system's. Raises OSError or ValueError when it cannot."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    context = None
    if url.startswith("https:") and os.path.exists(SERVICE_ACCOUNT_CA):
        context = ssl.create_default_context(cafile=SERVICE_ACCOUNT_CA)
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:   # noqa: S310 (the operator's URL)
        return parse_pod_list(response.read(16 << 20))


class CgroupTree:
    """cgroup ids -> paths under the cgroup v2 root, found by walking its folders. Walked again on
    a miss (at most once per `min_rescan_s`) and at least every `refresh_s`, so new cgroups are
    found and removed ones noticed."""

    def __init__(self, root: str | None = None, refresh_s: float = 10.0, min_rescan_s: float = 1.0,
                 clock=time.monotonic):
        self.root = root if root is not None else cgroup2_root()
        self.refresh_s = refresh_s
        self.min_rescan_s = min_rescan_s
        self.clock = clock
        self.paths: dict[int, str] = {}
        self.scanned_at = float("-inf")
        self.scans = 0

    def scan(self) -> None:
        paths: dict[int, str] = {}
        if self.root:
            stack = [(self.root, "/")]
            while stack:
                folder, rel = stack.pop()
                try:
                    st = os.stat(folder)
                    entries = list(os.scandir(folder))
                except OSError:
                    continue            # removed while walking
                paths[st.st_ino] = rel
                for e in entries:
                    if e.is_dir(follow_symlinks=False):
                        stack.append((e.path, rel.rstrip("/") + "/" + e.name))
        self.paths = paths
        self.scanned_at = self.clock()
        self.scans += 1

    def refresh(self) -> None:
        if self.clock() - self.scanned_at >= self.refresh_s:
            self.scan()

    def path(self, cgid: int) -> str | None:
        found = self.paths.get(cgid)
        if found is None and self.clock() - self.scanned_at >= self.min_rescan_s:
            self.scan()
            found = self.paths.get(cgid)
        return found

    def exists(self, cgid: int) -> bool:
        return cgid in self.paths

    def under(self, path: str) -> set[int]:
        """Ids of the cgroup at `path` (absolute, or relative to the root) and every one below it."""
        rel = os.path.relpath(path, self.root) if os.path.isabs(path) else path
        rel = "/" + rel.strip("/") if rel not in (".", "/") else "/"
        return {i for i, p in self.paths.items() if p == rel or rel == "/" or p.startswith(rel.rstrip("/") + "/")}


def in_container_root(pid: int, path: str) -> str:
    """`path` as the process `pid` sees it, through /proc/PID/root: its mount namespace's file,
    which the kernel resolves to the inode that process maps."""
    return f"/proc/{pid}/root/{path.lstrip('/')}"


def resolve_in_root(pid: int, path: str) -> str:
    """`path` as process `pid` sees it, with its symlinks followed inside that process's root (an
    absolute link points into the container, not the host): `/proc/PID/root/REAL/PATH`. Raises
    OSError when the process or the file does not exist."""
    root = f"/proc/{pid}/root"
    if not os.path.exists(f"/proc/{pid}"):
        raise ProcessLookupError(3, f"process {pid} is not running")
    os.stat(root)                                   # we may look inside (PermissionError: not root)
    parts = [p for p in path.split("/") if p]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        here = root + "/" + "/".join(resolved + [part])
        if os.path.islink(here):
            hops += 1
            if hops > 40:
                raise OSError(40, f"too many levels of symbolic links in {path} (process {pid})")
            target = os.readlink(here)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        resolved.append(part)
    full = root + "/" + "/".join(resolved)
    if not os.path.isfile(full):
        raise FileNotFoundError(2, f"process {pid} has no file {path}")
    return full


def process_cgroup(pid: int) -> str | None:
    """The cgroup v2 path of a process (`0::/...` in /proc/PID/cgroup), None when it is gone."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        return None
    return None


def container_processes(name: str, pods: PodList) -> list[int]:
    """The processes running in containers named `name` (any pod), found from their cgroups."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        path = process_cgroup(int(entry))
        if not path:
            continue
        ref = parse_cgroup_path(path)
        if ref.container_id and pods.containers.get(ref.container_id, ("", ""))[1] == name:
            out.append(int(entry))
    return sorted(out)


def mapped_inode(pid: int, path: str) -> tuple[int, int] | None:
    """(device, inode) of the file the process maps at `path` as /proc/PID/maps says: the file a
    uprobe really sits in (overlayfs shows its lower file there, shared by every container of an
    image), or None when it is not mapped."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                fields = line.split(None, 5)
                if len(fields) == 6 and fields[5].rstrip("\n") == path:
                    major, minor = (int(x, 16) for x in fields[3].split(":"))
                    return os.makedev(major, minor), int(fields[4])
    except (OSError, ValueError):
        return None
    return None
