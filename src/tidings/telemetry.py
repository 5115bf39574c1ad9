"""OpenTelemetry traces behind a narrow interface (the ``otel`` extra).

A server span per server API request, a ``publish`` span around each broker publish, and
a ``deliver`` span per event per node, linked to its publish, whose span context travels
with the events as a W3C ``traceparent`` (``PublishRequest.trace``): in process with the
memory broker, in the pub/sub message with Redis. Only sampled publishes send one, and
only events that arrive with one get a ``deliver`` span: nothing per subscriber.

``Telemetry`` is the interface and does nothing (tracing off: no span, no import of
``opentelemetry``, one ``None`` check per event); ``Tracing`` records through a
``TracerProvider``; ``make_telemetry`` picks one from the resolved settings.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tidings import __version__
from tidings.brokers.base import PublishRequest, PublishResult
from tidings.config import Settings
from tidings.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Link

__all__ = ["Handler", "Publish", "Telemetry", "Tracing", "make_telemetry"]

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Publish = Callable[[Sequence[PublishRequest]], Awaitable[list[PublishResult]]]

#: Where installed span exporters register their names (``OTEL_TRACES_EXPORTER``'s).
_EXPORTERS = "opentelemetry_traces_exporter"


class Telemetry:
    """Tracing off: every call passes straight through."""

    enabled = False

    def api_route(self, route: str, handler: Handler) -> Handler:
        """``handler`` of the server API route ``route``, in a server span."""
        return handler

    async def publish(
        self, publish: Publish, requests: Sequence[PublishRequest]
    ) -> list[PublishResult]:
        """``publish(requests)`` in a ``publish`` span whose context, when sampled, every
        request carries as its ``trace``."""
        return await publish(requests)

    def deliver(self, channel: str, offset: int, trace: str, deliver: Callable[[], int]) -> None:
        """``deliver()``, which hands one event to the hub and returns how many local
        subscribers it has, in a ``deliver`` span linked to the span ``trace`` names."""
        deliver()

    async def close(self) -> None:
        """Export what is still buffered, then stop (once the server has stopped)."""


class Tracing(Telemetry):
    """Spans through ``provider``; ``owned``: ``close`` shuts the provider down."""

    enabled = True

    def __init__(self, provider: TracerProvider, *, owned: bool = False) -> None:
        # Imported here, not at the top: with tracing off nothing imports opentelemetry.
        from opentelemetry import propagate
        from opentelemetry.context import Context
        from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

        self._provider = provider
        self._owned = owned
        self._tracer = provider.get_tracer("tidings", __version__)
        self._extract = propagate.extract
        self._server, self._producer, self._consumer = (
            SpanKind.SERVER,
            SpanKind.PRODUCER,
            SpanKind.CONSUMER,
        )
        self._error = Status(StatusCode.ERROR)
        self._link, self._context, self._flags = Link, SpanContext, TraceFlags
        # Deliveries start traces of their own (linked, not parented): otherwise the one
        # made inside a memory-broker publish would become its child.
        self._root = Context()

    def api_route(self, route: str, handler: Handler) -> Handler:
        tracer, server, extract, error = self._tracer, self._server, self._extract, self._error

        @functools.wraps(handler)
        async def traced(request: web.Request) -> web.StreamResponse:
            # The method, the route and the path only: never a header (the API key), nor
            # the query string.
            attributes = {
                "http.request.method": request.method,
                "http.route": route,
                "url.path": request.path,
                "url.scheme": request.scheme,
            }
            with tracer.start_as_current_span(
                f"{request.method} {route}",
                context=extract(request.headers),
                kind=server,
                attributes=attributes,
            ) as span:
                response = await handler(request)
                span.set_attribute("http.response.status_code", response.status)
                if response.status >= 500:
                    span.set_status(error)
                return response

        return traced

    async def publish(
        self, publish: Publish, requests: Sequence[PublishRequest]
    ) -> list[PublishResult]:
        with self._tracer.start_as_current_span(
            "publish", kind=self._producer, attributes=_publish_attributes(requests)
        ) as span:
            context = span.get_span_context()
            if context.trace_flags.sampled:
                parent = f"00-{context.trace_id:032x}-{context.span_id:016x}-01"
                requests = [request._replace(trace=parent) for request in requests]
            results = await publish(requests)
            offsets = [result.offset for result in results]
            span.set_attributes(
                {"tidings.offset": offsets[0]}
                if len(offsets) == 1
                else {"tidings.offsets": offsets}
            )
            duplicates = sum(result.duplicate for result in results)
            if duplicates:
                span.set_attribute("tidings.duplicates", duplicates)
            return results

    def deliver(self, channel: str, offset: int, trace: str, deliver: Callable[[], int]) -> None:
        link = self._parse(trace)
        if link is None:
            deliver()
            return
        span = self._tracer.start_span(
            "deliver",
            context=self._root,
            kind=self._consumer,
            links=(link,),
            attributes={
                "messaging.system": "tidings",
                "messaging.operation.name": "deliver",
                "messaging.destination.name": channel,
                "tidings.offset": offset,
            },
        )
        try:
            span.set_attribute("tidings.subscribers", deliver())
        finally:
            span.end()

    def _parse(self, trace: str) -> Link | None:
        """A link to the span a ``traceparent`` names, or None when it is malformed."""
        try:
            _, trace_id, span_id, flags = trace.split("-")
            if len(trace_id) != 32 or len(span_id) != 16:
                return None
            context = self._context(
                int(trace_id, 16),
                int(span_id, 16),
                is_remote=True,
                trace_flags=self._flags(int(flags, 16)),
            )
        except ValueError:
            return None
        return self._link(context) if context.is_valid else None

    async def close(self) -> None:
        if self._owned:
            # Blocks while the last batch is exported: not on the event loop.
            await asyncio.to_thread(self._provider.shutdown)


def _publish_attributes(requests: Sequence[PublishRequest]) -> dict[str, Any]:
    """A publish span's attributes: one channel and type as such, several as lists."""
    attributes: dict[str, Any] = {
        "messaging.system": "tidings",
        "messaging.operation.name": "publish",
    }
    if len(requests) > 1:
        attributes["messaging.batch.message_count"] = len(requests)
    for one, many, values in (
        ("messaging.destination.name", "tidings.channels", [r.channel for r in requests]),
        ("tidings.event.type", "tidings.event.types", [r.type for r in requests]),
    ):
        unique = list(dict.fromkeys(values))
        attributes.update({one: unique[0]} if len(unique) == 1 else {many: unique})
    return attributes


def make_telemetry(settings: Settings) -> Telemetry:
    """``Tracing`` through the resolved ``telemetry.exporters`` when ``telemetry.tracing``
    is ``on`` and the extra is installed (else a warning), or the no-op ``Telemetry``.

    Raises ``ConfigError`` for an exporter that no installed package provides.
    """
    telemetry = settings.telemetry
    if telemetry.tracing != "on":
        return Telemetry()
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        logger.warning(
            "tracing is asked for (telemetry.tracing, OTEL_TRACES_EXPORTER) but "
            "the otel extra is not installed (pip install 'tidings[otel]'); "
            "running without traces"
        )
        return Telemetry()
    exporters = [_exporter(name) for name in telemetry.exporters]
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES first; "tidings" only when unnamed.
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "tidings"}))
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    logger.info("tracing to %s", ", ".join(telemetry.exporters))
    return Tracing(provider, owned=True)


def _exporter(name: str) -> SpanExporter:
    """The span exporter an installed package registers as ``name``, configured by the
    SDK's own ``OTEL_EXPORTER_*`` variables."""
    found = list(entry_points(group=_EXPORTERS, name=name))
    if not found:
        known = sorted({point.name for point in entry_points(group=_EXPORTERS)})
        raise ConfigError(
            "telemetry.exporters",
            f"no installed span exporter is called {name!r} (installed: "
            f"{', '.join(known) or 'none'})",
        )
    exporter: SpanExporter = found[0].load()()
    return exporter
