"""Request heads must complete within ``server.handshake_timeout``; nothing else is cut.

Raw sockets against a real server with a short deadline. Absence of a close is shown by
ordering, not by waiting: a connection that would have been cut is checked only after
a later-started partial head has been cut, so its own deadline had passed too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator

import pytest

from helpers import API_KEY, TIMEOUT, connect, serve, token
from tidings.server import RunningServer

pytestmark = pytest.mark.timeout(30)

#: The injected deadline for request heads (and token checks) in these tests.
DEADLINE = 0.3

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def raw(server: RunningServer) -> AsyncIterator[Stream]:
    """A plain TCP connection to the server, closed on exit."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def closed_without_answer(reader: asyncio.StreamReader) -> None:
    """The server closes the socket without writing anything (bounded by TIMEOUT)."""
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length: its status and body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    status = int(head.split(b" ", 2)[1])
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    assert length is not None, head
    body = await asyncio.wait_for(reader.readexactly(int(length.group(1))), TIMEOUT)
    return status, body


def head_timeouts(server: RunningServer) -> float:
    """The value of tidings_request_head_timeouts_total as the server renders it."""
    text = server.gateway.metrics.render().decode()
    found = re.search(r"^tidings_request_head_timeouts_total (\S+)$", text, re.M)
    assert found is not None, text
    return float(found.group(1))


async def cut_partial_head(server: RunningServer) -> None:
    """Open a connection, send half a head and wait until the server cuts it."""
    async with raw(server) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        await closed_without_answer(reader)


GET_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


async def test_partial_heads_are_closed_and_counted() -> None:
    """Sockets that send nothing, part of a request line or an upgrade head without its
    blank line are closed once the deadline passes, and each is counted."""
    partials = [
        b"",
        b"GET /ws?tok",
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Le",
    ]
    async with (
        serve({"server": {"handshake_timeout": DEADLINE}}) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        streams = [await stack.enter_async_context(raw(server)) for _ in partials]
        for (_, writer), partial in zip(streams, partials, strict=True):
            writer.write(partial)
        await asyncio.gather(*(closed_without_answer(reader) for reader, _ in streams))
        assert head_timeouts(server) == len(partials)
        # The server goes on answering complete requests.
        async with raw(server) as (reader, writer):
            writer.write(GET_HEALTHZ)
            status, _ = await read_response(reader)
            assert status == 200
        assert head_timeouts(server) == len(partials)


async def test_dripped_head_is_cut_although_bytes_keep_arriving() -> None:
    """A head sent one byte at a time is closed at the deadline: arriving bytes do not
    extend it."""
    async with (
        serve({"server": {"handshake_timeout": DEADLINE}}) as server,
        raw(server) as (reader, writer),
    ):
        writer.write(b"GET /ws HTTP/1.1\r\nX-Drip: ")
        sent = 0
        # Each pause is a wait for the close itself, so the drip ends as soon as the
        # server acts; the bound keeps the header line far below aiohttp's line limit.
        while sent < 500:
            try:
                assert await asyncio.wait_for(reader.read(), DEADLINE / 10) == b""
                break
            except TimeoutError:
                writer.write(b"a")
                sent += 1
        else:
            pytest.fail("the dripping connection was never closed")
        assert head_timeouts(server) == 1


async def test_keep_alive_heads_are_timed_from_their_first_byte() -> None:
    """After a response, an idle keep-alive connection stays open past the deadline,
    while a second head left unfinished is cut."""
    async with (
        serve({"server": {"handshake_timeout": DEADLINE}}) as server,
        raw(server) as (idle_reader, idle_writer),
        raw(server) as (reader, writer),
    ):
        for stream_reader, stream_writer in ((idle_reader, idle_writer), (reader, writer)):
            stream_writer.write(GET_HEALTHZ)
            status, _ = await read_response(stream_reader)
            assert status == 200
        writer.write(b"GET /healthz HTTP/1.1\r\nHo")
        await closed_without_answer(reader)
        assert head_timeouts(server) == 1
        # The idle connection's response came before that partial head was sent: had
        # idle time been timed, this connection would be closed by now.
        idle_writer.write(GET_HEALTHZ)
        status, _ = await read_response(idle_reader)
        assert status == 200
        assert head_timeouts(server) == 1


async def test_slow_body_is_not_cut() -> None:
    """A complete head whose body arrives after the deadline is served normally."""
    body = json.dumps(
        {"channel": "news:a", "type": "notification", "data": {"message": "slow", "level": "info"}}
    ).encode()
    head = (
        f"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    async with (
        serve({"server": {"handshake_timeout": DEADLINE}}) as server,
        raw(server) as (reader, writer),
    ):
        writer.write(head)
        # Each time, a partial head started later has been cut: the body's pieces come
        # more than a deadline after the head and after each other.
        for piece in (body[:5], body[5:]):
            await cut_partial_head(server)
            writer.write(piece)
        status, answer = await read_response(reader)
        assert status == 200, answer
        assert json.loads(answer)["results"][0]["channel"] == "news:a"
        assert head_timeouts(server) == 2


async def test_websocket_outlives_the_deadline() -> None:
    """An established WebSocket connection is not closed by the head deadline."""
    async with (
        serve({"server": {"handshake_timeout": DEADLINE}}) as server,
        connect(server, token("long-lived")) as client,
    ):
        await cut_partial_head(server)
        await client.send("ping", id="p")
        assert (await client.recv())["type"] == "pong"
        assert head_timeouts(server) == 1
