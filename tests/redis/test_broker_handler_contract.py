"""The failing-handler contract of ``BrokerHandler`` (tidings.brokers.base), the same for
the memory broker and the Redis broker (real Redis): a handler that raises is logged once
per failed call, the rest of the batch is still delivered, and the publish is still
acknowledged, as its events are committed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping

import pytest

from redis_support import FAST, REDIS_URL, prefix_scope
from tidings.brokers.base import Broker, PublishRequest
from tidings.brokers.memory import MemoryBroker
from tidings.brokers.presence_table import PresenceChange
from tidings.brokers.redis import RedisBroker

CHANNEL = "news:contract"
WAIT = 5.0


class FailingHandler:
    """A ``BrokerHandler`` whose ``on_event`` raises for the offsets in ``failing``."""

    def __init__(self, failing: set[int]) -> None:
        self.failing = failing
        self.offsets: list[int] = []
        self.disconnects: list[str] = []
        self.done = asyncio.Event()
        self.expected = 0

    def on_event(
        self, channel: str, offset: int, epoch: str, payload: bytes, trace: str | None = None
    ) -> None:
        self.offsets.append(offset)
        if len(self.offsets) >= self.expected:
            self.done.set()
        if offset in self.failing:
            raise RuntimeError(f"handler fault at {offset}")

    def on_continuity_lost(self, channel: str) -> None:
        pass

    def on_disconnect_user(self, user_id: str, reason: str) -> None:
        self.disconnects.append(user_id)
        raise RuntimeError("handler fault in on_disconnect_user")

    def on_presence(self, channel: str, payload: bytes) -> None:
        pass

    def on_presence_change(self, change: PresenceChange) -> None:
        pass

    def local_channels(self) -> Mapping[str, int]:
        return {}

    def local_presence(self, channel: str) -> Mapping[str, int]:
        return {}


@contextlib.asynccontextmanager
async def started(kind: str, handler: FailingHandler, prefix: str) -> AsyncIterator[Broker]:
    """A started broker of ``kind`` delivering ``CHANNEL`` into ``handler``."""
    broker: Broker
    if kind == "memory":
        broker = MemoryBroker(history_size=100)
    else:
        broker = RedisBroker(REDIS_URL, prefix=prefix, timeout=1.0, **FAST)
    await broker.start(handler)
    try:
        await broker.subscribe(CHANNEL)
        yield broker
    finally:
        await broker.close()


@pytest.fixture(params=["memory", "redis"])
async def prefix(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, str]]:
    """The broker kind, and a key prefix on the shared Redis for the Redis one."""
    if request.param == "memory":
        yield "memory", ""
        return
    async with prefix_scope() as key_prefix:  # as the redis_prefix fixture
        yield "redis", key_prefix


async def test_a_failing_handler_does_not_stop_the_batch(
    prefix: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """An ``on_event`` that raises mid-batch: the publish is acknowledged with every
    offset, the later events are still delivered, and each failure is logged once."""
    kind, key_prefix = prefix
    handler = FailingHandler({2})
    handler.expected = 4
    requests = [PublishRequest(CHANNEL, "note", {"n": n}) for n in range(4)]
    with caplog.at_level(logging.ERROR):
        async with started(kind, handler, key_prefix) as broker:
            results = await broker.publish(requests)
            async with asyncio.timeout(WAIT):
                await handler.done.wait()
    assert [result.offset for result in results] == [1, 2, 3, 4]
    assert handler.offsets == [1, 2, 3, 4]
    failures = [record for record in caplog.records if "on_event failed" in record.message]
    assert len(failures) == 1 and failures[0].exc_info is not None


async def test_a_failing_disconnect_handler_does_not_fail_the_call(
    prefix: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """An ``on_disconnect_user`` that raises is logged and ``disconnect_user`` returns."""
    kind, key_prefix = prefix
    handler = FailingHandler(set())
    with caplog.at_level(logging.ERROR):
        async with started(kind, handler, key_prefix) as broker:
            await broker.disconnect_user("pat", "logout")
    assert handler.disconnects == ["pat"]
    assert sum("on_disconnect_user failed" in record.message for record in caplog.records) == 1
