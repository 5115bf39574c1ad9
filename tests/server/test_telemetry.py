"""OpenTelemetry traces: API request spans, publish spans and deliver spans linked to them
(memory broker and Redis), the settings that turn tracing on, and tracing off."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanContext, SpanKind

from helpers import API_KEY, SECRET, TIMEOUT, connect, make_settings, publish, serve, token
from redis_support import FAST, REDIS_URL, NullHandler, broker_settings, client_scope
from tidings.bench.otlpsink import otlp_sink
from tidings.bench.servers import Credentials, server_env
from tidings.brokers.base import PublishRequest
from tidings.brokers.memory import MemoryBroker
from tidings.brokers.redis import RedisBroker
from tidings.brokers.redis.codec import EventMessage, decode_event, encode_event, split_payload
from tidings.brokers.redis.scripts import APPEND_SCRIPT, COMMIT_SCRIPT, KeyLayout
from tidings.config import TelemetrySettings, load_settings
from tidings.errors import ConfigError
from tidings.protocol.wire import encode_message
from tidings.server import running
from tidings.telemetry import Telemetry, Tracing, make_telemetry
from timeouts import scaled

pytestmark = pytest.mark.timeout(30)

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
NOTE = {"message": "hi", "level": "info"}


class Traced:
    """A ``Tracing`` over an in-memory exporter: the spans one node recorded."""

    def __init__(self, sampler: Any = None) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(sampler=sampler) if sampler else TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracing = Tracing(self.provider)

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        found = self.exporter.get_finished_spans()
        return [span for span in found if name is None or span.name == name]

    def one(self, name: str) -> ReadableSpan:
        (span,) = self.spans(name)
        return span


@pytest.fixture
def traced() -> Iterator[Traced]:
    node = Traced()
    yield node
    node.provider.shutdown()


def _values(spans: Sequence[ReadableSpan]) -> list[str]:
    """Every attribute value, event attribute and name of ``spans``, as text."""
    texts: list[str] = []
    for span in spans:
        texts.append(span.name)
        texts += [f"{key}={value!s}" for key, value in (span.attributes or {}).items()]
        for event in span.events:
            texts += [f"{key}={value!s}" for key, value in (event.attributes or {}).items()]
    return texts


def _context(span: ReadableSpan) -> SpanContext:
    """A finished span's context (the SDK always has one)."""
    context = span.get_span_context()
    assert context is not None
    return context


def _linked_to(deliver: ReadableSpan, publish: ReadableSpan) -> bool:
    """Whether ``deliver`` links to ``publish`` (and is not its child)."""
    contexts = [(link.context.trace_id, link.context.span_id) for link in deliver.links]
    published = _context(publish)
    assert published is not None
    return (
        contexts == [(published.trace_id, published.span_id)]
        and deliver.parent is None
        and _context(deliver).trace_id != published.trace_id
    )


async def test_api_request_span_has_method_route_status_and_no_secret(traced: Traced) -> None:
    """A server API request is one server span named by method and route, child of the
    caller's ``traceparent``, with its status; no attribute holds the API key or a token."""
    async with serve(telemetry=traced.tracing) as server, aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {API_KEY}", "traceparent": TRACEPARENT}
        body = {"channel": "news:a", "type": "notification", "data": NOTE}
        async with http.post(
            server.http_url + "/api/publish", json=body, headers=headers
        ) as response:
            assert response.status == 200
        async with http.get(
            server.http_url + "/api/channels/news:a/history",
            headers={"Authorization": "Bearer wrong-key"},
        ) as response:
            assert response.status == 401
        async with http.get(server.http_url + "/healthz") as response:
            assert response.status == 200
        async with connect(server, token("u", ("news:*",))):
            pass
    request = traced.one("POST /api/publish")
    assert request.kind is SpanKind.SERVER
    assert request.attributes is not None
    assert request.attributes["http.request.method"] == "POST"
    assert request.attributes["http.route"] == "/api/publish"
    assert request.attributes["http.response.status_code"] == 200
    assert request.parent is not None and request.parent.span_id == 0xB7AD6B7169203331
    assert _context(request).trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    refused = traced.one("GET /api/channels/{channel}/history")
    assert refused.attributes is not None
    assert refused.attributes["http.response.status_code"] == 401
    assert refused.attributes["url.path"] == "/api/channels/news:a/history"
    # Probes, scrapes and the WebSocket handshake are not traced.
    assert {span.name for span in traced.spans()} == {
        "POST /api/publish",
        "GET /api/channels/{channel}/history",
        "publish",
    }
    secrets = (API_KEY, "wrong-key", SECRET, token("u", ("news:*",)))
    for text in _values(traced.spans()):
        assert not any(secret in text for secret in secrets), text


async def test_memory_broker_publish_span_and_linked_deliver_span(traced: Traced) -> None:
    """A publish through the memory broker is a ``publish`` span (channel, type, offset)
    under the request's span, and its delivery a ``deliver`` span linked to it with the
    local subscriber count; the client's frame carries no trace."""
    async with (
        serve(telemetry=traced.tracing) as server,
        connect(server, token("u", ("news:*",))) as client,
    ):
        assert (await client.subscribe("news:a"))["type"] == "subscribed"
        result = await publish(server, "news:a", data=NOTE)
        raw = await client.ws.receive(timeout=TIMEOUT)
    event = json.loads(raw.data)
    assert event["offset"] == result["offset"] and event["data"] == NOTE
    assert set(event) == {"type", "channel", "offset", "id", "timestamp", "data"}
    published = traced.one("publish")
    assert published.kind is SpanKind.PRODUCER
    assert published.attributes is not None
    assert published.attributes["messaging.destination.name"] == "news:a"
    assert published.attributes["tidings.event.type"] == "notification"
    assert published.attributes["tidings.offset"] == result["offset"]
    request = traced.one("POST /api/publish")
    assert published.parent is not None
    assert published.parent.span_id == _context(request).span_id
    deliver = traced.one("deliver")
    assert deliver.kind is SpanKind.CONSUMER
    assert _linked_to(deliver, published)
    assert deliver.attributes is not None
    assert deliver.attributes["messaging.destination.name"] == "news:a"
    assert deliver.attributes["tidings.offset"] == result["offset"]
    assert deliver.attributes["tidings.subscribers"] == 1
    context = _context(published)
    assert f"{context.trace_id:032x}" not in raw.data


async def test_batch_publish_span_lists_channels_types_and_offsets(traced: Traced) -> None:
    """A batch is one ``publish`` span listing its channels, types and offsets; each
    delivered event has its own ``deliver`` span linked to it."""
    broker = MemoryBroker()

    class Handler(NullHandler):
        def __init__(self) -> None:
            self.traces: list[str | None] = []

        def on_event(
            self, channel: str, offset: int, epoch: str, payload: bytes, trace: str | None = None
        ) -> None:
            self.traces.append(trace)
            traced.tracing.deliver(channel, offset, trace or "", lambda: 3)

    handler = Handler()
    await broker.start(handler)
    try:
        await broker.subscribe("a:1")
        await broker.subscribe("b:1")
        requests = [
            PublishRequest("a:1", "notification", NOTE),
            PublishRequest("b:1", "chat_message", NOTE),
            PublishRequest("a:1", "notification", NOTE),
        ]
        results = await traced.tracing.publish(broker.publish, requests)
    finally:
        await broker.close()
    published = traced.one("publish")
    assert published.attributes is not None
    assert published.attributes["messaging.batch.message_count"] == 3
    attributes: dict[str, Any] = dict(published.attributes)
    assert list(attributes["tidings.channels"]) == ["a:1", "b:1"]
    assert list(attributes["tidings.event.types"]) == ["notification", "chat_message"]
    assert list(attributes["tidings.offsets"]) == [r.offset for r in results]
    context = _context(published)
    assert handler.traces == [f"00-{context.trace_id:032x}-{context.span_id:016x}-01"] * 3
    delivers = traced.spans("deliver")
    assert len(delivers) == 3 and all(_linked_to(span, published) for span in delivers)


async def test_unsampled_publish_carries_no_trace_and_gets_no_deliver_span() -> None:
    """A publish the sampler drops sends no ``traceparent``: no ``deliver`` span anywhere."""
    node = Traced(sampler=ALWAYS_OFF)
    try:
        async with (
            serve(telemetry=node.tracing) as server,
            connect(server, token("u", ("news:*",))) as client,
        ):
            await client.subscribe("news:a")
            await publish(server, "news:a", data=NOTE)
            assert (await client.recv())["data"] == NOTE
        assert node.spans() == []
    finally:
        node.provider.shutdown()


async def test_redis_deliver_span_on_another_node_links_to_the_publish(redis_prefix: str) -> None:
    """Through Redis, the node that delivers (not the one that published) records a
    ``deliver`` span linked to the publishing node's ``publish`` span; the client gets the
    same frame as without tracing."""
    publisher, receiver = Traced(), Traced()
    overrides = broker_settings(REDIS_URL, redis_prefix)
    try:
        brokers = [RedisBroker.from_settings(make_settings(overrides), **FAST) for _ in range(2)]
        async with (
            serve(overrides, broker=brokers[0], telemetry=publisher.tracing) as a,
            serve(overrides, broker=brokers[1], telemetry=receiver.tracing) as b,
            connect(b, token("u", ("news:*",))) as client,
        ):
            assert (await client.subscribe("news:a"))["type"] == "subscribed"
            result = await publish(a, "news:a", data=NOTE)
            raw = await client.ws.receive(timeout=TIMEOUT)
        event = json.loads(raw.data)
        assert event["offset"] == result["offset"] and event["id"] == result["id"]
        assert set(event) == {"type", "channel", "offset", "id", "timestamp", "data"}
        published = publisher.one("publish")
        assert publisher.spans("deliver") == []
        deliver = receiver.one("deliver")
        assert _linked_to(deliver, published)
        assert deliver.attributes is not None
        assert deliver.attributes["tidings.offset"] == result["offset"]
        assert deliver.attributes["tidings.subscribers"] == 1
    finally:
        publisher.provider.shutdown()
        receiver.provider.shutdown()


async def test_commit_script_puts_the_trace_in_the_message_only(redis_prefix: str) -> None:
    """Waiting for replicas, the commit script sends a traced event as
    ``<epoch>:<offset>;<trace>:<payload>`` and an untraced one as before; history keeps
    the payload alone."""
    keys = KeyLayout(redis_prefix)
    meta, stream, channel = keys.meta("news:a"), keys.stream("news:a"), keys.events("news:a")
    payloads = []
    async with client_scope() as client:
        pubsub = client.pubsub()
        await pubsub.subscribe(channel)
        await pubsub.get_message(timeout=TIMEOUT)  # the subscription's confirmation
        for index in (1, 2):
            head, tail = split_payload(
                encode_message(
                    "notification", NOTE, id=f"e{index}", channel="news:a", offset=0, timestamp=1.0
                )
            )
            reply = await client.eval(
                APPEND_SCRIPT,
                2,
                meta,
                stream,
                "ep",
                head,
                tail,
                10,
                60_000,
                60_000,
                channel,
                f"e{index}",
            )
            payloads.append(head + reply[1] + tail)
        epoch = reply[0].decode()
        committed = await client.eval(
            COMMIT_SCRIPT,
            2,
            meta,
            stream,
            epoch,
            2,
            "PUBLISH",
            channel,
            1,
            payloads[0],
            TRACEPARENT,
            2,
            payloads[1],
            "",
        )
        assert committed == 2
        messages = [await _next_message(pubsub) for _ in range(2)]
        stored = await client.xrange(stream) or []
        await pubsub.aclose()
    assert messages[0] == encode_event(epoch, 1, payloads[0], TRACEPARENT)
    assert messages[1] == encode_event(epoch, 2, payloads[1])
    assert [(fields or {})[b"p"] for _, fields in stored] == payloads


async def _next_message(pubsub: aioredis.client.PubSub) -> bytes:
    async with asyncio.timeout(TIMEOUT):
        while True:
            message = await pubsub.get_message(timeout=TIMEOUT)
            if message is not None and message["type"] == "message":
                data: bytes = message["data"]
                return data


def test_event_messages_with_and_without_a_trace() -> None:
    """A traced message carries the trace after the offset; untraced ones are byte for
    byte as before, and a decoder reads both."""
    payload = b'{"type":"x","a":"b:c"}'
    assert encode_event("ab12", 42, payload) == b"ab12:42:" + payload
    traced = encode_event("ab12", 42, payload, TRACEPARENT)
    assert traced == f"ab12:42;{TRACEPARENT}:".encode() + payload
    assert decode_event(traced) == EventMessage("ab12", 42, payload, TRACEPARENT)
    assert decode_event(b"ab12:42:" + payload) == EventMessage("ab12", 42, payload)
    assert decode_event(b"e:1;:{}") == EventMessage("e", 1, b"{}")
    for data in (b"e:x;t:{}", b"e:1;t", b"e;1:{}", b"\xff:1;t:{}", b"e:1;\xff:{}"):
        assert decode_event(data) is None, data


@pytest.mark.parametrize(
    ("settings", "environ", "expected"),
    [
        ({}, {}, ("off", ())),
        ({}, {"OTEL_TRACES_EXPORTER": "otlp"}, ("on", ("otlp_proto_http",))),
        ({}, {"OTEL_TRACES_EXPORTER": "OTLP, console"}, ("on", ("otlp_proto_http", "console"))),
        (
            {},
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            ("on", ("otlp_proto_grpc",)),
        ),
        (
            {},
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            },
            ("on", ("otlp_proto_http",)),
        ),
        ({}, {"OTEL_TRACES_EXPORTER": "none"}, ("off", ())),
        ({}, {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "TRUE"}, ("off", ())),
        ({"tracing": "on"}, {}, ("on", ("otlp_proto_http",))),
        ({"tracing": "on"}, {"OTEL_SDK_DISABLED": "true"}, ("off", ())),
        ({"tracing": "off"}, {"OTEL_TRACES_EXPORTER": "otlp"}, ("off", ())),
        ({"exporters": ["console"]}, {}, ("on", ("console",))),
        ({"exporters": ["console"]}, {"OTEL_TRACES_EXPORTER": "otlp"}, ("on", ("console",))),
    ],
)
def test_tracing_is_on_only_when_asked_for(
    settings: dict[str, Any], environ: dict[str, str], expected: tuple[str, tuple[str, ...]]
) -> None:
    """``telemetry.tracing`` resolves from the settings and the standard ``OTEL_*``
    variables; ``OTEL_SDK_DISABLED=true`` always wins."""
    resolved = load_settings(
        None, {"telemetry": settings}, environ=environ, require_auth=False
    ).telemetry
    assert (resolved.tracing, resolved.exporters) == expected


def test_resolved_telemetry_survives_a_worker_reload() -> None:
    """A worker loads its supervisor's resolved settings without an environment and
    keeps tracing on, with the same exporters."""
    parent = load_settings(None, {}, environ={"OTEL_TRACES_EXPORTER": "otlp"}, require_auth=False)
    child = load_settings(
        None, json.loads(parent.model_dump_json()), environ={}, require_auth=False
    )
    assert (
        child.telemetry
        == parent.telemetry
        == TelemetrySettings(tracing="on", exporters=("otlp_proto_http",))
    )


def test_bad_protocol_and_unknown_exporter_are_configuration_errors() -> None:
    """An OTLP protocol the SDK cannot speak, or an exporter no package provides, stops
    the server naming the variable or the key."""
    with pytest.raises(ConfigError) as raised:
        load_settings(
            None,
            {},
            environ={"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            require_auth=False,
        )
    assert raised.value.key == "OTEL_EXPORTER_OTLP_PROTOCOL"
    settings = make_settings({"telemetry": {"tracing": "on", "exporters": ["nope"]}})
    with pytest.raises(ConfigError) as raised:
        make_telemetry(settings)
    assert raised.value.key == "telemetry.exporters" and "console" in raised.value.reason


async def test_make_telemetry_names_the_service_and_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracing off is the no-op; on, the provider is named ``tidings`` unless
    ``OTEL_SERVICE_NAME`` names it, and ``close`` shuts it down."""
    assert type(make_telemetry(make_settings())) is Telemetry
    settings = make_settings({"telemetry": {"tracing": "on", "exporters": ["console"]}})
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    default = make_telemetry(settings)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "edge-gateway")
    named = make_telemetry(settings)
    for telemetry, name in ((default, "tidings"), (named, "edge-gateway")):
        assert isinstance(telemetry, Tracing)
        assert telemetry._provider.resource.attributes["service.name"] == name
        await telemetry.close()


_NO_OTEL = textwrap.dedent("""
    import asyncio, sys
    import aiohttp
    from tidings.config import load_settings
    from tidings.server import running

    async def main():
        settings = load_settings(None, {"server": {"port": 0, "mode": "production"},
                                        "auth": {"secret": "s" * 40}, "api": {"keys": ["k"]}})
        async with running(settings) as server, aiohttp.ClientSession() as http:
            async with http.post(server.http_url + "/api/publish",
                                 json={"channel": "news:a", "type": "notification",
                                       "data": {"message": "hi", "level": "info"}},
                                 headers={"Authorization": "Bearer k"}) as response:
                assert response.status == 200, response.status
        loaded = sorted(name for name in sys.modules if name.startswith("opentelemetry"))
        print(settings.telemetry.tracing, loaded)

    asyncio.run(main())
""")


@pytest.mark.parametrize(
    "extra", [{}, {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}]
)
def test_tracing_off_never_imports_opentelemetry(extra: dict[str, str]) -> None:
    """A server with tracing off (nothing asked for, or ``OTEL_SDK_DISABLED``) serves a
    publish without importing opentelemetry at all."""
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("OTEL_", "TIDINGS_"))
    }
    done = subprocess.run(
        [sys.executable, "-c", _NO_OTEL],
        env={**env, **extra},
        capture_output=True,
        text=True,
        timeout=scaled(20),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "off []", done.stdout


async def test_otlp_export_reaches_a_receiver(monkeypatch: pytest.MonkeyPatch) -> None:
    """Configured by ``OTEL_*`` variables alone, a server exports its spans over OTLP/HTTP
    (to the bench's discarding receiver), the last of them when it stops."""
    with otlp_sink() as sink:
        for name, value in sink.env().items():
            monkeypatch.setenv(name, value)
        settings = load_settings(
            None,
            {
                "server": {"port": 0, "mode": "production"},
                "auth": {"secret": SECRET},
                "api": {"keys": [API_KEY]},
            },
        )
        assert settings.telemetry.exporters == ("otlp_proto_http",)
        async with running(settings) as server:
            assert server.gateway.telemetry.enabled
            await publish(server, "news:a", data=NOTE)
        assert sink.requests >= 1 and sink.bytes > 0


def test_bench_servers_trace_only_with_otel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench's servers lose the ``OTEL_*`` variables they would inherit, unless
    ``--otel`` adds its own, which win over the inherited ones (a sampler stays)."""
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    credentials = Credentials.generate()
    plain = server_env(credentials, send_buffer=1024)
    assert not any(name.startswith("OTEL_") for name in plain)
    traced = server_env(credentials, send_buffer=1024, extra={"OTEL_TRACES_EXPORTER": "otlp"})
    assert traced["OTEL_TRACES_EXPORTER"] == "otlp"
    assert traced["OTEL_TRACES_SAMPLER"] == "traceidratio"


async def test_tracing_logs_its_exporters_or_that_the_extra_is_missing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Tracing on logs one line naming its exporters; asked for without the otel extra
    (the SDK cannot be imported), it logs one warning naming the extra and runs with the
    no-op telemetry instead of failing."""
    caplog.set_level(logging.INFO, logger="tidings.telemetry")
    settings = make_settings({"telemetry": {"tracing": "on", "exporters": ["console"]}})
    tracing = make_telemetry(settings)
    assert isinstance(tracing, Tracing)
    await tracing.close()
    assert [r.getMessage() for r in caplog.records] == ["tracing to console"]
    caplog.clear()
    # A None entry in sys.modules makes the import fail as a missing package would.
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    assert type(make_telemetry(settings)) is Telemetry
    (missing,) = caplog.records
    assert missing.levelno == logging.WARNING
    assert "the otel extra is not installed (pip install 'tidings[otel]')" in missing.getMessage()
