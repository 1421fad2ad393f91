"""Containers and pods at read time: the kernel side labels and filters by the task's cgroup id
only; here those ids become container ids, pod uids and the kubelet's names, and the cgroup map
the kernel tests (`namespace == "serving"`, `--cgroup PATH`) is kept filled.

Everything is cached: the cgroup folders are walked again when an unknown id turns up (at most
once a second) and every `refresh_s`; the kubelet's pod list is fetched every `refresh_s`, and
sooner when a cgroup names a pod or container it does not list yet. A cgroup that is gone keeps
its series for `grace_s`, then they are dropped (and, with the core backend, deleted from the
kernel's maps), so pods that come and go do not pile up series.
"""

from __future__ import annotations

import ctypes
import os
import time

from ..host.containers import CgroupTree, PodList, fetch_pod_list, parse_cgroup_path
from .manifest import CgroupSection, Label, Manifest

CGROUP_LABELS = ("cgroup_id", "container_id", "pod_uid", "pod", "namespace", "container")
NAMED = ("pod", "namespace", "container")            # need the kubelet's pod list
DEFAULT_GRACE_S = 300.0
DEFAULT_REFRESH_S = 10.0
MIN_KUBELET_FETCH_S = 2.0     # a pod the list lacks fetches it again, at most this often
TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"


def cgroup_labels(labels) -> list[tuple[int, str]]:
    """(index, attribute) of the labels (or event fields) shown from a cgroup id."""
    return [(i, lab.render) for i, lab in enumerate(labels) if lab.render in CGROUP_LABELS]


def uses_cgroups(manifest: Manifest) -> bool:
    return any(cgroup_labels(m.labels) for m in manifest.metrics) or any(p.container for p in manifest.probes) or \
        any(cgroup_labels(e.fields) for e in manifest.events) or \
        bool(manifest.cgroups and manifest.cgroups.matches)


def uses_kubelet(manifest: Manifest) -> bool:
    attrs = {a for m in manifest.metrics for _, a in cgroup_labels(m.labels)}
    attrs |= {a for e in manifest.events for _, a in cgroup_labels(e.fields)}
    attrs |= {m.attribute for m in (manifest.cgroups.matches if manifest.cgroups else ())}
    return bool(attrs & set(NAMED)) or any(p.container for p in manifest.probes)


class KubeletPods:
    """The node's kubelet pod list (read-only), cached, with its health."""

    def __init__(self, url: str, health, log=print, refresh_s: float = DEFAULT_REFRESH_S, clock=time.monotonic,
                 token_file: str | None = TOKEN_FILE):
        self.url = url
        self.health = health
        self.log = log
        self.refresh_s = refresh_s
        self.clock = clock
        self.token_file = token_file
        self.pods = PodList()
        self.fetched_at = float("-inf")
        self.tried_at = float("-inf")
        self.failing: str | None = None
        health.kubelet_up = 0

    def token(self) -> str | None:
        if not self.token_file or not self.url.startswith("https:"):
            return None
        try:
            with open(self.token_file) as f:
                return f.read().strip() or None
        except OSError:
            return None

    def fetch(self) -> None:
        self.tried_at = self.clock()
        try:
            pods = fetch_pod_list(self.url, token=self.token())
        except (OSError, ValueError) as exc:
            self.health.kubelet_up = 0
            self.health.kubelet_errors += 1
            reason = str(getattr(exc, "reason", "") or exc)
            if self.failing is None:
                self.log(f"warning: cannot read the kubelet's pod list at {self.url} ({reason}); pod, namespace "
                         "and container labels stay empty and filters on them match nothing new until it answers "
                         "(probec_kubelet_up is 0, probec_kubelet_errors_total counts the failures)")
            self.failing = reason
            return
        self.pods, self.fetched_at = pods, self.tried_at
        self.health.kubelet_up = 1
        if self.failing is not None:
            self.log(f"the kubelet's pod list at {self.url} answers again ({len(pods.pods)} pods)")
            self.failing = None

    def refresh(self, missing: bool = False) -> None:
        """Fetch when the list is older than refresh_s, or (missing: a cgroup names a pod the list
        lacks) when the last try is older than MIN_KUBELET_FETCH_S."""
        now = self.clock()
        if now - self.tried_at >= self.refresh_s or (missing and now - self.tried_at >= MIN_KUBELET_FETCH_S):
            self.fetch()


class CgroupResolver:
    """cgroup id -> what a label or a filter says of it."""

    def __init__(self, tree: CgroupTree, kubelet: KubeletPods | None = None, grace_s: float = DEFAULT_GRACE_S,
                 clock=time.monotonic):
        self.tree = tree
        self.kubelet = kubelet
        self.grace_s = grace_s
        self.clock = clock
        self.gone_since: dict[int, float] = {}
        # What was found for each cgroup, kept while it is gone (its series keep their labels for
        # the grace period): a container's id, pod and names never change. Empty answers (a pod
        # the kubelet does not list yet) are not kept.
        self.known: dict[tuple[str, int], str] = {}
        self.last_path: dict[int, str] = {}

    def refresh(self) -> None:
        """Once per read: walk the cgroups again if due, note which ids are gone, refresh pods."""
        self.tree.refresh()
        if self.kubelet is not None:
            self.kubelet.refresh()

    def attribute(self, attribute: str, cgid: int, fetch: bool = True):
        """What `attribute` of the cgroup `cgid` is ("" where unknown). fetch=False never asks the
        kubelet (the event reader must not wait on it: the ring buffer would fill meanwhile)."""
        if attribute == "cgroup_id":
            return cgid
        found = self.known.get((attribute, cgid))
        if found is None:
            found = self.find(attribute, cgid, fetch)
            if found:
                self.known[(attribute, cgid)] = found
        return found

    def find(self, attribute: str, cgid: int, fetch: bool = True) -> str:
        path = self.tree.path(cgid) or self.last_path.get(cgid)
        if path is None:
            return ""
        self.last_path[cgid] = path
        ref = parse_cgroup_path(path)
        if attribute == "container_id":
            return ref.container_id
        if attribute == "pod_uid":
            return ref.pod_uid
        if self.kubelet is None or not (ref.pod_uid or ref.container_id):
            return ""
        pods = self.kubelet.pods
        if fetch and ((ref.pod_uid and ref.pod_uid not in pods.pods) or
                      (attribute == "container" and ref.container_id and ref.container_id not in pods.containers)):
            self.kubelet.refresh(missing=True)
            pods = self.kubelet.pods
        if attribute == "container":
            return pods.containers.get(ref.container_id, ("", ""))[1]
        pod = pods.pods.get(ref.pod_uid)
        if pod is None:
            return ""
        return pod.name if attribute == "pod" else pod.namespace

    def expired(self, cgid: int) -> bool:
        """Gone (its folder removed) for longer than the grace period."""
        if not self.tree.root or cgid in self.tree.paths:
            self.gone_since.pop(cgid, None)
            return False
        if self.tree.path(cgid) is not None:      # created since the last walk
            return False
        since = self.gone_since.setdefault(cgid, self.clock())
        if self.clock() - since < self.grace_s:
            return False
        self.last_path.pop(cgid, None)
        for attribute in CGROUP_LABELS:
            self.known.pop((attribute, cgid), None)
        return True

    def matching(self, attribute: str, value: str) -> set[int]:
        """Ids of the cgroups whose `attribute` is `value` (a short container id matches as a prefix)."""
        out = set()
        for cgid in list(self.tree.paths):
            got = self.attribute(attribute, cgid)
            if got == value or (attribute == "container_id" and got and got.startswith(value)):
                out.add(cgid)
        return out


def resolve_series(series: dict, labels: tuple[Label, ...], resolver: CgroupResolver, merge) -> tuple[dict, set]:
    """Series keyed by cgroup ids -> keyed by what the labels show; series of cgroups gone for
    longer than the grace period are left out and returned apart (their raw keys)."""
    where = cgroup_labels(labels)
    out: dict = {}
    expired = set()
    for key, value in series.items():
        if any(isinstance(key[i], str) for i, _ in where):     # __overflow__: no cgroup id
            shown = key
        elif any(resolver.expired(key[i]) for i, _ in where):
            expired.add(key)
            continue
        else:
            shown = list(key)
            for i, attribute in where:
                shown[i] = resolver.attribute(attribute, key[i])
            shown = tuple(shown)
        out[shown] = merge([out[shown], value]) if shown in out else value
    return out, expired


class CgroupMap:
    """Keeps the kernel's cgroup map (cgroup id -> bits) as the spec's comparisons and --cgroup
    say: bit i for the i-th comparison, `path_bit` for the cgroups under --cgroup PATH. The
    runner supplies `update(id, bits)` and `delete(id)`."""

    def __init__(self, section: CgroupSection, resolver: CgroupResolver, path: str | None = None):
        self.section = section
        self.resolver = resolver
        self.path = path
        self.written: dict[int, int] = {}

    def wanted(self) -> dict[int, int]:
        self.resolver.tree.refresh()
        bits: dict[int, int] = {}
        for m in self.section.matches:
            for cgid in self.resolver.matching(m.attribute, m.value):
                bits[cgid] = bits.get(cgid, 0) | (1 << m.bit)
        if self.path is not None:
            for cgid in self.resolver.tree.under(self.path):
                bits[cgid] = bits.get(cgid, 0) | (1 << self.section.path_bit)
        return bits

    def sync(self, update, delete) -> int:
        """Write what changed; returns the number of entries written or deleted."""
        want = self.wanted()
        changes = 0
        for cgid, bits in want.items():
            if self.written.get(cgid) != bits:
                update(cgid, bits)
                changes += 1
        for cgid in [c for c in self.written if c not in want]:
            delete(cgid)
            changes += 1
        self.written = want
        return changes


# --- a map inside another process (bpftrace's) --------------------------------------------------
SYS_PIDFD_OPEN, SYS_PIDFD_GETFD, SYS_BPF = 434, 438, 321
BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_OBJ_GET_INFO_BY_FD = 2, 3, 15


class _MapElem(ctypes.Structure):       # union bpf_attr, map element commands
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _InfoByFd(ctypes.Structure):      # union bpf_attr, BPF_OBJ_GET_INFO_BY_FD
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _MapInfo(ctypes.Structure):       # struct bpf_map_info, the leading fields
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr) -> int:
    ret = _libc.syscall(SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


class ForeignMap:
    """A BPF map of another process (bpftrace's), by the name the kernel knows it by, through a
    copy of that process's file descriptor (pidfd_getfd: needs the right to ptrace it)."""

    def __init__(self, pid: int, name: str):
        self.fd = -1
        pidfd = _libc.syscall(SYS_PIDFD_OPEN, pid, 0)
        if pidfd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_open({pid}): {os.strerror(err)}")
        try:
            for entry in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{entry}") != "anon_inode:bpf-map":
                        continue
                except OSError:
                    continue
                fd = _libc.syscall(SYS_PIDFD_GETFD, pidfd, int(entry), 0)
                if fd < 0:
                    continue
                info = _MapInfo()
                attr = _InfoByFd(fd, ctypes.sizeof(info), ctypes.addressof(info))
                try:
                    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
                except OSError:
                    os.close(fd)
                    continue
                if info.name.decode(errors="replace") == name and info.key_size == 8 and info.value_size == 8:
                    self.fd = fd
                    break
                os.close(fd)
        finally:
            os.close(pidfd)
        if self.fd < 0:
            raise OSError(f"process {pid} has no BPF map named '{name}'")

    def update(self, key: int, value: int) -> None:
        k, v = ctypes.c_uint64(key), ctypes.c_uint64(value)
        _bpf(BPF_MAP_UPDATE_ELEM, _MapElem(self.fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0))

    def delete(self, key: int) -> None:
        k = ctypes.c_uint64(key)
        try:
            _bpf(BPF_MAP_DELETE_ELEM, _MapElem(self.fd, 0, ctypes.addressof(k), 0, 0))
        except FileNotFoundError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def bpftrace_map_name(script_name: str) -> str:
    """The name the kernel knows a bpftrace map by: `AT_` and the name without its `@`, cut to
    BPF_OBJ_NAME_LEN - 1 (bpftrace 0.17)."""
    return ("AT_" + script_name.lstrip("@"))[:15]
