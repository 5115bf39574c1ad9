"""Fixtures and helpers for tests against a real Redis.

``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) names the shared Redis. Every test
gets its own key prefix and removes only the keys under it. When Redis is unreachable
the tests are skipped, unless ``TIDINGS_REQUIRE_REDIS=1`` (CI), where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import redis.asyncio as aioredis

from helpers import Client, api, make_settings, serve
from tidings.brokers.presence_table import PresenceChange
from tidings.brokers.redis import RedisBroker
from tidings.server import RunningServer
from timeouts import TIMEOUT

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_REDIS = os.environ.get("TIDINGS_REQUIRE_REDIS") == "1"

#: Short delays for tests: detection and reconnection within tenths of a second.
FAST: dict[str, Any] = {
    "sync_interval": 0.05,
    "ping_interval": 0.2,
    "reconnect_delay": (0.02, 0.2),
    "node_ttl": 2.0,
}

T = TypeVar("T")


def unavailable(reason: str) -> None:
    """Skip, or fail when Redis is required."""
    if REQUIRE_REDIS:
        pytest.fail(f"{reason} (TIDINGS_REQUIRE_REDIS=1)")
    pytest.skip(reason)


async def _reachable(url: str) -> bool:
    client = aioredis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(await client.ping())
    except (OSError, aioredis.RedisError):
        return False
    finally:
        await client.aclose()


async def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key under ``prefix:`` (and nothing else)."""
    client = aioredis.Redis.from_url(url, socket_timeout=2)
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}:*", count=500):
            batch.append(key)
            if len(batch) >= 500:
                await client.delete(*batch)
                batch.clear()
        if batch:
            await client.delete(*batch)
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def prefix_scope(url: str = REDIS_URL) -> AsyncIterator[str]:
    """A key prefix unique to one test; its keys are deleted afterwards.

    Skips the test (fails it with ``TIDINGS_REQUIRE_REDIS=1``) when Redis is unreachable.
    Test modules wrap this in their ``redis_prefix`` fixture.
    """
    if not await _reachable(url):
        unavailable(f"Redis not reachable at {url}")
    prefix = f"t-{uuid.uuid4().hex}"
    try:
        yield prefix
    finally:
        await delete_prefix(url, prefix)


@contextlib.asynccontextmanager
async def client_scope(url: str = REDIS_URL) -> AsyncIterator[aioredis.Redis]:
    """A plain client, for looking at keys in assertions."""
    client = aioredis.Redis.from_url(url, socket_timeout=2)
    try:
        yield client
    finally:
        await client.aclose()


def broker_settings(url: str, prefix: str, **extra: Any) -> dict[str, Any]:
    """Settings overrides selecting the Redis broker."""
    overrides: dict[str, Any] = dict(extra)
    overrides["broker"] = {"timeout": 0.5, **extra.get("broker", {}), "url": url, "prefix": prefix}
    return overrides


@contextlib.asynccontextmanager
async def redis_node(
    url: str, prefix: str, *, overrides: dict[str, Any] | None = None, **tuning: Any
) -> AsyncIterator[RunningServer]:
    """A gateway node on the Redis broker with short test delays (``tuning`` overrides)."""
    settings_overrides = broker_settings(url, prefix, **(overrides or {}))
    broker = RedisBroker.from_settings(make_settings(settings_overrides), **{**FAST, **tuning})
    async with serve(settings_overrides, broker=broker) as server:
        yield server


async def eventually(
    check: Callable[[], Awaitable[T]], timeout: float = TIMEOUT, interval: float = 0.02
) -> T:
    """Poll ``check`` until it returns a truthy value; fail after ``timeout`` seconds.

    For state that is only observable by asking (Redis keys, cluster-wide views).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last: {value!r})")
        await asyncio.sleep(interval)


# -- a redis-server of our own ---------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    """A redis-server process this test started, on a free port, stopped by PID."""

    directory: Path
    appendonly: bool = False
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server is not installed")
            raise AssertionError("unreachable")
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.directory / "redis.log"),
            "--appendonly",
            "yes" if self.appendonly else "no",
        ]
        if self.appendonly:
            args += ["--appendfsync", "always"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await eventually(self.answers)

    async def answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"redis-server exited with {self.process.returncode}")
        return await _reachable(self.url)

    def kill(self) -> None:
        """``kill -9``: no shutdown, no final save."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait(5)

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@contextlib.contextmanager
def server_scope(directory: Path) -> Iterator[Callable[..., RedisServer]]:
    """Make redis-server processes in ``directory``; every one is stopped afterwards."""
    made: list[RedisServer] = []

    def make(appendonly: bool = False) -> RedisServer:
        server = RedisServer(directory, appendonly=appendonly)
        made.append(server)
        return server

    try:
        yield make
    finally:
        for server in made:
            server.stop()


class Follower:
    """Reads one channel on a client the way an application would.

    It records every event of ``channel`` and checks that offsets only go up. When the
    server says ``unsubscribed`` (``insufficient_state``) it subscribes again with
    ``recover`` from the last offset it has; a ``recovered: false`` answer is counted as
    "the client was told it was not recoverable" and tracking restarts from the answer's
    offset.
    """

    def __init__(self, client: Client, channel: str) -> None:
        self.client = client
        self.channel = channel
        self.epoch = ""
        self.last = 0
        self.events: list[dict[str, Any]] = []
        self.violations: list[str] = []
        self.told_to_resubscribe = 0
        self.not_recovered = 0
        self.recovered = 0
        self.closed: int | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def subscribe(self, recover: dict[str, Any] | None = None) -> dict[str, Any]:
        """Subscribe (before ``start``); return the ``subscribed`` reply."""
        data: dict[str, Any] = {"recover": recover} if recover else {}
        reply = await self.client.subscribe(self.channel, **data)
        assert reply["type"] == "subscribed", reply
        self._subscribed(reply["data"])
        return reply

    def start(self) -> None:
        self._task = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def ids(self) -> list[str]:
        return [event["id"] for event in self.events]

    def _subscribed(self, data: dict[str, Any]) -> None:
        if data.get("recovered") is False:
            self.not_recovered += 1
        elif data.get("recovered") is True:
            self.recovered += 1
        if data.get("recovered") is not True:
            self.last = data["offset"]
        self.epoch = data["epoch"]

    async def _read(self) -> None:
        while True:
            msg = await self.client.ws.receive()
            if msg.type is not aiohttp.WSMsgType.TEXT:
                self.closed = self.client.ws.close_code
                self._changed.set()
                return
            message = json.loads(msg.data)
            kind, data = message["type"], message.get("data", {})
            if message.get("channel") == self.channel and "offset" in message:
                if message["offset"] <= self.last:
                    self.violations.append(f"offset {message['offset']} after {self.last}")
                self.last = message["offset"]
                self.events.append(message)
            elif kind == "subscribed" and data.get("channel") == self.channel:
                self._subscribed(data)
            elif kind == "unsubscribed" and data.get("channel") == self.channel:
                assert data.get("reason") == "insufficient_state", message
                assert data.get("resubscribe") is True, message
                self.told_to_resubscribe += 1
                await self.client.send(
                    "subscribe",
                    {
                        "channel": self.channel,
                        "recover": {"offset": self.last, "epoch": self.epoch},
                    },
                    id="again",
                )
            self._changed.set()

    async def until(self, check: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                if self._task is not None and self._task.done():
                    self._task.result()
                    raise AssertionError("the connection closed")
                self._changed.clear()
                await self._changed.wait()

    def check_delivery(self, acknowledged: list[str]) -> None:
        """Every acknowledged event arrived exactly once, in order, unless the client was
        told it was not recoverable."""
        assert self.violations == []
        assert len(self.ids) == len(set(self.ids)), "an event arrived twice"
        missing = [i for i in acknowledged if i not in set(self.ids)]
        if self.not_recovered == 0:
            assert missing == []
            positions = [self.ids.index(i) for i in acknowledged]
            assert positions == sorted(positions)


class Producer:
    """Publishes ``count`` events at a steady rate; a 503 is retried with the same key."""

    def __init__(
        self,
        server: RunningServer,
        count: int,
        interval: float = 0.02,
        *,
        channel: str = "news:fault",
        key_prefix: str = "k",
    ) -> None:
        self.server = server
        self.channel = channel
        self.key_prefix = key_prefix
        self.count = count
        self.interval = interval
        self.acked: list[dict[str, Any]] = []
        self.unavailable = 0
        self._progress = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        for i in range(self.count):
            body = {
                "channel": self.channel,
                "type": "notification",
                "idempotency_key": f"{self.key_prefix}{i}",
                "data": {"message": f"event {i}", "level": "info"},
            }
            while True:
                status, answer = await api(self.server, "POST", "/api/publish", body)
                if status == 200:
                    break
                assert status == 503, answer
                self.unavailable += 1
                self._progress.set()
                await asyncio.sleep(self.interval)  # the client's retry pace
            self.acked.append(answer["results"][0])
            self._progress.set()
            await asyncio.sleep(self.interval)  # the steady publishing rate

    async def until_acked(self, count: int, timeout: float = TIMEOUT) -> None:
        async with asyncio.timeout(timeout):
            while len(self.acked) < count:
                self._progress.clear()
                await self._progress.wait()

    async def until_unavailable(self) -> None:
        """Wait until a publish has answered 503 (the outage was seen)."""
        async with asyncio.timeout(TIMEOUT):
            while not self.unavailable:
                self._progress.clear()
                await self._progress.wait()

    @property
    def ids(self) -> list[str]:
        return [result["id"] for result in self.acked]

    def check_offsets(self) -> None:
        """A retried key never made a second offset: offsets are exactly 1..count."""
        assert [result["offset"] for result in self.acked] == list(range(1, self.count + 1))


class NullHandler:
    """A broker handler for a node with nothing subscribed."""

    def on_event(
        self, channel: str, offset: int, epoch: str, payload: bytes, trace: str | None = None
    ) -> None: ...
    def on_continuity_lost(self, channel: str) -> None: ...
    def on_disconnect_user(self, user_id: str, reason: str) -> None: ...
    def local_channels(self) -> dict[str, int]:
        return {}

    def local_presence(self, channel: str) -> dict[str, int]:
        return {}

    def on_presence(self, channel: str, payload: bytes) -> None: ...
    def on_presence_change(self, change: PresenceChange) -> None: ...
