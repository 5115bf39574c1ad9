"""Every row of the error-code table (protocol section 6) through a real server and client.

Errors that keep the connection open are followed by a ``ping`` that must be answered
with its ``pong``, which proves the connection is still open and nothing else was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from aiohttp import web

from helpers import (
    TIMEOUT,
    Client,
    api,
    connect,
    make_settings,
    serve,
    token,
    ws_assert_open,
    ws_checked,
    ws_until_close,
)
from tidings.auth import Identity
from tidings.brokers.base import HistoryPage, StreamPosition
from tidings.brokers.memory import MemoryBroker
from tidings.config import NamespaceSettings
from tidings.errors import BrokerUnavailable
from tidings.server import running


async def _error(client: Client) -> dict[str, Any]:
    """The next message, which must be an ``error``."""
    message = ws_checked(json.dumps(await client.recv()))
    assert message["type"] == "error", message
    assert set(message["data"]) <= {"code", "message", "channel"}
    assert isinstance(message["data"]["message"], str) and message["data"]["message"]
    return message


# -- invalid_request -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param("{not json", id="not-json"),
        pytest.param("\xff\xfe garbage", id="not-json-bytes"),
        pytest.param('[{"type": "ping"}]', id="json-array"),
        pytest.param('"ping"', id="json-string"),
        pytest.param('{"data": {}}', id="missing-type"),
        pytest.param('{"type": 7}', id="type-not-string"),
        pytest.param('{"type": "dance"}', id="unknown-type"),
        pytest.param('{"type": "connected"}', id="server-message-type"),
        pytest.param('{"type": "ping", "data": "x"}', id="data-not-object"),
        pytest.param('{"type": "ping", "id": 7}', id="id-not-string"),
        pytest.param('{"type": "ping", "id": "' + "i" * 65 + '"}', id="id-too-long"),
        pytest.param('{"type": "subscribe", "data": {}}', id="channel-missing"),
        pytest.param('{"type": "subscribe", "data": {"channel": 5}}', id="channel-not-string"),
        pytest.param(
            '{"type": "subscribe", "data": {"channel": "news:x", "recover": 3}}',
            id="recover-not-object",
        ),
        pytest.param(
            '{"type": "subscribe", "data": {"channel": "news:x",'
            ' "recover": {"offset": "1", "epoch": "e"}}}',
            id="recover-offset-string",
        ),
        pytest.param('{"type": "refresh", "data": {"token": 5}}', id="token-not-string"),
        pytest.param(
            '{"type": "unsubscribe", "data": {"channel": ["news:x"]}}',
            id="unsubscribe-channel-list",
        ),
    ],
)
async def test_invalid_request_keeps_connection_open(frame: str) -> None:
    """A malformed command gets ``invalid_request`` and the connection stays open."""
    async with serve() as server, connect(server, token("u", ("news:*",))) as client:
        await client.ws.send_str(frame)
        error = await _error(client)
        assert error["data"]["code"] == "invalid_request"
        assert "id" not in error
        await ws_assert_open(client)


async def test_binary_frame_is_invalid_request() -> None:
    """A binary frame gets ``invalid_request`` and the connection stays open."""
    async with serve() as server, connect(server, token()) as client:
        await client.ws.send_bytes(b'{"type": "ping"}')
        error = await _error(client)
        assert error["data"]["code"] == "invalid_request"
        await ws_assert_open(client)


@pytest.mark.parametrize(
    "channel",
    [
        "no-colon",
        "Upper:x",
        ":x",
        "news:",
        "news:has space",
        "news:" + "x" * 129,
        "9news:x",
        "news:a/b",
    ],
)
async def test_bad_channel_name_is_invalid_request(channel: str) -> None:
    """A subscribe to a channel outside the name grammar gets ``invalid_request``."""
    async with serve() as server, connect(server, token("u", ("news:*",))) as client:
        await client.send("subscribe", {"channel": channel}, id="c1")
        error = await _error(client)
        assert error["data"]["code"] == "invalid_request"
        assert error["id"] == "c1"
        await ws_assert_open(client)


@pytest.mark.parametrize(
    "command",
    [
        {"type": "dance", "id": "q7"},
        {"type": "subscribe", "id": "q7", "data": {"channel": "bad name"}},
        {"type": "ping", "id": "q7", "data": []},
        {"type": "refresh", "id": "q7", "data": {}},
    ],
    ids=["unknown-type", "bad-channel", "data-list", "refresh-no-token"],
)
async def test_invalid_request_echoes_command_id(command: dict[str, Any]) -> None:
    """An ``invalid_request`` answering a command that had an ``id`` carries that id."""
    async with serve() as server, connect(server, token()) as client:
        await client.ws.send_str(json.dumps(command))
        error = await _error(client)
        assert error["data"]["code"] == "invalid_request"
        assert error["id"] == "q7"
        await ws_assert_open(client)


async def test_unknown_extra_fields_are_ignored() -> None:
    """Unknown extra fields in a command are ignored rather than rejected."""
    async with serve() as server, connect(server, token()) as client:
        await client.ws.send_str(
            json.dumps({"type": "ping", "id": "x", "data": {"extra": 1}, "color": "blue"})
        )
        reply = ws_checked(json.dumps(await client.recv()))
        assert reply["type"] == "pong"
        assert reply["id"] == "x"


# -- unauthorized (stays open) --------------------------------------------------------------


async def test_subscribe_not_allowed_by_claims_is_unauthorized() -> None:
    """Subscribing to a channel the token's claims do not allow gets ``unauthorized`` with
    the channel, and the connection stays open and usable."""
    async with serve() as server, connect(server, token("u", ("news:*",))) as client:
        await client.send("subscribe", {"channel": "secret:plans"}, id="s1")
        error = await _error(client)
        assert error["id"] == "s1"
        assert error["data"]["code"] == "unauthorized"
        assert error["data"]["channel"] == "secret:plans"
        await ws_assert_open(client)
        reply = await client.subscribe("news:ok")
        assert reply["type"] == "subscribed"


async def test_subscribe_to_another_users_personal_channel_is_unauthorized() -> None:
    """Another user's personal channel is ``unauthorized``; the connection stays open."""
    async with serve() as server, connect(server, token("alice", ("user:*",))) as client:
        await client.send("subscribe", {"channel": "user:bob"}, id="s1")
        error = await _error(client)
        assert error["data"]["code"] == "unauthorized"
        assert error["data"]["channel"] == "user:bob"
        await ws_assert_open(client)


async def test_deny_namespace_is_unauthorized() -> None:
    """A namespace whose rule is ``deny`` is ``unauthorized`` even with a matching claim."""
    async with (
        serve({"namespaces": {"audit": {"rule": "deny"}}}) as server,
        connect(server, token("u", ("audit:*",))) as client,
    ):
        await client.send("subscribe", {"channel": "audit:log"}, id="s1")
        error = await _error(client)
        assert error["data"]["code"] == "unauthorized"
        await ws_assert_open(client)


# -- subscription_failed ----------------------------------------------------------------------


async def test_unknown_namespace_without_default_is_subscription_failed() -> None:
    """A namespace with no rule when no ``default`` rule exists is ``subscription_failed``.

    The configuration loader always supplies a ``default`` rule, so only a program that
    embeds the server and builds its settings itself can reach this case.
    """
    base = make_settings()
    settings = base.model_copy(update={"namespaces": {"news": NamespaceSettings(rule="public")}})
    async with running(settings) as server, connect(server, token("u", ("foo:*",))) as client:
        await client.send("subscribe", {"channel": "foo:bar"}, id="7")
        error = await _error(client)
        assert error["id"] == "7"
        assert error["data"]["code"] == "subscription_failed"
        assert error["data"]["channel"] == "foo:bar"
        assert "foo" in error["data"]["message"]
        await ws_assert_open(client)
        assert (await client.subscribe("news:open"))["type"] == "subscribed"


async def test_too_many_subscriptions_is_subscription_failed() -> None:
    """A subscription beyond ``limits.max_subscriptions`` is ``subscription_failed``; the
    personal channel does not count and a repeat of an existing one still succeeds."""
    async with (
        serve({"limits": {"max_subscriptions": 1}}) as server,
        connect(server, token("u", ("news:*",))) as client,
    ):
        assert (await client.subscribe("news:a"))["type"] == "subscribed"
        await client.send("subscribe", {"channel": "news:b"}, id="over")
        error = await _error(client)
        assert error["id"] == "over"
        assert error["data"]["code"] == "subscription_failed"
        assert error["data"]["channel"] == "news:b"
        await ws_assert_open(client)
        assert (await client.subscribe("news:a"))["type"] == "subscribed"
        await client.send("unsubscribe", {"channel": "news:a"})
        assert (await client.recv())["type"] == "unsubscribed"
        assert (await client.subscribe("news:b"))["type"] == "subscribed"


@contextlib.asynccontextmanager
async def _webhook(status: int, calls: list[dict[str, Any]]) -> AsyncIterator[str]:
    """A real HTTP authorizer on port 0 that answers every request with ``status``."""

    async def answer(request: web.Request) -> web.Response:
        calls.append(await request.json())
        return web.json_response({}, status=status)

    app = web.Application()
    app.router.add_post("/authorize", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}/authorize"
    finally:
        await runner.cleanup()


async def test_webhook_error_status_is_subscription_failed() -> None:
    """A webhook authorizer answering 500 makes the subscribe ``subscription_failed``."""
    calls: list[dict[str, Any]] = []
    async with (
        _webhook(500, calls) as url,
        serve({"namespaces": {"room": {"rule": "webhook", "url": url, "timeout": 2}}}) as server,
        connect(server, token("u")) as client,
    ):
        await client.send("subscribe", {"channel": "room:1"}, id="w")
        error = await _error(client)
        assert error["id"] == "w"
        assert error["data"]["code"] == "subscription_failed"
        assert error["data"]["channel"] == "room:1"
        assert url not in error["data"]["message"]
        assert [(c["user_id"], c["channel"]) for c in calls] == [("u", "room:1")]
        await ws_assert_open(client)


async def test_webhook_denial_is_unauthorized() -> None:
    """A webhook authorizer answering 403 makes the subscribe ``unauthorized``, not a
    failure; the connection stays open."""
    calls: list[dict[str, Any]] = []
    async with (
        _webhook(403, calls) as url,
        serve({"namespaces": {"room": {"rule": "webhook", "url": url}}}) as server,
        connect(server, token("u")) as client,
    ):
        await client.send("subscribe", {"channel": "room:1"}, id="w")
        error = await _error(client)
        assert error["data"]["code"] == "unauthorized"
        assert len(calls) == 1
        await ws_assert_open(client)


async def test_raising_authorizer_callable_is_subscription_failed() -> None:
    """An embedded authorizer callable that raises makes the subscribe
    ``subscription_failed`` without leaking the exception text."""

    def broken(identity: Identity, channel: str) -> bool:
        raise RuntimeError("database password is hunter2")

    async with serve(authorizers={"calc": broken}) as server, connect(server, token()) as client:
        await client.send("subscribe", {"channel": "calc:x"}, id="a")
        error = await _error(client)
        assert error["data"]["code"] == "subscription_failed"
        assert error["data"]["channel"] == "calc:x"
        assert "hunter2" not in json.dumps(error)
        assert "RuntimeError" not in json.dumps(error)
        await ws_assert_open(client)


class FaultyBroker:
    """A memory broker whose reads fail for chosen channels (``broken:*`` by default)."""

    def __init__(
        self,
        *,
        history_error: Exception | None = None,
        position_error: Exception | None = None,
        prefixes: Sequence[str] = ("broken:",),
    ) -> None:
        self.inner = MemoryBroker()
        self.history_error = history_error
        self.position_error = position_error
        self.prefixes = tuple(prefixes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def position(self, channel: str) -> StreamPosition:
        if self.position_error is not None and channel.startswith(self.prefixes):
            raise self.position_error
        return await self.inner.position(channel)

    async def history(self, channel: str, since: int, limit: int) -> HistoryPage:
        if self.history_error is not None and channel.startswith(self.prefixes):
            raise self.history_error
        return await self.inner.history(channel, since, limit)


async def test_broker_unavailable_is_subscription_failed() -> None:
    """A broker that cannot answer makes the subscribe ``subscription_failed``; the
    connection stays open and other channels still work."""
    broker = FaultyBroker(position_error=BrokerUnavailable("broker timed out"))
    async with (
        serve(broker=broker) as server,
        connect(server, token("u", ("broken:*", "news:*"))) as client,
    ):
        await client.send("subscribe", {"channel": "broken:x"}, id="b")
        error = await _error(client)
        assert error["id"] == "b"
        assert error["data"]["code"] == "subscription_failed"
        assert error["data"]["channel"] == "broken:x"
        await ws_assert_open(client)
        assert (await client.subscribe("news:fine"))["type"] == "subscribed"


# -- rate_limited -----------------------------------------------------------------------------

RATE = {"limits": {"commands_per_second": 5, "command_burst": 2, "rate_limit_strikes": 3}}


async def test_rate_limited_keeps_connection_open() -> None:
    """Commands beyond the burst get ``rate_limited``; after the configured refill time
    the connection is still open and served."""
    async with serve(RATE) as server, connect(server, token()) as client:
        for index in range(3):
            await client.send("ping", id=f"p{index}")
        assert (await client.recv())["type"] == "pong"
        assert (await client.recv())["type"] == "pong"
        error = await _error(client)
        assert error["data"]["code"] == "rate_limited"
        # Waiting out the configured refill (5 commands/s) is waiting for our own timeout.
        await asyncio.sleep(0.25)
        await ws_assert_open(client)


async def test_command_flood_closes_4429() -> None:
    """Every over-limit command of a flood gets its ``rate_limited``, the
    ``rate_limit_strikes``-th in a row included, and then the connection closes 4429."""
    async with serve(RATE) as server, connect(server, token()) as client:
        for index in range(10):
            await client.send("ping", id=f"p{index}")
        messages, code = await ws_until_close(client.ws, TIMEOUT)
        assert code == 4429
        kinds = [
            (m.get("id"), m["type"] if m["type"] != "error" else m["data"]["code"])
            for m in messages
        ]
        # Burst 2, then 3 strikes: p2..p4 are dropped and answered; p5.. are never read.
        assert kinds == [
            ("p0", "pong"),
            ("p1", "pong"),
            ("p2", "rate_limited"),
            ("p3", "rate_limited"),
            ("p4", "rate_limited"),
        ]


# -- internal_error ---------------------------------------------------------------------------


async def test_unexpected_fault_is_internal_error() -> None:
    """An unexpected fault while handling a command is ``internal_error`` with a safe
    message; the connection stays open and the failed subscription is not left behind."""
    broker = FaultyBroker(history_error=RuntimeError("secret stack detail"))
    async with serve(broker=broker) as server, connect(server, token("u", ("broken:*",))) as client:
        await client.send(
            "subscribe", {"channel": "broken:x", "recover": {"offset": 0, "epoch": "e"}}, id="r"
        )
        error = await _error(client)
        assert error["id"] == "r"
        assert error["data"]["code"] == "internal_error"
        text = json.dumps(error)
        assert "secret stack detail" not in text
        assert "Traceback" not in text
        await ws_assert_open(client)
        status, body = await api(server, "GET", "/api/channels?prefix=broken:")
        assert (status, body) == (200, {"channels": []})
        # Without recovery the same channel subscribes fine.
        assert (await client.subscribe("broken:x"))["type"] == "subscribed"
