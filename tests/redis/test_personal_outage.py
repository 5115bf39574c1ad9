"""A connection while Redis is unreachable: refused with 1013 (never accepted without its
personal channel), logged as one rate-limited line, and the SDK gets in once Redis is back;
server API requests failing meanwhile are logged the same way.

Every test runs its own redis-server on a free port and pauses it with SIGSTOP.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fault_proxy import StateRecorder
from helpers import TIMEOUT, api, connect, publish, token
from redis_engines import EngineNode
from redis_support import eventually, redis_node
from tidings.client import Backoff, Client, Event
from tidings.outages import OutageLog
from tidings.server import RunningServer
from timeouts import scaled

#: Redis calls give up fast, so that a refused handshake takes a fraction of a second.
NODE = {"broker": {"timeout": 0.3}}
TOK = token("u1")


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[EngineNode]:
    node = EngineNode(tmp_path / "redis")
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
async def node(redis: EngineNode) -> AsyncIterator[RunningServer]:
    await redis.start()
    url = f"redis://{redis.address}/0"
    async with redis_node(url, f"t-{uuid.uuid4().hex}", overrides=NODE) as server:
        yield server


async def _handshake(server: RunningServer) -> tuple[str, object]:
    """Open one connection: ("connected", channels) or ("closed", close code)."""
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(
            f"{server.ws_url}?token={TOK}",
            autoping=True,
            timeout=aiohttp.ClientWSTimeout(ws_close=TIMEOUT),
        ) as ws,
    ):
        msg = await ws.receive(TIMEOUT)
        if msg.type is aiohttp.WSMsgType.TEXT:
            hello = msg.json()
            assert hello["type"] == "connected", hello
            return "connected", hello["data"]["channels"]
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
        return "closed", ws.close_code


async def _samples(server: RunningServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One scrape of /metrics, on a connection of its own, keyed by name and labels."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.http_url + "/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_connect_is_refused_with_1013_while_redis_is_paused(
    redis: EngineNode, node: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    """While Redis is paused a new connection is closed with 1013 before ``connected``,
    the outage is logged once (no traceback), tidings_broker_up reads 0; once Redis is
    back the connection opens with its personal channel and receives its events."""
    assert await _handshake(node) == ("connected", ["user:u1"])
    # A clock that never moves: every line after the first falls in the same interval.
    node.gateway.outages = OutageLog(logging.getLogger("tidings.gateway"), clock=lambda: 0.0)
    caplog.set_level("WARNING", logger="tidings.gateway")
    redis.pause()
    try:
        for _ in range(3):
            assert await _handshake(node) == ("closed", 1013)
        samples = await _samples(node)
        assert samples[("tidings_broker_up", ())] == 0
        assert samples[("tidings_handshakes_total", (("outcome", "unavailable"),))] == 3
        assert samples[("tidings_connections", ())] == 0
        assert samples[("tidings_subscriptions", ())] == 0
    finally:
        redis.resume()
    lines = [r for r in caplog.records if "personal channel unavailable" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelname == "WARNING" and lines[0].exc_info is None
    assert "\n" not in lines[0].getMessage()

    async def opens() -> bool:
        return await _handshake(node) == ("connected", ["user:u1"])

    await eventually(opens, timeout=scaled(15))
    async with connect(node, TOK) as client:
        result = await publish(node, "user:u1")
        event = await client.recv()
        assert event["channel"] == "user:u1" and event["id"] == result["id"]
    assert (await _samples(node))[("tidings_broker_up", ())] == 1


async def test_python_client_backs_off_on_1013_and_gets_in_when_redis_returns(
    redis: EngineNode, node: RunningServer
) -> None:
    """The Python SDK, refused with 1013 during the outage, retries with backoff and,
    once Redis answers, connects with its personal channel and receives events on it."""
    recorder = StateRecorder()
    redis.pause()
    client = Client(
        node.ws_url,
        token=TOK,
        on_state=recorder,
        backoff=Backoff(initial=0.05, cap=0.2, random=lambda: 0.5),
    )
    try:
        await client.start(wait=False)
        refused = await recorder.wait("disconnected")
        assert refused.code == 1013
        assert recorder.count("connected") == 0
        redis.resume()
        await recorder.wait("connected", timeout=scaled(20))
        assert client.automatic_channels == {"user:u1"}
        personal = await client.subscribe("user:u1")
        status, body = await api(
            node,
            "POST",
            "/api/publish",
            {
                "channel": "user:u1",
                "type": "notification",
                "data": {"message": "back", "level": "info"},
            },
        )
        assert status == 200, body
        item = await asyncio.wait_for(anext(personal), TIMEOUT)
        assert isinstance(item, Event) and item.data["message"] == "back"
    finally:
        redis.resume()
        await client.close()


async def test_server_api_failures_during_an_outage_are_one_rate_limited_line_per_route(
    redis: EngineNode, node: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    """While Redis is paused every publish and history read answers 503, and each route
    logs one warning line without traceback, named by its pattern (no channel); the next
    interval's line counts the requests left out."""
    now = [0.0]
    node.gateway.outages = OutageLog(logging.getLogger("tidings.gateway"), clock=lambda: now[0])
    caplog.set_level("WARNING")
    body = {"channel": "news:a", "type": "notification", "data": {"message": "m", "level": "info"}}
    redis.pause()
    try:
        for _ in range(4):
            status, answer = await api(node, "POST", "/api/publish", body)
            assert status == 503 and answer["error"]["code"] == "broker_unavailable"
        for channel in ("news:a", "news:b"):
            status, _ = await api(node, "GET", f"/api/channels/{channel}/history")
            assert status == 503
        now[0] = 60.0  # the next interval
        status, _ = await api(node, "POST", "/api/publish", body)
        assert status == 503
    finally:
        redis.resume()
    lines = [r for r in caplog.records if "failed" in r.getMessage() and "/api/" in r.getMessage()]
    messages = [r.getMessage() for r in lines]
    assert [m.split(":", 1)[0] for m in messages] == [
        "POST /api/publish failed",
        "GET /api/channels/{channel}/history failed",
        "POST /api/publish failed",
    ], messages
    assert "(3 more since the previous such line, not logged)" in messages[2]
    assert all(r.levelname == "WARNING" and r.exc_info is None for r in lines)
    assert not any("news:" in m for m in messages)
