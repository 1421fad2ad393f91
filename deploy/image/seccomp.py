#!/usr/bin/env python3
"""Print a container runtime's default seccomp profile with bpf() allowed to CAP_BPF and
perf_event_open() to CAP_PERFMON, instead of to CAP_SYS_ADMIN only.

The default profiles of containers-common (podman, CRI-O) and of older containerd and Docker let
these two system calls through only for CAP_SYS_ADMIN: a collector with CAP_BPF and CAP_PERFMON
alone gets EPERM from its first bpf() call under them. Everything else stays as in the default.

    deploy/image/seccomp.py [/usr/share/containers/seccomp.json] > probec-seccomp.json
"""

import json
import sys

CALLS = {"bpf": "CAP_BPF", "perf_event_open": "CAP_PERFMON"}


def widened(profile: dict) -> dict:
    for rule in profile["syscalls"]:
        rule["names"] = [n for n in rule["names"] if n not in CALLS]
    profile["syscalls"] = [r for r in profile["syscalls"] if r["names"]]
    for call, cap in CALLS.items():
        for needs in (cap, "CAP_SYS_ADMIN"):
            profile["syscalls"].append({"names": [call], "action": "SCMP_ACT_ALLOW", "args": [],
                                        "includes": {"caps": [needs]}, "excludes": {}})
    return profile


if __name__ == "__main__":
    source = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/containers/seccomp.json"
    with open(source) as f:
        json.dump(widened(json.load(f)), sys.stdout, indent=1)
        print()
