"""The floor: the least a broadcast server on aiohttp + uvloop can do per event.

Run as ``python -m tidings.bench.floor --port 0``; it prints ``listening on http://...``.
No auth (any ``?token=`` is accepted), one broadcast set, no history, no limits. Each
event's frame is built once; the frames of one event-loop tick are joined and written
once into each subscriber's transport. That is the fan-out Tidings adds its protocol,
auth and bookkeeping to, so its figures are the floor Tidings is compared against.

It speaks just enough of the Tidings protocol for the same load generator and publisher
to drive it: a ``connected`` message after the upgrade, a ``subscribed`` reply to any text
message, events with the Tidings envelope, and ``POST /api/batch``.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
import time
from typing import Any

import msgspec
from aiohttp import WSMsgType, web

from tidings.bench.peerproc import run_peer

__all__ = ["Floor", "main"]

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


def _frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", 0x81, n) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


class Floor:
    """The broadcast set and the per-tick coalesced fan-out."""

    def __init__(self) -> None:
        self.subscribers: dict[int, asyncio.Transport] = {}
        self.pending: list[bytes] = []
        self.scheduled = False
        self.offset = 0
        self._ids = itertools.count(1)
        self._second = -1
        self._stamp = ""

    def _timestamp(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int(now * 1000) % 1000:03d}Z"

    def publish(self, channel: str, kind: str, data: Any) -> int:
        self.offset += 1
        payload = _encoder.encode(
            {
                "type": kind,
                "channel": channel,
                "offset": self.offset,
                "id": f"evt_{self.offset:028x}",
                "timestamp": self._timestamp(time.time()),
                "data": data,
            }
        )
        self.pending.append(_frame(payload))
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)
        return self.offset

    def flush(self) -> None:
        self.scheduled = False
        frames, self.pending = self.pending, []
        if not frames:
            return
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        for transport in list(self.subscribers.values()):
            if not transport.is_closing():
                transport.write(data)

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(compress=False, autoping=True)
        await ws.prepare(request)
        transport = request.transport
        if transport is None:
            return ws
        key = next(self._ids)
        transport.write(
            _frame(
                _encoder.encode({"type": "connected", "data": {"connection_id": f"c_{key:016x}"}})
            )
        )
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    self.subscribers[key] = transport
                    transport.write(_frame(b'{"type":"subscribed","id":"s","data":{}}'))
        finally:
            self.subscribers.pop(key, None)
        return ws

    async def batch(self, request: web.Request) -> web.Response:
        body = _decoder.decode(await request.read())
        results = []
        for event in body["events"]:
            channel = event["channel"]
            offset = self.publish(channel, event["type"], event.get("data", {}))
            results.append({"channel": channel, "offset": offset})
        return web.Response(
            body=_encoder.encode({"results": results}), content_type="application/json"
        )


def build_app() -> web.Application:
    floor = Floor()
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_get("/ws", floor.websocket)
    app.router.add_post("/api/batch", floor.batch)
    return app


def main(argv: list[str] | None = None) -> None:
    run_peer("python -m tidings.bench.floor", build_app, argv)


if __name__ == "__main__":
    main()
