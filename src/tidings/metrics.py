"""Prometheus metrics behind a small interface; one registry per server instance.

A single process renders its own registry, with the client library's ``process_*`` and
``python_*`` collectors. Under ``tidings serve --workers N`` every worker writes its
``tidings_*`` values to files shared with the others, so that a scrape answered by any
worker describes the whole server; ``tidings.worker_metrics`` keeps those files and
answers such scrapes.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from tidings import __version__
from tidings.worker_metrics import (
    GcCounters,
    forget_process,
    leave_metrics,
    record_process,
    render_server,
)

# The process records are re-exported: ``tidings.workers`` reaches them through here.
__all__ = ["Metrics", "forget_process", "leave_metrics", "record_process"]

#: Seconds buckets of the publish latency: a Redis round trip or several, up to a timeout.
PUBLISH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
#: Seconds buckets of one event's fan-out to this node's subscribers: microseconds for a
#: few, milliseconds for tens of thousands.
FANOUT_BUCKETS = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
)


class Metrics:
    """The server's metrics. Labels are bounded sets: event types, codes, command names,
    worker indexes; never a user, a channel, a token or a URL.

    ``multiprocess_dir`` selects the workers' shared mode (see the module docstring); the
    process must then have been started with ``PROMETHEUS_MULTIPROC_DIR`` set to it.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, *, multiprocess_dir: str | None = None) -> None:
        self._dir = multiprocess_dir
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        if multiprocess_dir is None:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self.connections = Gauge(
            "tidings_connections",
            "Open client connections (WebSocket and SSE)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.subscriptions = Gauge(
            "tidings_subscriptions",
            "Active channel subscriptions on this server",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.broker_up = Gauge(
            "tidings_broker_up",
            "1 while the broker answers (every worker's, under --workers), else 0",
            registry=r,
            multiprocess_mode="livemin",
        )
        build = Gauge(
            "tidings_build_info",
            "The running Tidings version (value 1)",
            ["version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        build.labels(__version__).set(1)
        self._published = Counter(
            "tidings_events_published", "Events published", ["type"], registry=r
        )
        self._delivered = Counter(
            "tidings_events_delivered", "Event deliveries to connections", ["type"], registry=r
        )
        self._errors = Counter("tidings_errors", "Error messages sent", ["code"], registry=r)
        self._closes = Counter("tidings_closes", "Connections closed", ["code"], registry=r)
        self.webhooks_dropped = Counter(
            "tidings_webhooks_dropped",
            "Presence webhook events dropped (queue_full, "
            "attempts: retries exhausted, rejected: a 4xx answer)",
            ["reason"],
            registry=r,
        )
        self.slow_consumer_closes = Counter(
            "tidings_slow_consumer_closes", "Connections closed for reading too slowly", registry=r
        )
        self.request_head_timeouts = Counter(
            "tidings_request_head_timeouts",
            "Connections closed because a request head was not complete within "
            "server.handshake_timeout",
            registry=r,
        )
        self._latency = Histogram(
            "tidings_command_seconds",
            "Time to handle a client command",
            ["command"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self._publish_seconds = Histogram(
            "tidings_publish_seconds",
            "Time from a publish or batch request to the broker's acknowledgement",
            buckets=PUBLISH_BUCKETS,
            registry=r,
        )
        self._fanout_seconds = Histogram(
            "tidings_fanout_seconds",
            "Time from an event's arrival from the broker to its frame written to every "
            "subscriber on this server",
            buckets=FANOUT_BUCKETS,
            registry=r,
        )
        self.handshakes = Counter(
            "tidings_handshakes", "WebSocket handshakes by outcome", ["outcome"], registry=r
        )
        # The two frequent outcomes, resolved once (a labels() lookup takes a lock).
        self.handshake_ok = self.handshakes.labels("ok")
        self.handshake_unauthorized = self.handshakes.labels("unauthorized")
        self.fanned_out = self._fanout_seconds.observe
        self._gc = GcCounters(r) if multiprocess_dir is not None else None
        self.sync()  # the shared series exist from the start, not from the first period

    def bind_counts(
        self, connections: Callable[[], int], subscriptions: Callable[[], int]
    ) -> Callable[[], None]:
        """Report the two gauges from these functions; returns what to call after either
        count changed.

        A single process reads them at scrape time and the returned callable does
        nothing: the hot path pays no gauge update. Workers must write every change, as
        a scrape may be answered by another worker.
        """
        if self._dir is None:
            self.connections.set_function(connections)
            self.subscriptions.set_function(subscriptions)
            return _nothing
        set_connections, set_subscriptions = self.connections.set, self.subscriptions.set

        def changed() -> None:
            set_connections(connections())
            set_subscriptions(subscriptions())

        changed()
        return changed

    def published(self, event_type: str, count: int = 1) -> None:
        self._published.labels(event_type).inc(count)

    def delivered(self, event_type: str, count: int) -> None:
        self._delivered.labels(event_type).inc(count)

    def error(self, code: str) -> None:
        self._errors.labels(code).inc()

    def closed(self, code: int) -> None:
        self._closes.labels(str(code)).inc()

    def command(self, name: str, seconds: float) -> None:
        self._latency.labels(name).observe(seconds)

    def publish_acknowledged(self, seconds: float) -> None:
        self._publish_seconds.observe(seconds)

    def sync(self) -> None:
        """Periodic upkeep (the gateway calls it every few seconds): a worker copies its
        garbage collector's statistics into the shared files."""
        if self._gc is not None:
            self._gc.sync()

    def render(self) -> bytes:
        if self._dir is None:
            return generate_latest(self.registry)
        return render_server(self._dir)


def _nothing() -> None:
    pass
