"""WebSocket transport hardening (issue 11, points 1, 5, 6 and 9) on a real server.

Each case starts a server on 127.0.0.1 port 0 and speaks raw frames over a TCP (or TLS)
socket, because a WebSocket library would mask, answer or hide exactly what is tested:
a reader that stops reading, unmasked frames, the exact message-size boundary and
handshakes with pre-RFC protocol versions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from aiohttp._websocket.reader import WebSocketDataQueue
from aiohttp.base_protocol import BaseProtocol

from helpers import TIMEOUT, serve, token, ws_checked
from raw_ws import (
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawClient,
    frame_bytes,
    raw_client,
    upgrade_request,
)
from slow_consumer import CAP, ONE_WRITE, SLOW, metric, overflow
from tidings.server import RunningServer
from tidings.transport import websocket
from tidings.transport.frames import MaskCheckingReader
from tidings.transport.websocket import WsConnection
from tls_support import self_signed

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Nothing a client does in this module may log an error or a traceback."""
    yield
    # get_records: after the yield, caplog.records holds the teardown's records only.
    bad = [r for r in caplog.get_records("call") if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


def command(kind: str, id: str, size: int | None = None) -> bytes:
    """A command as UTF-8 JSON, padded to exactly ``size`` bytes when given."""
    body = json.dumps({"type": kind, "id": id, "data": {"pad": ""}}).encode()
    if size is None:
        return body
    assert size >= len(body), size
    return json.dumps({"type": kind, "id": id, "data": {"pad": "x" * (size - len(body))}}).encode()


class TlsRawClient(RawClient):
    """The same over TLS: asyncio's TLS layer reads ahead of the test only up to the
    stream's buffer limit, and then the client's socket stops being read too."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buffer = b""

    @classmethod
    async def open_tls(
        cls, server: RunningServer, tok: str, context: ssl.SSLContext, rcvbuf: int
    ) -> TlsRawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (server.host, server.port))
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=context, server_hostname=server.host, limit=rcvbuf
        )
        client = cls(reader, writer)
        await client.send_raw(upgrade_request(server, tok))
        head = await client.response_head()
        assert head.startswith(b"HTTP/1.1 101"), head
        return client

    async def _recv(self) -> bytes:
        return await self.reader.read(65536)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


def _closes(server: RunningServer, code: int) -> float:
    return metric(server, "tidings_closes_total", {"code": str(code)})


def _record_finish(monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, dict[str, Any]]:
    """Wrap ``WsConnection.finish``: an event set once a closing handshake has ended,
    and what the server-side transport held when it began and after it ended."""
    done = asyncio.Event()
    seen: dict[str, Any] = {}
    original: Callable[[WsConnection], Awaitable[None]] = WsConnection.finish

    async def finish(self: WsConnection) -> None:
        transport = self._transport
        seen["closing_at_start"] = transport.is_closing()
        seen["buffered_at_start"] = transport.get_write_buffer_size()
        try:
            await original(self)
        finally:
            seen["closing_at_end"] = transport.is_closing()
            seen["buffered_at_end"] = transport.get_write_buffer_size()
            done.set()

    monkeypatch.setattr(WsConnection, "finish", finish)
    return done, seen


# -- 1. a reader too slow reads close 1013 ------------------------------------------------


async def test_slow_reader_reads_every_queued_event_then_close_1013() -> None:
    """A subscriber that stopped reading until the send-buffer cap was passed, and then
    reads again, gets a gap-free prefix of the channel followed by close 1013, and the
    connection ends once it answers the close."""
    async with (
        serve(SLOW) as server,
        raw_client(server, token("slow", ("bulk:*",)), rcvbuf=4096) as slow,
    ):
        await slow.send({"type": "subscribe", "id": "s", "data": {"channel": "bulk:feed"}})
        assert (await slow.recv())["type"] == "subscribed"
        published = await overflow(server, "bulk:feed")
        frames, code = await slow.until_close()
        assert code == 1013
        assert all(opcode == OP_TEXT for opcode, _ in frames)
        offsets = [ws_checked(payload.decode())["offset"] for _, payload in frames]
        assert offsets == list(range(1, len(offsets) + 1))
        assert 0 < len(offsets) <= published
        await slow.send_raw(frame_bytes(OP_CLOSE, struct.pack("!H", 1000)))
        assert await slow.read_to_end() == []
        assert await server.gateway.wait_idle(TIMEOUT)
        assert _closes(server, 1013) == 1


async def test_slow_reader_over_tls_reads_every_queued_event_then_close_1013(
    tmp_path: Path,
) -> None:
    """Over TLS, where the server cannot half-close, a subscriber that fell behind and
    reads again also gets a gap-free prefix of the channel and then close 1013, and the
    connection ends once it answers the close."""
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(cafile=str(cert))
    settings = {**SLOW, "server": {"tls_cert": str(cert), "tls_key": str(key)}}
    async with serve(settings) as server:
        slow = await TlsRawClient.open_tls(server, token("slow", ("bulk:*",)), context, 4096)
        try:
            assert (await slow.recv())["type"] == "connected"
            await slow.send({"type": "subscribe", "id": "s", "data": {"channel": "bulk:feed"}})
            assert (await slow.recv())["type"] == "subscribed"
            await overflow(server, "bulk:feed", context)
            frames, code = await slow.until_close()
            assert code == 1013
            offsets = [ws_checked(payload.decode())["offset"] for _, payload in frames]
            assert offsets and offsets == list(range(1, len(offsets) + 1))
            await slow.send_raw(frame_bytes(OP_CLOSE, struct.pack("!H", 1000)))
            assert await slow.read_to_end() == []
        finally:
            slow.close()
        assert await server.gateway.wait_idle(TIMEOUT)


async def test_reader_that_never_reads_again_is_dropped_after_close_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A subscriber that never reads again keeps its connection, holding no more than the
    cap plus the write that passed it, only until the close timeout; then the socket is
    dropped and its buffer freed."""
    monkeypatch.setattr(websocket, "CLOSE_TIMEOUT", 0.2)
    done, seen = _record_finish(monkeypatch)
    async with (
        serve(SLOW) as server,
        raw_client(server, token("stuck", ("bulk:*",)), rcvbuf=4096) as stuck,
    ):
        await stuck.send({"type": "subscribe", "id": "s", "data": {"channel": "bulk:feed"}})
        assert (await stuck.recv())["type"] == "subscribed"
        await overflow(server, "bulk:feed")
        await asyncio.wait_for(done.wait(), TIMEOUT)
        # The closing handshake began on an open socket (its close frame goes behind the
        # queued events, not away with them), and memory stayed within the cap ...
        assert seen["closing_at_start"] is False
        assert 0 < seen["buffered_at_start"] <= CAP + ONE_WRITE
        # ... and, unread when the close timeout ran out, dropped with the socket.
        assert seen["closing_at_end"] is True
        assert seen["buffered_at_end"] == 0
        frames = await stuck.read_to_end()
        assert OP_CLOSE not in [opcode for opcode, _ in frames]
        assert server.gateway.hub.connection_count() == 0


# -- 5. a message of exactly max_message_bytes is allowed ---------------------------------

LIMIT = 1024


@pytest.mark.parametrize("fragments", [1, 2], ids=["one-frame", "two-fragments"])
async def test_message_of_exactly_max_message_bytes_is_accepted(fragments: int) -> None:
    """A message of exactly ``limits.max_message_bytes`` is handled; one byte more, on the
    same connection, closes it with 1009."""
    async with (
        serve({"limits": {"max_message_bytes": LIMIT}}) as server,
        raw_client(server, token()) as client,
    ):
        for size, id in ((LIMIT, "at"), (LIMIT + 1, "over")):
            payload = command("ping", id, size)
            assert len(payload) == size
            if fragments == 1:
                await client.send_raw(frame_bytes(OP_TEXT, payload))
            else:
                half = size // 2
                await client.send_raw(
                    frame_bytes(OP_TEXT, payload[:half], fin=False)
                    + frame_bytes(OP_CONTINUATION, payload[half:])
                )
            if id == "at":
                reply = await client.recv()
                assert (reply["type"], reply["id"]) == ("pong", "at")
        frames, code = await client.until_close()
        assert code == 1009
        assert frames == []
        assert await server.gateway.wait_idle(TIMEOUT)
        assert _closes(server, 1009) == 1


# -- 6. unmasked client frames fail the connection with 1002 -------------------------------

PING = command("ping", "p")


@pytest.mark.parametrize(
    ("before", "after_handshake"),
    [
        pytest.param(b"", True, id="text"),
        pytest.param(b"", False, id="with-the-request-head"),
        pytest.param(frame_bytes(OP_TEXT, PING), True, id="after-a-masked-frame"),
        pytest.param(
            frame_bytes(OP_TEXT, command("ping", "p", 300)),
            True,
            id="after-a-masked-16-bit-length-frame",
        ),
        pytest.param(
            frame_bytes(OP_TEXT, command("ping", "p", 70000)),
            True,
            id="after-a-masked-64-bit-length-frame",
        ),
    ],
)
async def test_unmasked_text_frame_closes_1002(before: bytes, after_handshake: bool) -> None:
    """An unmasked client frame is not acted on and closes the connection with 1002; the
    masked frames before it in the same stream are still answered."""
    unmasked = frame_bytes(OP_TEXT, command("ping", "bad"), mask=False)
    stream = before + unmasked
    async with serve({"limits": {"max_message_bytes": 100_000}}) as server:
        if after_handshake:
            client_cm = raw_client(server, token())
        else:
            client_cm = raw_client(server, token(), extra=stream)
        async with client_cm as client:
            if after_handshake:
                await client.send_raw(stream)
            frames, code = await client.until_close()
            assert code == 1002
            replies = [json.loads(payload) for _, payload in frames]
            assert [(r["type"], r["id"]) for r in replies] == ([("pong", "p")] if before else [])
            await client.send_raw(frame_bytes(OP_CLOSE, struct.pack("!H", 1002)))
            assert await client.read_to_end() == []
        assert await server.gateway.wait_idle(TIMEOUT)
        assert _closes(server, 1002) == 1


async def test_unmasked_frame_sent_a_byte_at_a_time_closes_1002() -> None:
    """Masked and unmasked frames written one byte per send are told apart all the
    same: the masked ping and control frame are answered, the unmasked one closes 1002."""
    stream = (
        frame_bytes(OP_TEXT, command("ping", "p", 200))
        + frame_bytes(OP_PING, b"hb")
        + frame_bytes(OP_PING, b"x", mask=False)
    )
    async with serve() as server, raw_client(server, token()) as client:
        for index in range(len(stream)):
            await client.send_raw(stream[index : index + 1])
        frames, code = await client.until_close()
        assert code == 1002
        assert [opcode for opcode, _ in frames] == [OP_TEXT, OP_PONG]
        assert json.loads(frames[0][1])["id"] == "p"
        assert frames[1][1] == b"hb"


async def test_mask_check_keeps_at_most_a_header_between_reads() -> None:
    """Fed one byte per read, the mask check passes every masked frame of each length
    form through and carries no more than an incomplete frame header between reads."""
    loop = asyncio.get_running_loop()
    queue = WebSocketDataQueue(BaseProtocol(loop), 2**16, loop=loop)
    reader = MaskCheckingReader(queue, 2**20, False, True)
    stream = b"".join(frame_bytes(OP_TEXT, b"y" * size) for size in (0, 5, 125, 126, 70000))
    for index in range(len(stream)):
        assert reader.feed_data(stream[index : index + 1]) == (False, b"")
        assert len(reader._head) <= 9
    sizes = []
    while queue._buffer:
        sizes.append(len((await queue.read()).data))
    assert sizes == [0, 5, 125, 126, 70000]


# -- 9. handshake refusals ----------------------------------------------------------------


def _parse_response(head: bytes) -> tuple[int, dict[str, str]]:
    status_line, *lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), fields


async def _refusal(server: RunningServer, **kwargs: Any) -> tuple[int, dict[str, str], Any]:
    """Status, headers and JSON body of the answer to a raw upgrade request."""
    client, head = await RawClient.request(server, token(), **kwargs)
    try:
        status, fields = _parse_response(head)
        length = int(fields.get("content-length", "0"))
        with contextlib.suppress(EOFError):
            while len(client.buffer) < length:
                await client._fill()
        return status, fields, json.loads(client.buffer[:length]) if length else None
    finally:
        client.close()


def _assert_upgrade_required(status: int, fields: Mapping[str, str], body: Any) -> None:
    assert status == 426, (status, fields, body)
    assert fields.get("upgrade", "").lower() == "websocket", fields
    assert "upgrade" in fields.get("connection", "").lower(), fields
    assert fields.get("sec-websocket-version") == "13", fields
    assert body["error"]["code"] == "invalid_request", body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@pytest.mark.parametrize("version", ["7", "8"])
async def test_pre_rfc_versions_are_refused_426(version: str) -> None:
    """``Sec-WebSocket-Version`` 7 or 8 (pre-RFC drafts) gets 426 naming version 13 and
    the JSON error, and nothing is registered."""
    async with serve() as server:
        _assert_upgrade_required(*await _refusal(server, version=version))
        assert server.gateway.hub.connection_count() == 0


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"Upgrade": "h2c", "Connection": "keep-alive"}, id="no-upgrade"),
        pytest.param({"Sec-WebSocket-Version": "99"}, id="unknown-version"),
        pytest.param({"Sec-WebSocket-Key": "too-short"}, id="bad-key"),
    ],
)
async def test_426_names_the_upgrade_and_version(headers: dict[str, str]) -> None:
    """Every 426 carries ``Upgrade: websocket`` and ``Sec-WebSocket-Version: 13`` with its
    JSON error body."""
    async with serve() as server:
        _assert_upgrade_required(*await _refusal(server, headers=headers))
        assert server.gateway.hub.connection_count() == 0
