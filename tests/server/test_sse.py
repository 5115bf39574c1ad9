"""The SSE fallback transport through the real server: stream, resume, commands."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from helpers import TIMEOUT, api, make_settings, publish, serve
from helpers import token as _token
from redis_support import REDIS_URL, eventually, prefix_scope, redis_node
from tidings.errors import ConfigError
from tidings.server import RunningServer
from tidings.transport.sse import SsePeer
from timeouts import scaled


class SseStream:
    """A real SSE client: reads events (``id``, ``event``, ``data``) and comments."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.last_id = ""
        self.comments: list[str] = []

    async def next(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next event: ``{"event", "id", "raw", "data"}`` (data decoded JSON)."""
        fields: dict[str, str] = {}
        async with asyncio.timeout(timeout):
            while True:
                line = (await self.response.content.readline()).decode()
                if not line:
                    raise EOFError("stream ended")
                line = line.rstrip("\n")
                if not line:
                    if fields:
                        break
                    continue
                if line.startswith(":"):
                    self.comments.append(line)
                    continue
                name, _, value = line.partition(": ")
                fields[name] = value
        if "id" in fields:
            self.last_id = fields["id"]
        return {
            "event": fields.get("event", "message"),
            "id": fields.get("id"),
            "raw": fields.get("data", ""),
            "data": json.loads(fields.get("data", "null")),
        }

    async def message(self, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Skip to the next message of type ``kind``."""
        while True:
            event = await self.next(timeout)
            if event["event"] == "message" and event["data"]["type"] == kind:
                return event

    async def closed(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Skip to the ``close`` event, then expect the end of the stream."""
        while True:
            event = await self.next(timeout)
            if event["event"] == "close":
                async with asyncio.timeout(timeout):
                    assert await self.response.content.read() == b""
                return dict(event["data"])


@contextlib.asynccontextmanager
async def sse(
    server: RunningServer,
    tok: str | None = None,
    *,
    channels: tuple[str, ...] = (),
    last_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> AsyncIterator[SseStream]:
    params = [("channel", c) for c in channels]
    if tok is not None:
        params.append(("token", tok))
    sent = dict(headers or {})
    if last_id is not None:
        sent["Last-Event-ID"] = last_id
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.http_url + "/sse", params=params, headers=sent) as response,
    ):
        assert response.status == 200, await response.text()
        yield SseStream(response)


async def command(
    server: RunningServer, session_id: str, body: dict[str, Any], tok: str | None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {tok}"} if tok else {}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.http_url + "/sse/commands",
            json={"session": session_id, "command": body},
            headers=headers,
        ) as response,
    ):
        return response.status, await response.json()


def token(sub: str = "u1", ttl: float = 3600) -> str:
    """A token of ``sub`` that may subscribe to every ``news:`` channel."""
    return _token(sub, ("news:*",), ttl=ttl)


def _encode(document: str) -> str:
    """``document`` spelled as a resume token: unpadded base64url."""
    return base64.urlsafe_b64encode(document.encode()).rstrip(b"=").decode()


def _decode(resume: str) -> list[list[Any]]:
    decoded: list[list[Any]] = json.loads(base64.urlsafe_b64decode(resume + "==="))
    return decoded


async def test_stream_format_connected_first_data_is_ws_json() -> None:
    """The stream is text/event-stream with proxy headers; ``connected`` comes first, every
    data line is the WebSocket JSON, and every event has a resume id."""
    async with serve() as server, sse(server, token("u1"), channels=("news:a",)) as stream:
        response = stream.response
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.headers["X-Accel-Buffering"] == "no"
        first = await stream.next()
        assert first["data"]["type"] == "connected" and first["id"]
        subscribed = await stream.next()
        assert subscribed["data"]["type"] == "subscribed"
        assert subscribed["data"]["data"]["channel"] == "news:a"
        result = await publish(server, "news:a", data={"message": "x", "level": "info"})
        event = await stream.message("notification")
        assert event["data"]["offset"] == result["offset"]
        assert event["raw"] == json.dumps(event["data"], separators=(",", ":"))
        channels = {entry[0]: entry[1:] for entry in _decode(event["id"])}
        assert channels["news:a"] == [result["offset"], subscribed["data"]["data"]["epoch"]]


async def test_heartbeat_is_a_comment_and_keeps_the_stream() -> None:
    """Heartbeats are ``: ping`` comments and no pong is needed to stay connected."""
    async with (
        serve({"server": {"heartbeat_interval": 0.1, "heartbeat_timeout": 0.1}}) as server,
        sse(server, token("u1")) as stream,
    ):
        await stream.message("connected")
        for _ in range(5):  # longer than interval + timeout: no heartbeat close
            await stream.response.content.readline()
        async with asyncio.timeout(TIMEOUT):
            while ": ping" not in stream.comments:
                line = (await stream.response.content.readline()).decode().rstrip("\n")
                if line.startswith(":"):
                    stream.comments.append(line)
        result = await publish(server, "user:u1")
        event = await stream.message("notification")
        assert event["data"]["offset"] == result["offset"]


async def test_last_event_id_recovers_every_channel() -> None:
    """Reconnecting with Last-Event-ID replays what was missed, ``recovered: true`` per
    channel, also through the ``last_event_id`` query parameter."""
    async with serve() as server:
        tok = token("u1")
        async with sse(server, tok, channels=("news:a",)) as stream:
            await stream.message("subscribed")
            await publish(server, "news:a")
            await stream.message("notification")
            resume = stream.last_id
        missed = [await publish(server, "news:a"), await publish(server, "user:u1")]
        async with sse(server, tok, last_id=resume) as stream:
            await stream.message("connected")
            replies: dict[str, dict[str, Any]] = {}
            events: list[dict[str, Any]] = []
            while len(replies) < 2 or len(events) < 2:
                event = (await stream.next())["data"]
                if event["type"] == "subscribed":
                    replies[event["data"]["channel"]] = event["data"]
                elif event["type"] == "notification":
                    events.append(event)
            assert replies["news:a"]["recovered"] is True
            assert replies["user:u1"]["recovered"] is True
            assert sorted((e["channel"], e["offset"]) for e in events) == sorted(
                (m["channel"], m["offset"]) for m in missed
            )
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                server.http_url + "/sse", params={"token": tok, "last_event_id": resume}
            ) as response,
        ):
            stream = SseStream(response)
            reply = await stream.message("subscribed")
            assert "recovered" in reply["data"]["data"]


async def test_recovered_false_when_history_is_gone() -> None:
    """A resume token from another epoch recovers with ``recovered: false``."""
    async with serve() as server:
        tok = token("u1")
        async with sse(server, tok, channels=("news:a",)) as stream:
            await stream.message("subscribed")
        stale = (
            base64.urlsafe_b64encode(json.dumps([["news:a", 5, "gone-epoch"]]).encode())
            .decode()
            .rstrip("=")
        )
        async with sse(server, tok, last_id=stale) as stream:
            reply = await stream.message("subscribed")
            assert reply["data"]["data"]["recovered"] is False


async def test_commands_subscribe_unsubscribe_refresh() -> None:
    """POST /sse/commands subscribes, unsubscribes and refreshes; replies come on the
    stream with the command's id and the POST answers 202."""
    async with serve() as server:
        tok = token("u1")
        async with sse(server, tok) as stream:
            session_id = (await stream.message("connected"))["data"]["data"]["connection_id"]
            status, body = await command(
                server,
                session_id,
                {"type": "subscribe", "id": "s1", "data": {"channel": "news:b"}},
                tok,
            )
            assert (status, body) == (202, {"status": "accepted"})
            reply = await stream.message("subscribed")
            assert reply["data"]["id"] == "s1"
            result = await publish(server, "news:b")
            assert (await stream.message("notification"))["data"]["offset"] == result["offset"]
            fresh = token("u1", ttl=7200)
            status, _ = await command(
                server, session_id, {"type": "refresh", "id": "r1", "data": {"token": fresh}}, tok
            )
            assert status == 202
            assert (await stream.message("refreshed"))["data"]["id"] == "r1"
            status, _ = await command(
                server,
                session_id,
                {"type": "unsubscribe", "id": "u1", "data": {"channel": "news:b"}},
                fresh,
            )
            assert status == 202
            assert (await stream.message("unsubscribed"))["data"]["id"] == "u1"
            assert "news:b" not in {e[0] for e in _decode(stream.last_id)}


async def test_bad_inputs_answer_4xx_json_without_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Garbage or deeply nested Last-Event-ID, bad channel, no token, unknown session,
    wrong user or credential, bad or oversize bodies: 4xx JSON, no traceback, no token in
    the log."""
    caplog.set_level(logging.DEBUG)
    async with serve({"limits": {"max_message_bytes": 1000}}) as server:
        tok = token("u1")
        async with aiohttp.ClientSession() as session:
            base = server.http_url + "/sse"
            for params, headers, status in (
                ({"token": tok}, {"Last-Event-ID": "!!garbage!!"}, 400),
                ({"token": tok}, {"Last-Event-ID": "W10K" * 1500}, 400),
                # Base64url JSON nesting past the protocol's 64 levels: 1,100 levels
                # would make json.loads raise RecursionError, 65 are just too deep.
                ({"token": tok}, {"Last-Event-ID": _encode("[" * 1100 + "]" * 1100)}, 400),
                (
                    {
                        "token": tok,
                        "last_event_id": _encode('[["news:a",0,"e"],' + "[" * 64 + "]" * 64 + "]"),
                    },
                    {},
                    400,
                ),
                ({"token": tok, "last_event_id": "e30"}, {}, 400),
                ({"token": tok, "channel": "no channel"}, {}, 400),
                ({"token": "nope"}, {}, 401),
            ):
                async with session.get(base, params=params, headers=headers) as response:
                    assert response.status == status
                    assert "error" in await response.json()
        async with sse(server, tok) as stream:
            session_id = (await stream.message("connected"))["data"]["data"]["connection_id"]
            ping = {"type": "ping", "id": "p"}
            assert (await command(server, "c_" + "0" * 24, ping, tok))[0] == 404
            assert (await command(server, "nonsense", ping, tok))[0] == 400
            assert (await command(server, session_id, ping, None))[0] == 401
            assert (await command(server, session_id, ping, "bad.token.x"))[0] == 401
            assert (await command(server, session_id, ping, token("u2")))[0] == 403
            big = {"type": "ping", "id": "p", "data": {"pad": "x" * 5000}}
            assert (await command(server, session_id, big, tok))[0] == 413
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    base + "/commands",
                    data=b"{not json",
                    headers={"Authorization": f"Bearer {tok}"},
                ) as response,
            ):
                assert response.status == 400
                assert (await response.json())["error"]["code"] == "invalid_request"
            assert (await command(server, session_id, ping, tok))[0] == 202
            assert (await stream.message("pong"))["data"]["id"] == "p"
    assert not [r for r in caplog.records if r.exc_info]
    # Access lines are redacted by the server's log handler, which caplog bypasses.
    assert not [r for r in caplog.records if r.name != "aiohttp.access" and tok in r.getMessage()]


async def test_slow_consumer_ends_the_stream() -> None:
    """Past limits.send_buffer_bytes the stream ends with a close event 1013."""
    async with (
        serve({"limits": {"send_buffer_bytes": 20_000}}) as server,
        sse(server, token("u1")) as stream,
    ):
        await stream.message("connected")
        gateway = server.gateway
        peer = next(gateway.hub.connections())
        assert isinstance(peer, SsePeer)
        event = {"channel": "user:u1", "type": "blob", "data": {"blob": "x" * 1000}}
        # The client reads nothing until the server has given up on it.
        for _ in range(2000):
            status, answer = await api(server, "POST", "/api/batch", {"events": [event] * 50})
            assert status == 200, answer
            if peer.close_request is not None:
                break
        assert peer.close_request is not None
        assert (await stream.closed(timeout=scaled(20)))["code"] == 1013


async def test_token_expiry_closes_4401() -> None:
    """An expired token ends the stream with ``unauthorized`` and close 4401."""
    async with serve({"auth": {"leeway": 0}}) as server, sse(server, token("u1", ttl=1)) as stream:
        await stream.message("connected")
        assert (await stream.message("error"))["data"]["data"]["code"] == "unauthorized"
        assert (await stream.closed())["code"] == 4401


async def test_drain_closes_1001_and_refuses_new_streams() -> None:
    """Drain ends every stream with 1001 and new SSE connections get 503 JSON."""
    async with serve() as server, sse(server, token("u1")) as stream:
        await stream.message("connected")
        server.gateway.begin_drain()
        assert (await stream.closed())["code"] == 1001
        async with (
            aiohttp.ClientSession() as session,
            session.get(server.http_url + "/sse", params={"token": token("u1")}) as response,
        ):
            assert response.status == 503
        assert await server.gateway.wait_idle(TIMEOUT)


async def test_connection_limit_applies() -> None:
    """SSE streams count against limits.max_connections_per_user (429 JSON)."""
    async with (
        serve({"limits": {"max_connections_per_user": 1}}) as server,
        sse(server, token("u1")) as stream,
    ):
        await stream.message("connected")
        async with (
            aiohttp.ClientSession() as session,
            session.get(server.http_url + "/sse", params={"token": token("u1")}) as response,
        ):
            assert response.status == 429
            assert (await response.json())["error"]["code"] == "rate_limited"


async def test_cross_node_command_is_relayed() -> None:
    """A POST that lands on another node (same Redis) is relayed to the session's node:
    the reply comes on the stream; unknown sessions there are 404."""
    async with (
        prefix_scope(REDIS_URL) as prefix,
        redis_node(REDIS_URL, prefix) as one,
        redis_node(REDIS_URL, prefix) as two,
    ):
        tok = token("u1")
        async with sse(one, tok) as stream:
            session_id = (await stream.message("connected"))["data"]["data"]["connection_id"]
            assert "." in session_id
            status, body = await command(
                two,
                session_id,
                {"type": "subscribe", "id": "x1", "data": {"channel": "news:z"}},
                tok,
            )
            assert (status, body) == (202, {"status": "accepted"})
            assert (await stream.message("subscribed"))["data"]["id"] == "x1"

            async def delivered() -> bool:
                await publish(two, "news:z")
                with contextlib.suppress(TimeoutError):
                    await stream.message("notification", timeout=0.5)
                    return True
                return False

            await eventually(delivered)
            assert (await command(two, session_id, {"type": "ping"}, token("u2")))[0] == 403
            other = session_id.rpartition(".")[0][:-1] + "0." + session_id.rpartition(".")[2]
            if other != session_id:
                assert (await command(two, other, {"type": "ping"}, tok))[0] == 404


async def test_sse_path_is_configurable_and_can_be_off() -> None:
    """``server.sse_path`` moves the endpoint; empty turns SSE off (404 JSON); a path
    without a leading '/' is a configuration error."""
    async with serve({"server": {"sse_path": ""}}) as server:
        status, body = await api(server, "GET", "/sse?token=" + token("u1"), key=None)
        assert status == 404 and body["error"]["code"] == "not_found"
    async with (
        serve({"server": {"sse_path": "/events"}}) as server,
        aiohttp.ClientSession() as session,
        session.get(server.http_url + "/events", params={"token": token("u1")}) as response,
    ):
        assert response.status == 200
        assert (await SseStream(response).next())["data"]["type"] == "connected"
    with pytest.raises(ConfigError):
        make_settings({"server": {"sse_path": "events"}})


async def test_more_channels_than_the_limit_is_400() -> None:
    """``channel`` parameters and resume-token channels together are bounded by
    ``limits.max_subscriptions`` (plus the personal channel): 400 JSON past it."""
    async with (
        serve({"limits": {"max_subscriptions": 1}}) as server,
        aiohttp.ClientSession() as session,
        session.get(
            server.http_url + "/sse",
            params=[("token", token("u1")), ("channel", "news:a"), ("channel", "news:b")],
        ) as response,
    ):
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "invalid_request"
