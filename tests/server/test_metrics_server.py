"""Metrics through a real server: what ``/metrics`` shows after a publish and its fan-out."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from helpers import API_KEY, SECRET, connect, publish, serve, token
from tidings.server import RunningServer


async def api_text(server: RunningServer, path: str) -> tuple[int, str]:
    """GET ``path`` without a key; the status and the body as text."""
    async with aiohttp.ClientSession() as session, session.get(server.http_url + path) as response:
        return response.status, await response.text()


async def test_publish_and_fanout_latency_through_a_server() -> None:
    """A publish is timed once to its acknowledgement and its fan-out once per event,
    however many subscribers; labels carry no secret, token or channel."""
    tok = token("u1", ("news:*",))
    async with (
        serve() as server,
        connect(server, tok) as first,
        connect(server, tok) as second,
        connect(server, tok) as third,
    ):
        for client in (first, second, third):
            assert (await client.subscribe("news:lat"))["type"] == "subscribed"
        await publish(server, "news:lat")
        for client in (first, second, third):
            assert (await client.recv())["channel"] == "news:lat"
        status, text = await api_text(server, "/metrics")
    assert status == 200
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert values[("tidings_publish_seconds_count", ())] == 1
    assert values[("tidings_fanout_seconds_count", ())] == 1
    assert values[("tidings_events_delivered_total", (("type", "notification"),))] == 3
    assert values[("tidings_broker_up", ())] == 1
    for secret in (SECRET, API_KEY, tok, "news:lat"):
        assert secret not in text
