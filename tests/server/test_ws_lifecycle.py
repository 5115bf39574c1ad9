"""Handshake and close codes end to end (protocol sections 1, 7 and 8) on a real server.

Each test starts a server on 127.0.0.1 port 0 and talks to it with a real WebSocket
client (aiohttp), or, for the slow reader, with a raw TCP socket doing the handshake by hand.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import struct
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from helpers import (
    SECRET,
    TIMEOUT,
    api,
    connect,
    publish,
    serve,
    token,
    ws_assert_open,
    ws_bare,
    ws_checked,
    ws_until_close,
)
from raw_ws import OP_CLOSE, OP_TEXT, RawClient
from tidings.auth import mint_token
from tidings.server import RunningServer

# -- helpers local to this file ----------------------------------------------------------


class _AnyTimestamp:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and len(other) == 24 and other.endswith("Z")


ANY_TIMESTAMP: Any = _AnyTimestamp()


async def _metric(server: RunningServer, name: str) -> float:
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.http_url + "/metrics") as response,
    ):
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- close 1013: a reader that is too slow ---------------------------------------------


async def test_slow_reader_closed_1013_others_unaffected() -> None:
    """A client that stops reading is closed with 1013 while a normal subscriber of the
    same channel still receives every event in order."""
    async with (
        serve({"limits": {"send_buffer_bytes": 16384}}) as server,
        connect(server, token("fast", ("bulk:*",))) as fast,
    ):
        assert (await fast.subscribe("bulk:feed"))["type"] == "subscribed"
        slow = await RawClient.open(server, token("slow", ("bulk:*",)), rcvbuf=4096)
        try:
            assert (await slow.recv())["type"] == "connected"
            await slow.send({"type": "subscribe", "id": "s", "data": {"channel": "bulk:feed"}})
            assert (await slow.recv())["type"] == "subscribed"
            # From here on the slow client never reads.
            blob = "x" * 1000
            event = {"channel": "bulk:feed", "type": "blob", "data": {"blob": blob}}
            per_batch = 8  # 8 KB per write: well under the fast client's 16 KiB buffer
            offsets: list[int] = []
            published = 0
            for _ in range(2000):
                status, answer = await api(
                    server, "POST", "/api/batch", {"events": [event] * per_batch}
                )
                assert status == 200, answer
                published += per_batch
                while len(offsets) < published:
                    message = await fast.recv()
                    assert message["type"] == "blob", message
                    offsets.append(message["offset"])
                if await _metric(server, "tidings_slow_consumer_closes_total") >= 1:
                    break
            else:
                raise AssertionError("the slow reader was never closed")
            assert offsets == list(range(1, published + 1))
            # The slow socket ends with a close frame 1013 behind the events it was sent.
            frames = await slow.read_to_end()
            closes = [payload for opcode, payload in frames if opcode == OP_CLOSE]
            assert closes and struct.unpack("!H", closes[0][:2])[0] == 1013
            assert all(opcode in (OP_TEXT, OP_CLOSE) for opcode, _ in frames)
        finally:
            slow.close()
        # The fast subscriber is still live.
        result = await publish(server, "bulk:feed", "blob", {"blob": "last"})
        message = await fast.recv()
        assert message["offset"] == result["offset"] == published + 1
        status, channels = await api(server, "GET", "/api/channels?prefix=bulk:")
        assert channels == {"channels": [{"channel": "bulk:feed", "subscribers": 1}]}


# -- handshake ---------------------------------------------------------------------------

LEEWAY_0 = {"auth": {"leeway": 0}}


def _bad_token(kind: str) -> str | None:
    now = time.time()
    if kind == "missing":
        return None
    if kind == "malformed":
        return "this-is.not-a.jwt"
    if kind == "expired":
        return mint_token(SECRET, "user-1", channels=("news:*",), ttl=10, now=now - 100)
    if kind == "not_yet_valid":
        return mint_token(SECRET, "user-1", channels=("news:*",), extra={"nbf": int(now) + 3600})
    if kind == "wrong_signature":
        return mint_token("another-secret-0123456789-abcdefghijkl", "user-1", channels=("news:*",))
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("missing", "missing"),
        ("malformed", "malformed"),
        ("expired", "expired"),
        ("not_yet_valid", "not yet valid"),
        ("wrong_signature", "signature"),
    ],
)
async def test_bad_token_gets_one_error_then_4401(kind: str, reason: str) -> None:
    """A bad token completes the upgrade, gets exactly one unauthorized error, then 4401,
    and a command sent right away is not acted on."""
    async with serve(LEEWAY_0) as server, ws_bare(server, _bad_token(kind)) as ws:
        with contextlib.suppress(ConnectionError):
            await ws.send_str(
                json.dumps({"type": "subscribe", "id": "s1", "data": {"channel": "news:today"}})
            )
        messages, code = await ws_until_close(ws)
        assert code == 4401
        assert len(messages) == 1, messages
        (error,) = messages
        assert error["type"] == "error"
        assert error["data"]["code"] == "unauthorized"
        assert reason in error["data"]["message"]
        assert "id" not in error
        status, channels = await api(server, "GET", "/api/channels")
        assert (status, channels) == (200, {"channels": []})


async def test_token_in_authorization_header() -> None:
    """A token in an ``Authorization: Bearer`` header is accepted instead of ``?token=``."""
    async with (
        serve() as server,
        connect(server, token("hdr"), welcome=False, query=False) as client,
    ):
        hello = await client.recv()
        assert hello["type"] == "connected"
        assert hello["data"]["user_id"] == "hdr"
        await ws_assert_open(client)


ORIGINS = {"server": {"allowed_origins": ["https://app.example"]}}


async def test_disallowed_origin_refused_with_403() -> None:
    """An Origin outside ``server.allowed_origins`` is refused with HTTP 403, no upgrade."""
    async with serve(ORIGINS) as server:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with ws_bare(server, token(), origin="https://evil.example"):
                pass
        assert refused.value.status == 403
        headers = {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
            "Origin": "https://evil.example",
        }
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{server.ws_url}?token={token()}", headers=headers) as response,
        ):
            assert response.status == 403
            body = await response.json()
        assert body["error"]["code"] == "forbidden"
        assert isinstance(body["error"]["message"], str)


async def test_allowed_origin_connects() -> None:
    """An Origin on the allow-list connects normally."""
    async with (
        serve(ORIGINS) as server,
        connect(server, token(), origin="https://app.example") as client,
    ):
        await ws_assert_open(client)


async def test_no_origin_header_connects() -> None:
    """A client without an Origin header (not a browser) connects despite an allow-list."""
    async with serve(ORIGINS) as server, connect(server, token()) as client:
        await ws_assert_open(client)


async def test_plain_get_without_upgrade_is_4xx_json() -> None:
    """A plain GET on the WebSocket path is answered with a 4xx JSON error."""
    async with serve() as server:
        status, body = await api(server, "GET", server.settings.server.path, key=None)
        assert 400 <= status < 500
        assert body["error"]["code"] == "invalid_request"
        assert isinstance(body["error"]["message"], str)


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-WebSocket-Version": "99", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="},
        {"Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "too-short"},
        {"Sec-WebSocket-Version": "13"},
    ],
)
async def test_broken_upgrade_request_is_4xx_json(headers: dict[str, str]) -> None:
    """An upgrade request that fails the WebSocket handshake rules gets a JSON 426, before
    any authentication, and registers nothing."""
    async with serve() as server, aiohttp.ClientSession() as session:
        url = f"{server.ws_url}?token={token()}".replace("ws://", "http://", 1)
        async with session.get(
            url, headers={"Upgrade": "websocket", "Connection": "Upgrade", **headers}
        ) as response:
            assert response.status == 426
            body = await response.json()
        assert body["error"]["code"] == "invalid_request"
        assert server.gateway.hub.connection_count() == 0


# -- close codes -------------------------------------------------------------------------


async def test_client_close_is_1000_and_server_forgets_connection() -> None:
    """A client's normal close completes with 1000 and the server drops the connection."""
    async with serve() as server:
        async with connect(server, token()) as client:
            await ws_assert_open(client)
            await client.ws.close()
            assert client.ws.close_code == 1000
        assert await server.gateway.wait_idle(TIMEOUT)
        assert await _metric(server, "tidings_connections") == 0


async def test_shutdown_closes_with_1001() -> None:
    """Leaving the ``serve()`` block while a client is connected closes it with 1001."""
    async with contextlib.AsyncExitStack() as stack:
        async with serve() as server:
            client = await stack.enter_async_context(connect(server, token()))
            await ws_assert_open(client)
            closing = asyncio.create_task(ws_until_close(client.ws))
        messages, code = await asyncio.wait_for(closing, TIMEOUT)
        assert code == 1001
        assert messages == []


async def test_message_too_big_closes_1009() -> None:
    """A message over ``limits.max_message_bytes`` closes the connection with 1009."""
    async with (
        serve({"limits": {"max_message_bytes": 1024}}) as server,
        connect(server, token()) as client,
    ):
        await ws_assert_open(client)
        padding = "x" * 2048
        await client.ws.send_str(json.dumps({"type": "ping", "data": {"pad": padding}}))
        messages, code = await ws_until_close(client.ws)
        assert code == 1009
        assert messages == []


async def test_unexpected_fault_closes_1011(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception escaping the read loop closes the connection with 1011; the server
    keeps serving other connections."""
    async with serve() as server:

        async def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("bug")

        async with connect(server, token("a", ("news:*",))) as client:
            monkeypatch.setattr(server.gateway, "handle", broken)
            await client.send("ping", id="p")
            messages, code = await ws_until_close(client.ws)
            assert code == 1011
            assert messages == []
        monkeypatch.undo()
        async with connect(server, token("b")) as other:
            await ws_assert_open(other)


def _expiring_token(sub: str, seconds: float) -> tuple[str, float]:
    exp = time.time() + seconds
    return mint_token(SECRET, sub, extra={"exp": exp}), exp


async def test_token_expiry_sends_unauthorized_then_4401() -> None:
    """When the token expires the server sends ``unauthorized`` saying so, then 4401."""
    tok, _ = _expiring_token("short", 0.8)
    async with serve(LEEWAY_0) as server, connect(server, tok) as client:
        messages, code = await ws_until_close(client.ws)
        assert code == 4401
        assert [m["type"] for m in messages] == ["error"]
        assert messages[0]["data"]["code"] == "unauthorized"
        assert "expired" in messages[0]["data"]["message"]


async def test_refresh_with_another_sub_closes_4401() -> None:
    """A ``refresh`` whose token has another ``sub`` gets ``unauthorized`` and close 4401."""
    async with serve() as server, connect(server, token("alice")) as client:
        await client.send("refresh", {"token": token("mallory")}, id="r1")
        messages, code = await ws_until_close(client.ws)
        assert code == 4401
        assert len(messages) == 1
        assert messages[0]["type"] == "error"
        assert messages[0]["id"] == "r1"
        assert messages[0]["data"]["code"] == "unauthorized"


async def test_refresh_keeps_connection_alive_past_old_expiry() -> None:
    """A successful ``refresh`` answers ``refreshed`` with the new expiry and the
    connection outlives the old token, while one that did not refresh is closed."""
    short, exp = _expiring_token("renew", 1.0)
    async with (
        serve(LEEWAY_0) as server,
        connect(server, short) as kept,
        connect(server, short) as control,
    ):
        new_exp = int(time.time()) + 3600
        fresh = mint_token(SECRET, "renew", extra={"exp": new_exp})
        await kept.send("refresh", {"token": fresh}, id="r")
        reply = await kept.recv()
        assert reply["type"] == "refreshed"
        assert reply["id"] == "r"
        assert reply["data"] == {
            "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(new_exp))
        }
        # The control connection shares the old expiry: its 4401 proves it has passed.
        messages, code = await ws_until_close(control.ws)
        assert code == 4401
        assert [m["data"]["code"] for m in messages] == ["unauthorized"]
        assert time.time() >= exp
        await ws_assert_open(kept)


async def test_api_disconnect_closes_4403() -> None:
    """POST /api/disconnect closes every connection of that user with 4403, no one else's."""
    async with (
        serve() as server,
        connect(server, token("banned")) as first,
        connect(server, token("banned")) as second,
        connect(server, token("bystander")) as other,
    ):
        closing = [asyncio.create_task(ws_until_close(c.ws)) for c in (first, second)]
        status, body = await api(
            server, "POST", "/api/disconnect", {"user_id": "banned", "reason": "logout"}
        )
        assert status == 200, body
        for task in closing:
            messages, code = await task
            assert code == 4403
            assert messages == []
        await ws_assert_open(other)


HEARTBEAT = {"server": {"heartbeat_interval": 0.2, "heartbeat_timeout": 0.2}}


async def test_heartbeat_timeout_closes_4408() -> None:
    """A client that never answers protocol pings is closed with 4408."""
    async with serve(HEARTBEAT) as server, ws_bare(server, token(), autoping=False) as ws:
        pings = 0
        while True:
            msg = await asyncio.wait_for(ws.receive(), TIMEOUT)
            if msg.type is aiohttp.WSMsgType.PING:
                pings += 1  # deliberately not answered
            elif msg.type is aiohttp.WSMsgType.TEXT:
                assert ws_checked(msg.data)["type"] == "connected"
            else:
                break
        assert ws.close_code == 4408
        assert pings >= 1


async def test_answering_pings_keeps_connection_open() -> None:
    """A client that answers protocol pings (autoping) stays connected over many intervals."""
    async with (
        serve(HEARTBEAT) as server,
        connect(server, token("steady")) as steady,
        ws_bare(server, token("watcher"), autoping=False) as watcher,
    ):
        # aiohttp answers pings only while someone reads: keep a receive() pending.
        reading = asyncio.create_task(steady.ws.receive())
        # The watcher answers by hand, so that the test can count the server's pings.
        pings = 0
        while pings < 6:
            msg = await asyncio.wait_for(watcher.receive(), TIMEOUT)
            if msg.type is aiohttp.WSMsgType.PING:
                pings += 1
                await watcher.pong(msg.data)
            else:
                assert msg.type is aiohttp.WSMsgType.TEXT, msg
        assert not reading.done()
        await steady.send("ping", id="still")
        reply = await asyncio.wait_for(reading, TIMEOUT)
        assert reply.type is aiohttp.WSMsgType.TEXT, reply
        assert ws_checked(reply.data) == {
            "type": "pong",
            "id": "still",
            "timestamp": ANY_TIMESTAMP,
            "data": {},
        }


async def test_too_many_connections_per_user_closes_4429() -> None:
    """A connection beyond ``limits.max_connections_per_user`` is closed with 4429."""
    async with (
        serve({"limits": {"max_connections_per_user": 2}}) as server,
        connect(server, token("busy")) as first,
        connect(server, token("busy")) as second,
        ws_bare(server, token("busy")) as third,
    ):
        messages, code = await ws_until_close(third)
        assert code == 4429
        assert messages == []
        await ws_assert_open(first)
        await ws_assert_open(second)
        async with connect(server, token("someone-else")) as other:
            await ws_assert_open(other)


async def test_handshake_timeout_closes_with_try_again_later() -> None:
    """Authentication that outlasts server.handshake_timeout (a JWKS endpoint that never
    answers) closes with 1013, and the server keeps serving."""
    release = asyncio.Event()

    async def stalled(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"keys": []})

    app = web.Application()
    app.router.add_get("/jwks", stalled)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    overrides = {
        "auth": {
            "algorithms": ["RS256"],
            "secret": "",
            "jwks_url": f"http://127.0.0.1:{port}/jwks",
            "jwks_timeout": 30,
        },
        "server": {"handshake_timeout": 0.2},
    }
    try:
        async with serve(overrides) as server:
            rs_token = base64.urlsafe_b64encode(b'{"alg":"RS256","kid":"k1"}').rstrip(b"=")
            fake = rs_token.decode() + ".eyJzdWIiOiJ1In0.c2ln"
            async with ws_bare(server, fake) as ws:
                msg = await ws.receive(timeout=TIMEOUT)
                assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1013
            status, _ = await api(server, "GET", "/healthz", key=None)
            assert status == 200
    finally:
        release.set()
        await runner.cleanup()
