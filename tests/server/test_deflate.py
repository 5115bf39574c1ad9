"""permessage-deflate (RFC 7692): negotiation, the frame codec, shared compressed fan-out
and bounded inflating, through the real server where it matters."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
import zlib
from typing import Any

from fakes import FakeConn
from helpers import connect, publish, serve, token
from raw_ws import OP_TEXT, RawClient, frame_bytes
from tidings.bench.deflate import measure
from tidings.hub import Hub
from tidings.protocol.deflate import (
    MIN_DEFLATE_BYTES,
    deflate_frame,
    deflate_frames,
    negotiate,
)
from tidings.protocol.wire import ping_frame, text_frame
from timeouts import TIMEOUT

NEWS = ("news:*",)
ON = {"server": {"permessage_deflate": True}}
OFFER = "permessage-deflate; client_max_window_bits"
ACCEPTED = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


def _inflate(payload: bytes) -> bytes:
    """What a receiver does with an RSV1 payload (RFC 7692 section 7.2.2)."""
    return zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")


def _compressed_client_frame(payload: bytes) -> bytes:
    """A masked client text frame with RSV1 set and ``payload`` deflated."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = (packer.compress(payload) + packer.flush(zlib.Z_SYNC_FLUSH))[:-4]
    frame = bytearray(frame_bytes(OP_TEXT, packed))
    frame[0] |= 0x40
    return bytes(frame)


async def _raw_deflate(server: Any, tok: str) -> RawClient:
    """A raw client that negotiated deflate (``connected`` not yet read)."""
    client, head = await RawClient.request(server, tok, headers={"Sec-WebSocket-Extensions": OFFER})
    assert head.startswith(b"HTTP/1.1 101"), head
    assert f"sec-websocket-extensions: {ACCEPTED}".encode() in head.lower(), head
    return client


async def _raw_message(client: RawClient) -> tuple[bool, dict[str, Any]]:
    """The next server text frame: whether it was compressed (RSV1), and its message."""
    while (parsed := _parse_rsv(client)) is None:
        await client._fill()
    first, payload = parsed
    assert first & 0x0F == OP_TEXT, (first, payload)
    compressed = bool(first & 0x40)
    value: dict[str, Any] = json.loads(_inflate(payload) if compressed else payload)
    return compressed, value


def _parse_rsv(client: RawClient) -> tuple[int, bytes] | None:
    """Like ``RawClient._parse`` but keeping the first header byte (RSV bits)."""
    buf = client.buffer
    if len(buf) < 2:
        return None
    first = buf[0]
    parsed = client._parse()
    return None if parsed is None else (first, parsed[1])


# -- codec and negotiation ----------------------------------------------------------------


def test_deflate_frame_round_trips_and_leaves_small_and_control_frames() -> None:
    """A large text frame gets RSV1 and inflates back; small and control frames, and
    every frame of a joined write, are handled frame by frame."""
    payload = json.dumps({"type": "n", "data": ["abc" * 200]}).encode()
    packed = deflate_frame(text_frame(payload))
    assert packed[0] == 0xC1 and len(packed) < len(payload)
    length = packed[1] & 0x7F
    start = 2 if length < 126 else 4
    assert _inflate(packed[start:]) == payload
    small = text_frame(b"x" * (MIN_DEFLATE_BYTES - 1))
    assert deflate_frame(small) == small
    assert deflate_frame(ping_frame()) == ping_frame()
    big = text_frame(b"y" * 70_000)
    joined = deflate_frames(small + big + ping_frame())
    assert joined.startswith(small) and joined.endswith(ping_frame())
    middle = joined[len(small) : -len(ping_frame())]
    assert middle[0] == 0xC1 and _inflate(middle[2:]) == b"y" * 70_000


def test_negotiate_accepts_what_it_can_honour_and_declines_the_rest() -> None:
    """Offers with parameters the server cannot honour are declined, a later acceptable
    offer wins, and no offer means no extension."""
    assert negotiate(None) is None
    assert negotiate("x-webkit-deflate-frame") is None
    assert negotiate("permessage-deflate") == ACCEPTED
    assert negotiate(OFFER) == ACCEPTED
    assert negotiate("permessage-deflate; client_max_window_bits=10") == ACCEPTED
    assert negotiate("permessage-deflate; server_max_window_bits=15") == (
        ACCEPTED + "; server_max_window_bits=15"
    )
    assert negotiate("permessage-deflate; server_max_window_bits=10") is None
    assert (
        negotiate("permessage-deflate; server_max_window_bits=10, permessage-deflate") == ACCEPTED
    )
    assert negotiate("permessage-deflate; client_max_window_bits=16") is None
    assert negotiate("permessage-deflate; server_no_context_takeover=1") is None
    assert negotiate("permessage-deflate; unknown") is None
    assert (
        negotiate("permessage-deflate; server_no_context_takeover; server_no_context_takeover")
        is None
    )


# -- fan-out --------------------------------------------------------------------------------


async def test_hub_compresses_each_frame_once_for_all_deflate_subscribers() -> None:
    """Two deflate subscribers and a plain one: each frame is compressed once, the
    deflate ones share the compressed write, the plain one gets the plain frames, and
    several frames of a tick stay one write."""
    calls: list[bytes] = []

    def counting(frame: bytes) -> bytes:
        calls.append(frame)
        return deflate_frame(frame)

    hub: Hub[FakeConn] = Hub(compress=counting)
    conns = [FakeConn("a", deflate=True), FakeConn("b", deflate=True), FakeConn("c")]
    for conn in conns:
        hub.add_connection(conn)
        hub.subscribe(conn, "news:x", hold=False)
    frames = [text_frame(json.dumps({"n": i, "pad": "z" * 300}).encode()) for i in (1, 2)]
    hub.deliver("news:x", 1, frames[0])
    hub.deliver("news:x", 2, frames[1])
    hub.flush()
    assert calls == frames
    expected = b"".join(deflate_frame(f) for f in frames)
    assert conns[0].writes == [expected] and conns[1].writes == [expected]
    assert conns[2].writes == [b"".join(frames)]
    # Nobody negotiated deflate: nothing is compressed.
    plain: Hub[FakeConn] = Hub(compress=counting)
    only = FakeConn("d")
    plain.add_connection(only)
    plain.subscribe(only, "news:y", hold=False)
    plain.deliver("news:y", 1, frames[0])
    plain.flush()
    assert len(calls) == 2 and only.writes == [frames[0]]


# -- through the real server ------------------------------------------------------------------


async def test_deflate_clients_and_plain_client_get_the_same_events() -> None:
    """Two clients that negotiated deflate (aiohttp and raw) and a plain one receive the
    same event; the raw one sees it compressed and the reply too."""
    async with serve(ON) as server:
        tok = token("reader", NEWS)
        raw = await _raw_deflate(server, tok)
        try:
            _, hello = await _raw_message(raw)
            assert hello["type"] == "connected"
            async with connect(server, tok, compress=15) as zipped, connect(server, tok) as plain:
                assert zipped.ws.compress == 15 and plain.ws.compress == 0
                for client in (zipped, plain):
                    assert (await client.subscribe("news:d"))["type"] == "subscribed"
                await raw.send({"type": "subscribe", "id": "s", "data": {"channel": "news:d"}})
                _, reply = await _raw_message(raw)
                assert reply["type"] == "subscribed", reply
                data = {"message": "m" * 500, "level": "info"}
                result = await publish(server, "news:d", data=data)
                for client in (zipped, plain):
                    event = await client.recv()
                    assert event["id"] == result["id"] and event["data"] == data
                compressed, event = await _raw_message(raw)
                assert compressed and event["id"] == result["id"] and event["data"] == data
        finally:
            raw.close()


async def test_compressed_client_commands_and_replay() -> None:
    """A raw client sending RSV1 frames gets its replies, and a recovery replay arrives
    compressed and in order."""
    async with serve(ON) as server:
        tok = token("reader", NEWS)
        async with connect(server, tok, compress=15) as client:
            reply = await client.subscribe("news:r")
            epoch = reply["data"]["epoch"]
        missed = [
            await publish(server, "news:r", data={"message": f"m{i}" * 40, "level": "info"})
            for i in range(3)
        ]
        raw = await _raw_deflate(server, tok)
        try:
            await _raw_message(raw)
            command = {
                "type": "subscribe",
                "id": "r",
                "data": {"channel": "news:r", "recover": {"offset": 0, "epoch": epoch}},
            }
            await raw.send_raw(_compressed_client_frame(json.dumps(command).encode()))
            compressed, reply = await _raw_message(raw)
            assert reply["type"] == "subscribed" and reply["data"]["recovered"], reply
            assert compressed
            for result in missed:
                compressed, event = await _raw_message(raw)
                assert compressed and event["id"] == result["id"]
            await raw.send_raw(
                _compressed_client_frame(json.dumps({"type": "ping", "id": "p"}).encode())
            )
            _, pong = await _raw_message(raw)
            assert pong["type"] == "pong"
        finally:
            raw.close()


async def _inflated_close(server: Any, text: bytes) -> tuple[list[tuple[int, bytes]], int]:
    raw = await _raw_deflate(server, token("reader", NEWS))
    try:
        await _raw_message(raw)
        await raw.send_raw(_compressed_client_frame(text))
        return await raw.until_close()
    finally:
        raw.close()


async def test_inflate_bomb_closes_1009_with_bounded_memory() -> None:
    """A 50 KB frame inflating to 50 MB closes 1009, and the server never holds much
    more than the message limit while inflating it."""
    async with serve(ON) as server:
        bomb = b'{"type":"ping","id":"' + b"a" * 50_000_000 + b'"}'
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            baseline = tracemalloc.get_traced_memory()[0]
            frames, code = await _inflated_close(server, bomb)
            peak = tracemalloc.get_traced_memory()[1] - baseline
        finally:
            tracemalloc.stop()
        assert code == 1009 and frames == []
        assert peak < 8 * 1024 * 1024, peak


async def test_inflated_size_limit_is_exact() -> None:
    """An inflated message of exactly ``max_message_bytes`` is handled, one byte more
    closes 1009, as for uncompressed messages."""
    limit = 1000
    async with serve({**ON, "limits": {"max_message_bytes": limit}}) as server:
        ping = b'{"type":"ping","id":"p"}'
        raw = await _raw_deflate(server, token("reader", NEWS))
        try:
            await _raw_message(raw)
            await raw.send_raw(_compressed_client_frame(ping + b" " * (limit - len(ping))))
            _, pong = await _raw_message(raw)
            assert pong["type"] == "pong"
        finally:
            raw.close()
        frames, code = await _inflated_close(server, ping + b" " * (limit + 1 - len(ping)))
        assert code == 1009 and frames == []


async def test_errors_are_compressed_too() -> None:
    """An ``error`` reply and the ``unauthorized`` error of a refused token reach a
    deflate client compressed."""
    async with serve(ON) as server:
        raw = await _raw_deflate(server, token("reader", NEWS))
        try:
            compressed, hello = await _raw_message(raw)
            assert hello["type"] == "connected" and compressed
            await raw.send_raw(
                _compressed_client_frame(
                    json.dumps(
                        {"type": "subscribe", "id": "bad", "data": {"channel": "no such"}}
                    ).encode()
                )
            )
            compressed, error = await _raw_message(raw)
            assert error["type"] == "error" and compressed, error
        finally:
            raw.close()
        raw = await _raw_deflate(server, "not-a-token")
        try:
            compressed, error = await _raw_message(raw)
            assert error["type"] == "error" and compressed, error
            _, code = await raw.until_close()
            assert code == 4401
        finally:
            raw.close()


async def test_deflate_off_or_declined_offer_means_no_extension() -> None:
    """With the key off (the default) an offer is ignored and RSV1 from the client is a
    protocol error; with it on, an offer the server cannot honour is declined."""
    async with serve() as server:
        client, head = await RawClient.request(
            server, token("reader", NEWS), headers={"Sec-WebSocket-Extensions": OFFER}
        )
        try:
            assert head.startswith(b"HTTP/1.1 101") and b"extensions" not in head.lower()
            opcode, _ = await client.frame()
            assert opcode == OP_TEXT
            await client.send_raw(_compressed_client_frame(b'{"type":"ping"}'))
            _, code = await client.until_close()
            assert code == 1002
        finally:
            client.close()
    async with serve(ON) as server:
        client, head = await RawClient.request(
            server,
            token("reader", NEWS),
            headers={"Sec-WebSocket-Extensions": "permessage-deflate; server_max_window_bits=9"},
        )
        client.close()
        assert head.startswith(b"HTTP/1.1 101") and b"extensions" not in head.lower()
        async with connect(server, token("reader", NEWS)) as plain:
            assert plain.ws.compress == 0
            await plain.send("ping", id="x")
            assert (await asyncio.wait_for(plain.recv(), TIMEOUT))["type"] == "pong"


def test_deflate_bench_reports_both_modes() -> None:
    """The bench's short run reports every delivery in both modes, negotiated only
    when on, and fewer bytes on the wire with deflate."""
    off, on = measure(3, 20)
    assert (off.deflate, off.negotiated, on.deflate, on.negotiated) == (False, 0, True, 3)
    assert off.deliveries == on.deliveries == 60
    assert on.wire_bytes < off.wire_bytes
