"""An OTLP/HTTP receiver that a test starts on loopback: it takes POST /v1/metrics and /v1/traces
(protobuf), decodes each body with the official classes of opentelemetry-proto, and keeps what
arrived. `fail_with` makes it answer every request with that HTTP status instead (a receiver that
is down or overloaded)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (ExportMetricsServiceRequest,
                                                                          ExportMetricsServiceResponse)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                      ExportTraceServiceResponse)

MESSAGES = {"/v1/metrics": (ExportMetricsServiceRequest, ExportMetricsServiceResponse),
            "/v1/traces": (ExportTraceServiceRequest, ExportTraceServiceResponse)}


class OtlpReceiver:
    def __init__(self, fail_with: int | None = None, count_only: bool = False):
        self.fail_with = fail_with
        self.count_only = count_only          # benchmarks: count spans, keep no message
        self.metrics: list[ExportMetricsServiceRequest] = []
        self.traces: list[ExportTraceServiceRequest] = []
        self.span_count = 0
        self.requests = {"/v1/metrics": 0, "/v1/traces": 0}
        self.bad: list[str] = []              # requests that were not OTLP/HTTP protobuf
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"     # keep-alive, as exporters use it

            def log_message(self, format, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.take(self.path, self.headers.get("Content-Type", ""), body, self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def take(self, path: str, content_type: str, body: bytes, handler) -> None:
        with self.lock:
            self.requests[path] = self.requests.get(path, 0) + 1
        if self.fail_with is not None:
            return self.reply(handler, self.fail_with, b"")
        if path not in MESSAGES or content_type != "application/x-protobuf":
            self.bad.append(f"{path} {content_type}")
            return self.reply(handler, 404, b"")
        request_class, response_class = MESSAGES[path]
        request = request_class()
        try:
            request.ParseFromString(body)
        except Exception as exc:
            self.bad.append(f"{path}: {exc}")
            return self.reply(handler, 400, b"")
        with self.lock:
            if path == "/v1/traces":
                self.span_count += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
                if not self.count_only:
                    self.traces.append(request)
            else:
                self.metrics.append(request)
        self.reply(handler, 200, response_class().SerializeToString())

    @staticmethod
    def reply(handler, status: int, body: bytes) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/x-protobuf")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def spans(self) -> list:
        with self.lock:
            return [(rs, span) for request in self.traces for rs in request.resource_spans
                    for ss in rs.scope_spans for span in ss.spans]

    def last_metrics(self) -> dict:
        """The newest export: {name: Metric} (every export carries every metric, cumulative)."""
        with self.lock:
            if not self.metrics:
                return {}
            request = self.metrics[-1]
        return {m.name: m for rm in request.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def attributes(message) -> dict:
    """A message's `attributes` (KeyValue list) as {key: Python value}."""
    return {kv.key: any_value(kv.value) for kv in message.attributes}


def any_value(value):
    which = value.WhichOneof("value")
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    return getattr(value, which) if which else None
