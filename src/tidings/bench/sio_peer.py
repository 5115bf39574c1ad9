"""The python-socketio peer: the incumbent Python choice, in aiohttp mode on uvloop.

Run as ``python -m tidings.bench.sio_peer --port 0`` (needs the ``bench`` extra); it
prints ``listening on http://...``. Clients speak Engine.IO/Socket.IO v4 over a WebSocket
(``/socket.io/?EIO=4&transport=websocket``); an event ``subscribe`` with
``{"channel": ...}`` joins that room and is answered with a ``subscribed`` event;
``POST /api/batch`` (the Tidings body shape) emits each event to its channel's room once,
with python-socketio's own encode-once path (no callbacks). No auth.
"""

from __future__ import annotations

import importlib
import time
from typing import Any

import msgspec
from aiohttp import web

from tidings.bench.peerproc import run_peer

__all__ = ["build_app", "main"]

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


def build_app() -> web.Application:
    socketio: Any = importlib.import_module("socketio")
    sio = socketio.AsyncServer(
        async_mode="aiohttp",
        cors_allowed_origins="*",
        logger=False,
        engineio_logger=False,
        max_http_buffer_size=16 * 1024 * 1024,
    )
    app = web.Application(client_max_size=16 * 1024 * 1024)
    sio.attach(app)
    offsets = {"n": 0}

    async def subscribe(sid: str, data: Any) -> None:
        channel = data.get("channel", "") if isinstance(data, dict) else str(data)
        await sio.enter_room(sid, channel)
        await sio.emit("subscribed", {"channel": channel}, to=sid)

    sio.on("subscribe", subscribe)

    async def batch(request: web.Request) -> web.Response:
        body = _decoder.decode(await request.read())
        results = []
        for event in body["events"]:
            offsets["n"] += 1
            offset = offsets["n"]
            channel = event["channel"]
            await sio.emit(
                event["type"],
                {
                    "channel": channel,
                    "offset": offset,
                    "id": f"evt_{offset:028x}",
                    "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "data": event.get("data", {}),
                },
                room=channel,
            )
            results.append({"channel": channel, "offset": offset})
        return web.Response(
            body=_encoder.encode({"results": results}), content_type="application/json"
        )

    app.router.add_post("/api/batch", batch)
    return app


def main(argv: list[str] | None = None) -> None:
    run_peer("python -m tidings.bench.sio_peer", build_app, argv)


if __name__ == "__main__":
    main()
