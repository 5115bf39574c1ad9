"""Prometheus metrics behind a small interface; one registry per server instance."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["Metrics"]


class Metrics:
    """The server's counters. Labels are bounded sets: event types, codes, command names;
    never a user, a channel or a token."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge("tidings_connections", "Open WebSocket connections", registry=r)
        self.subscriptions = Gauge(
            "tidings_subscriptions", "Active channel subscriptions on this node", registry=r
        )
        self._published = Counter(
            "tidings_events_published", "Events published", ["type"], registry=r
        )
        self._delivered = Counter(
            "tidings_events_delivered", "Event deliveries to connections", ["type"], registry=r
        )
        self._errors = Counter("tidings_errors", "Error messages sent", ["code"], registry=r)
        self._closes = Counter("tidings_closes", "Connections closed", ["code"], registry=r)
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
        self.handshakes = Counter(
            "tidings_handshakes", "WebSocket handshakes by outcome", ["outcome"], registry=r
        )
        # The two frequent outcomes, resolved once (a labels() lookup takes a lock).
        self.handshake_ok = self.handshakes.labels("ok")
        self.handshake_unauthorized = self.handshakes.labels("unauthorized")

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

    def render(self) -> bytes:
        return generate_latest(self.registry)
