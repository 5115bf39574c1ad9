"""A discarding OTLP/HTTP trace receiver for ``tidings bench --otel``.

The servers under test export their spans here over OTLP/HTTP, as they would to a
collector, so that the figures include recording, batching, encoding and sending them;
the receiver counts the requests and bytes and keeps nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Sink", "otlp_sink"]


@dataclass(slots=True)
class Sink:
    """Where the sink listens, and what it received so far."""

    endpoint: str
    requests: int = 0
    bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def env(self) -> dict[str, str]:
        """The ``OTEL_*`` variables that make a Tidings server trace to this sink."""
        return {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{self.endpoint}/v1/traces",
            "OTEL_SERVICE_NAME": "tidings-bench",
        }

    def received(self, size: int) -> None:
        with self._lock:
            self.requests += 1
            self.bytes += size

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {"endpoint": self.endpoint, "requests": self.requests, "bytes": self.bytes}


@contextmanager
def otlp_sink() -> Iterator[Sink]:
    """An OTLP/HTTP receiver on 127.0.0.1 (a thread of this process) until the block ends."""
    sink: Sink | None = None

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            size = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(size)
            if sink is not None:
                sink.received(size)
            # An empty ExportTraceServiceResponse: everything accepted.
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: one line per export would flood the bench's output."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    sink = Sink(f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, name="otlp-sink", daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
