"""The options of running a bundle, shared by `probec run` and a bundle's own loader.py.
Imports nothing heavy, so `probec check` does not pay for them."""

from __future__ import annotations

import argparse


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=9435, help="metrics port (0: no HTTP server)")
    p.add_argument("--address", default="127.0.0.1", help="metrics address (default 127.0.0.1)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between map reads")
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0: until signalled)")
    p.add_argument("--events", metavar="FILE", default=None,
                   help="where sampled events go as JSON lines (default: standard output, or nowhere with --otlp)")
    p.add_argument("--otlp", metavar="URL",
                   help="also send the metrics, and each sampled event as a span, over OTLP/HTTP to URL (a "
                        "collector's base URL, e.g. http://127.0.0.1:4318); needs the 'otlp' extra")
    p.add_argument("--otlp-interval", type=float, default=10.0, metavar="SECONDS",
                   help="seconds between OTLP metric exports (default 10; and once more at the end)")
    p.add_argument("--window", type=float, default=60.0, help="seconds of history for live quantiles")
    p.add_argument("--show", action="store_true", help="print live histograms and p50/p95/p99")
    p.add_argument("--pid", type=int, default=-1, help="trace this process only (its exit is logged and counted)")
    p.add_argument("--pid-file", metavar="FILE",
                   help="trace only the process whose id FILE holds, re-read at every interval: when a new "
                        "process id appears there (a restarted service), the probes follow it")
    p.add_argument("--snapshot", metavar="FILE", help="write the final metrics text here on exit")
    p.add_argument("--btf", metavar="FILE",
                   help="core: resolve CO-RE relocations against this BTF instead of /sys/kernel/btf/vmlinux "
                        "(hosts without kernel BTF; cut one for the bundle with 'probec btf')")
    p.add_argument("--bpf-stats", action="store_true",
                   help="core: turn on the kernel's BPF run-time stats while running (per-probe run time and count)")
