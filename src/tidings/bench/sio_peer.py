"""The python-socketio peer: the incumbent Python choice, in aiohttp mode on uvloop.

Run as ``python -m tidings.bench.sio_peer --port 0`` (needs the ``bench`` extra); it
prints ``listening on http://...``. Clients speak Engine.IO/Socket.IO v4 over a WebSocket
(``/socket.io/?EIO=4&transport=websocket``); an event ``subscribe`` with
``{"channel": ...}`` joins that room and is answered with a ``subscribed`` event;
``POST /api/batch`` (the Tidings body shape) emits each event to its channel's room once,
with python-socketio's own encode-once path (no callbacks). No auth.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import signal
import time
from typing import Any

import msgspec
from aiohttp import web

__all__ = ["build_app", "main"]

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


def build_app() -> web.Application:
    socketio: Any = importlib.import_module("socketio")
    sio = socketio.AsyncServer(async_mode="aiohttp", cors_allowed_origins="*",
                               logger=False, engineio_logger=False,
                               max_http_buffer_size=16 * 1024 * 1024)
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
            await sio.emit(event["type"], {
                "channel": channel, "offset": offset, "id": f"evt_{offset:028x}",
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "data": event.get("data", {}),
            }, room=channel)
            results.append({"channel": channel, "offset": offset})
        return web.Response(body=_encoder.encode({"results": results}),
                            content_type="application/json")

    app.router.add_post("/api/batch", batch)
    return app


async def _serve(host: str, port: int) -> None:
    runner = web.AppRunner(build_app(), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    print(f"listening on http://{host}:{runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tidings.bench.sio_peer")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
