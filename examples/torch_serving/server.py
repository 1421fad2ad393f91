#!/usr/bin/env python3
"""A PyTorch CPU model served over HTTP on localhost: the demo's "model server".

POST /infer runs one forward pass of a 4-layer MLP (4 calls of at::_ops::linear::call per
request) and answers with the argmax. The process names itself `torch-server` so specs can
filter on comm; every handler thread inherits the name.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

PR_SET_NAME = 15


def set_comm(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


class Model(torch.nn.Module):
    def __init__(self, width: int, layers: int = 4):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, default=8085)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args()
    set_comm("torch-server")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Model(args.width).eval()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            batch = int(body.get("batch", 1))
            with lock, torch.inference_mode():
                out = model(torch.randn(batch, args.width))
            reply = json.dumps({"argmax": int(out[0].argmax())}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"READY {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
