"""A real HTTP receiver for presence webhooks, which checks every signature."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tidings.webhooks import verify
from timeouts import TIMEOUT

__all__ = ["SECRET", "Receiver", "receiver"]

#: The signing secret the receiver verifies with.
SECRET = "hook-secret-0123456789"


@dataclass
class Receiver:
    """A real HTTP receiver that answers ``statuses`` in turn (then 200)."""

    statuses: list[int] = field(default_factory=list)
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""
    arrived: asyncio.Queue[tuple[dict[str, str], bytes]] = field(default_factory=asyncio.Queue)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        entry = (dict(request.headers), body)
        self.requests.append(entry)
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            self.arrived.put_nowait(entry)
        return web.Response(status=status)

    async def next(self) -> tuple[dict[str, str], dict[str, Any]]:
        async with asyncio.timeout(TIMEOUT):
            headers, body = await self.arrived.get()
        assert verify(SECRET, headers["Tidings-Timestamp"], body, headers["Tidings-Signature"])
        return headers, json.loads(body)


@contextlib.asynccontextmanager
async def receiver(*statuses: int) -> AsyncIterator[Receiver]:
    """A ``Receiver`` listening on 127.0.0.1 (its ``url``), stopped afterwards."""
    hooks = Receiver(list(statuses))
    app = web.Application()
    app.router.add_post("/hooks", hooks.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        hooks.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hooks"
        yield hooks
    finally:
        await runner.cleanup()
