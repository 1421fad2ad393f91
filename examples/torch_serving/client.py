#!/usr/bin/env python3
"""Sends a known number of inference requests, one at a time, with a known share of big batches
(the slow tail)."""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, default=8085)
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--seconds", type=float, default=0, help="keep going for this long instead")
    p.add_argument("--tail-every", type=int, default=20, help="every Nth request is a big batch")
    p.add_argument("--tail-batch", type=int, default=2048)
    args = p.parse_args()
    sent = 0
    deadline = time.monotonic() + args.seconds if args.seconds else None
    while (deadline and time.monotonic() < deadline) or (not deadline and sent < args.requests):
        batch = args.tail_batch if args.tail_every and (sent + 1) % args.tail_every == 0 else 8
        conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=30)
        conn.request("POST", "/infer", body=json.dumps({"batch": batch}), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        if resp.status != 200:
            print(f"request {sent} failed: {resp.status}", file=sys.stderr)
            return 1
        sent += 1
    print(f"SENT {sent}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
