"""Graceful shutdown: readiness fails first, then every client gets 1001."""

from __future__ import annotations

import asyncio

import aiohttp

from helpers import connect, make_settings, token, ws_assert_open
from tidings.server import RunningServer, running
from timeouts import TIMEOUT


async def test_readiness_fails_before_clients_are_closed() -> None:
    """During the drain delay /readyz answers 503 while connections still work; then they
    are closed with 1001 and the server stops."""
    settings = make_settings({"server": {"drain_delay": 0.5}})
    stop = asyncio.Event()
    started: asyncio.Future[RunningServer] = asyncio.get_running_loop().create_future()

    async def run() -> None:
        async with running(settings) as server:
            started.set_result(server)
            await stop.wait()

    task = asyncio.create_task(run())
    server = await asyncio.wait_for(started, TIMEOUT)
    async with aiohttp.ClientSession() as http, connect(server, token("u")) as client:
        async with http.get(server.http_url + "/readyz") as response:
            assert response.status == 200
        stop.set()
        for _ in range(500):  # bounded: each round is one real request
            async with http.get(server.http_url + "/readyz") as response:
                if response.status == 503:
                    break
        else:
            raise AssertionError("readiness never failed during the drain")
        await ws_assert_open(client)
        assert await client.expect_close() == 1001
    await asyncio.wait_for(task, TIMEOUT)
