"""Log lines an operator reads: listening, draining and stopped (JSON from a real
``tidings serve``), a drain past its timeout, no access lines for probes that succeed,
slow-consumer closes, Redis lost and restored (one line each, not one per retry), and
worker restarts."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from deploy_support import config_text, free_port, tidings_process, until
from helpers import TIMEOUT, Client, api, serve, token
from raw_ws import RawClient, raw_client
from redis_support import (
    REDIS_URL,
    RedisServer,
    redis_node,
)
from slow_consumer import SLOW, overflow
from tidings.brokers.base import StreamPosition
from tidings.brokers.memory import MemoryBroker

pytestmark = pytest.mark.timeout(60)


def _messages(lines: list[dict[str, object]], start: str) -> list[str]:
    return [str(line["msg"]) for line in lines if str(line["msg"]).startswith(start)]


async def test_listening_draining_and_stopped_lines_are_json(tmp_path: Path) -> None:
    """A production server logs, as JSON on standard error, where it listens (both
    listeners, the mode, the broker), how many connections it drains on SIGTERM, and
    that it stopped."""
    port, internal = free_port(), free_port()
    async with tidings_process(
        tmp_path, config_text(port, internal_port=internal), port=port
    ) as tidings:

        async def logged_listening() -> bool:
            return bool(_messages(tidings.log(), "listening on"))

        await until(logged_listening, TIMEOUT, "the listening line")
        (listening,) = _messages(tidings.log(), "listening on")
        assert f"http://127.0.0.1:{port}" in listening
        assert f"http://127.0.0.1:{internal}" in listening
        assert "production mode" in listening and "broker memory://" in listening
        url = f"ws://127.0.0.1:{port}/ws?token={token('u1')}"
        async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
            assert (await Client(ws).recv())["type"] == "connected"
            tidings.sigterm()
            assert await Client(ws).expect_close() == 1001
        assert await tidings.terminate() == 0
    lines = tidings.log()
    assert lines, tidings.stderr()
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    assert _messages(lines, "draining 1 connections")
    stopped = _messages(lines, "stopped")
    assert len(stopped) == 1
    messages = [str(line["msg"]) for line in lines]
    assert (
        messages.index(listening)
        < messages.index(_messages(lines, "draining")[0])
        < messages.index(stopped[0])
    )


async def test_listening_line_hides_the_broker_password(tmp_path: Path) -> None:
    """The broker URL in the listening line (and every other line) has no password."""
    port, redis_port = free_port(), free_port()  # nothing listens on redis_port
    broker = f"redis://:hunter2-not-logged@127.0.0.1:{redis_port}/0"
    config = config_text(port, broker=broker).replace("[broker]\n", "[broker]\ntimeout = 0.3\n")
    async with tidings_process(tmp_path, config, port=port) as tidings:

        async def logged_listening() -> bool:
            return bool(_messages(tidings.log(), "listening on"))

        await until(logged_listening, TIMEOUT, "the listening line")
        assert await tidings.terminate() == 0
    (listening,) = _messages(tidings.log(), "listening on")
    assert f"broker redis://:***@127.0.0.1:{redis_port}/0" in listening
    assert "hunter2" not in tidings.stderr()


class _StalledBroker(MemoryBroker):
    """A memory broker whose personal-channel lookups hang until ``release`` is set, as
    a stalled Redis would keep a connection in its handshake."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def position(self, channel: str) -> StreamPosition:
        self.entered.set()
        await self.release.wait()
        return await super().position(channel)


async def test_a_drain_that_outlasts_the_shutdown_timeout_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A connection still in its handshake when shutdown_timeout runs out (its broker
    stalled) gives one warning saying how many were left, and the server still logs
    that it stopped."""
    caplog.set_level(logging.INFO)
    broker = _StalledBroker()
    async with serve({"server": {"shutdown_timeout": 0.2}}, broker=broker) as server:
        stuck = await RawClient.open(server, token("stuck"))
        await asyncio.wait_for(broker.entered.wait(), TIMEOUT)
    stuck.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "tidings.server"]
    late = [r for r in caplog.records if "still open" in r.getMessage()]
    assert [r.getMessage() for r in late] == [
        "1 connections still open after the shutdown timeout (0.2 s)"
    ], messages
    assert late[0].levelno == logging.WARNING
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert messages.index(late[0].getMessage()) < next(
        i for i, m in enumerate(messages) if m.startswith("stopped")
    )


async def test_probes_and_scrapes_that_succeed_get_no_access_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """/healthz, /readyz and /metrics answering 200 write no access line (they come every
    few seconds); other requests do, and so does /readyz failing while the node drains."""
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    async with serve({"server": {"internal_port": 0}}) as server, aiohttp.ClientSession() as http:
        for url in (
            f"{server.api_url}/healthz",
            f"{server.api_url}/readyz",
            f"{server.api_url}/metrics",
            f"{server.http_url}/client/tidings.js",
            f"{server.api_url}/no-such-path",
        ):
            async with http.get(url) as answer:
                await answer.read()
        server.gateway.draining = True  # as on SIGTERM
        async with http.get(f"{server.api_url}/readyz") as answer:
            assert answer.status == 503
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert [line.split('"')[1] for line in lines] == [
        "GET /client/tidings.js HTTP/1.1",
        "GET /no-such-path HTTP/1.1",
        "GET /readyz HTTP/1.1",
    ], lines
    assert '" 503 ' in lines[-1]


async def test_slow_consumer_close_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A subscriber closed with 1013 for reading too slowly gets one warning naming the
    connection and the user."""
    caplog.set_level(logging.WARNING, logger="tidings")
    async with (
        serve(SLOW) as server,
        raw_client(server, token("slowpoke", ("bulk:*",)), rcvbuf=4096) as slow,
    ):
        await slow.send({"type": "subscribe", "id": "s", "data": {"channel": "bulk:feed"}})
        assert (await slow.recv())["type"] == "subscribed"
        await overflow(server, "bulk:feed")
        _, code = await slow.until_close()
        assert code == 1013
    lines = [r for r in caplog.records if "slow consumer" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelno == logging.WARNING
    assert "user slowpoke" in lines[0].getMessage() and "1013" in lines[0].getMessage()


async def test_redis_lost_and_restored_are_one_line_each(
    redis_servers: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    """Redis killed and started again: one warning that the connection was lost and one
    line that it was restored, however many reconnection attempts came between."""
    caplog.set_level(logging.DEBUG, logger="tidings")
    redis = redis_servers()
    await redis.start()
    async with redis_node(redis.url, "t-logs", overrides={"broker": {"timeout": 0.3}}) as node:

        async def ready(expected: int) -> bool:
            status, _ = await api(node, "GET", "/readyz", key=None)
            return status == expected

        await until(lambda: ready(200), 10, "readiness")
        redis.kill()
        await until(lambda: ready(503), 10, "readiness failing")

        async def retried() -> bool:
            # Debug lines, one per failed pub/sub attempt: several must have happened.
            return sum("pub/sub connection lost" in r.getMessage() for r in caplog.records) >= 3

        await until(retried, 15, "several reconnection attempts")
        await redis.start()
        await until(lambda: ready(200), 15, "readiness back")
    lost = [r for r in caplog.records if r.getMessage().startswith("lost the connection")]
    restored = [r for r in caplog.records if "restored" in r.getMessage()]
    assert len(lost) == 1 and lost[0].levelno == logging.WARNING, lost
    assert len(restored) == 1 and restored[0].levelno == logging.INFO, restored
    assert f"127.0.0.1:{redis.port}" in lost[0].getMessage()


async def test_worker_restart_is_logged(redis_prefix: str, tmp_path: Path) -> None:
    """--workers 2 (sharing the public and the internal port): a worker killed with
    SIGKILL gives a JSON warning that it exited and is restarted, and a line once it is
    back."""
    port, internal = free_port(), free_port()
    # The top-level key goes above the first section.
    config = "workers = 2\n" + config_text(port, internal_port=internal, broker=REDIS_URL).replace(
        "[broker]\n", f'[broker]\nprefix = "{redis_prefix}"\n'
    )
    async with tidings_process(tmp_path, config, port=port) as tidings:
        # "tidings: worker 1 ready (pid 1234)", printed before the listening line.
        ready = [line.split() for line in tidings.stdout if line.startswith("tidings: worker")]
        assert len(ready) == 2, tidings.stdout
        index, victim = ready[0][2], int(ready[0][-1].rstrip(")"))
        os.kill(victim, signal.SIGKILL)

        async def restarted() -> bool:
            return bool(_messages(tidings.log(), f"worker {index} restarted"))

        await until(restarted, 20, "the worker restart line")
        exited = [line for line in tidings.log() if "exited with status" in str(line["msg"])]
        assert len(exited) == 1 and exited[0]["level"] == "warning", exited
        assert exited[0]["msg"].startswith(
            f"worker {index} (pid {victim}) exited with status -9; restarting in"
        )
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{internal}/readyz") as answer,
        ):
            assert answer.status == 200
        assert await tidings.terminate() == 0
