"""Shared test helpers: settings, tokens, a real WebSocket client and API calls."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp

from tidings.auth import mint_token
from tidings.config import Settings, load_settings
from tidings.server import RunningServer, running
from timeouts import TIMEOUT, scaled

__all__ = [
    "API_KEY",
    "SECRET",
    "TIMEOUT",
    "Client",
    "api",
    "connect",
    "line_starting",
    "make_settings",
    "publish",
    "scaled",
    "serve",
    "token",
    "ws_assert_open",
    "ws_bare",
    "ws_checked",
    "ws_until_close",
]

SECRET = "test-secret-0123456789-abcdefghijklmnop"
API_KEY = "test-api-key-0123456789"


def make_settings(overrides: Mapping[str, Any] | None = None) -> Settings:
    """Production-mode settings on 127.0.0.1 port 0 with a known secret and API key."""
    base: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "mode": "production", "shutdown_timeout": 5},
        # Tests that are not about the connect-time hold of the personal channel want
        # its live events at once; the hold's own tests switch it on.
        "auth": {"secret": SECRET, "personal_channel_hold": 0},
        "api": {"keys": [API_KEY]},
        "logging": {"level": "debug"},
    }
    for section, values in (overrides or {}).items():
        if isinstance(values, Mapping) and isinstance(base.get(section), dict):
            base[section] = {**base[section], **values}
        else:
            base[section] = values
    return load_settings(None, base, environ={})


def token(
    sub: str = "user-1", channels: tuple[str, ...] = (), ttl: float = 3600, **extra: Any
) -> str:
    return mint_token(SECRET, sub, channels=channels, ttl=ttl, extra=extra or None)


@contextlib.asynccontextmanager
async def serve(
    overrides: Mapping[str, Any] | None = None, **kwargs: Any
) -> AsyncIterator[RunningServer]:
    async with running(make_settings(overrides), **kwargs) as server:
        yield server


class Client:
    """A real WebSocket client speaking the Tidings protocol."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def send(
        self, kind: str, data: Mapping[str, Any] | None = None, id: str | None = None
    ) -> None:
        message: dict[str, Any] = {"type": kind}
        if data is not None:
            message["data"] = dict(data)
        if id is not None:
            message["id"] = id
        await self.ws.send_str(json.dumps(message))

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        msg = await asyncio.wait_for(self.ws.receive(), timeout)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            raise AssertionError(f"expected a text frame, got {msg.type} {msg.data!r}")
        value: dict[str, Any] = json.loads(msg.data)
        return value

    async def expect_close(self, timeout: float = TIMEOUT) -> int | None:
        """Read until the server closes; return the close code."""
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), timeout)
            if msg.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.CLOSING,
            ):
                return self.ws.close_code
            if msg.type is aiohttp.WSMsgType.ERROR:
                return self.ws.close_code

    async def subscribe(self, channel: str, id: str = "s", **data: Any) -> dict[str, Any]:
        await self.send("subscribe", {"channel": channel, **data}, id=id)
        return await self.recv()


@contextlib.asynccontextmanager
async def connect(
    server: RunningServer,
    tok: str | None = None,
    *,
    welcome: bool = True,
    headers: Mapping[str, str] | None = None,
    query: bool = True,
    **kwargs: Any,
) -> AsyncIterator[Client]:
    url = server.ws_url
    if tok is not None and query:
        url += f"?token={tok}"
    hdrs = dict(headers or {})
    if tok is not None and not query:
        hdrs["Authorization"] = f"Bearer {tok}"
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(
            url,
            headers=hdrs,
            autoping=True,
            timeout=aiohttp.ClientWSTimeout(ws_close=TIMEOUT),
            **kwargs,
        ) as ws,
    ):
        client = Client(ws)
        if welcome:
            hello = await client.recv()
            assert hello["type"] == "connected", hello
        yield client


async def api(
    server: RunningServer, method: str, path: str, body: Any = None, key: str | None = API_KEY
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, server.http_url + path, json=body, headers=headers) as response,
    ):
        text = await response.text()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text


async def publish(
    server: RunningServer,
    channel: str,
    kind: str = "notification",
    data: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    body = {
        "channel": channel,
        "type": kind,
        "data": dict(data or {"message": "hi", "level": "info"}),
        **extra,
    }
    status, answer = await api(server, "POST", "/api/publish", body)
    assert status == 200, answer
    result: dict[str, Any] = answer["results"][0]
    return result


# -- WebSocket protocol helpers (tests/server/test_ws_*.py) ------------------------------


def _has_null(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, dict):
        return any(_has_null(item) for item in value.values())
    if isinstance(value, list):
        return any(_has_null(item) for item in value)
    return False


def ws_checked(text: str | bytes) -> dict[str, Any]:
    """Decode one server message and check the envelope rules every message obeys:
    a JSON object with an object ``data`` and no JSON ``null`` anywhere."""
    message = json.loads(text)
    assert isinstance(message, dict), message
    assert isinstance(message.get("data"), dict), message
    assert isinstance(message.get("type"), str), message
    assert not _has_null(message), message
    return message


async def ws_until_close(
    ws: aiohttp.ClientWebSocketResponse, timeout: float = TIMEOUT
) -> tuple[list[dict[str, Any]], int | None]:
    """Every text message until the server closes, and the close code it sent.

    The code is read from the close frame itself: aiohttp replaces ``close_code`` with
    1006 when its closing reply cannot be written because the server already shut the
    socket, which says nothing about the code the server sent.
    """
    messages: list[dict[str, Any]] = []
    while True:
        msg = await asyncio.wait_for(ws.receive(), timeout)
        if msg.type is aiohttp.WSMsgType.TEXT:
            messages.append(ws_checked(msg.data))
        elif msg.type is aiohttp.WSMsgType.CLOSE:
            return messages, int(msg.data)
        elif msg.type in (
            aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.CLOSING,
            aiohttp.WSMsgType.ERROR,
        ):
            return messages, ws.close_code
        else:
            raise AssertionError(f"unexpected frame {msg.type} {msg.data!r}")


async def ws_assert_open(client: Client, id: str = "alive") -> None:
    """Prove a connection is open and idle: an application ``ping`` gets its ``pong`` as
    the very next message."""
    await client.send("ping", id=id)
    reply = ws_checked(json.dumps(await client.recv()))
    assert reply["type"] == "pong", reply
    assert reply.get("id") == id, reply


@contextlib.asynccontextmanager
async def ws_bare(
    server: RunningServer, tok: str | None, **kwargs: Any
) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """A bare aiohttp WebSocket (welcome not read) for tests that need its options."""
    url = server.ws_url + (f"?token={tok}" if tok is not None else "")
    async with aiohttp.ClientSession() as session, session.ws_connect(url, **kwargs) as ws:
        yield ws


async def line_starting(
    stream: asyncio.StreamReader, starts: str, timeout: float = scaled(20)
) -> str:
    """The next line of a subprocess's output that starts with ``starts`` (stripped);
    fails when the output ends first or after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            raw = await stream.readline()
            if not raw:
                raise AssertionError(f"output ended before a line starting {starts!r}")
            line = raw.decode().strip()
            if line.startswith(starts):
                return line
