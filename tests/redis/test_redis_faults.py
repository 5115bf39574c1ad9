"""Redis faults under load, against a redis-server each test starts on a free port.

A publisher sends events at a steady rate with idempotency keys and retries a 503 with the
same key; a subscriber on another node reads the channel like an application would. For
every fault: each acknowledged event is delivered or recovered exactly once in offset
order, or the client was told it was not recoverable; with AOF no acknowledged event is
missing from history; /readyz fails while Redis is away and passes after.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from helpers import api, connect, token
from redis_support import (
    Follower,
    Producer,
    RedisServer,
    eventually,
    redis_node,
)
from tidings.server import RunningServer
from timeouts import TIMEOUT, scaled

CHANNEL = "news:fault"
TOK = token("reader", ("news:*",))
#: Node settings: Redis calls time out fast so that publishes answer 503 quickly.
NODE = {"broker": {"timeout": 0.3}}


async def _ready(server: RunningServer) -> int:
    status, _ = await api(server, "GET", "/readyz", key=None)
    return status


async def _readyz_is(server: RunningServer, expected: int, timeout: float = TIMEOUT) -> None:
    async def check() -> bool:
        return await _ready(server) == expected

    await eventually(check, timeout=timeout)


async def test_sigstop_for_two_seconds(
    redis_servers: Callable[..., RedisServer], redis_prefix: str
) -> None:
    """Redis frozen for 2 s: publishes answer 503 and are retried; nothing is lost or
    doubled; readiness fails during the freeze and comes back."""
    redis = redis_servers()
    await redis.start()
    async with (
        redis_node(redis.url, redis_prefix, overrides=NODE) as sub_node,
        redis_node(redis.url, redis_prefix, overrides=NODE) as pub_node,
        connect(sub_node, TOK) as client,
    ):
        follower = Follower(client, CHANNEL)
        await follower.subscribe()
        follower.start()
        producer = Producer(pub_node, 80)
        await producer.until_acked(15)
        redis.pause()
        frozen_at = time.monotonic()
        try:
            await _readyz_is(sub_node, 503, timeout=1.5)
            await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - frozen_at)))  # the freeze
        finally:
            redis.resume()
        await _readyz_is(sub_node, 200)
        await asyncio.wait_for(producer.task, scaled(15))
        assert producer.unavailable > 0, "the freeze was not noticed by the publisher"
        producer.check_offsets()
        await follower.until(
            lambda: set(producer.ids) <= set(follower.ids) or follower.not_recovered > 0
        )
        follower.check_delivery(producer.ids)
        assert follower.not_recovered == 0  # nothing was lost: history repaired the gap
        await follower.stop()


async def test_kill_and_restart_with_aof(
    redis_servers: Callable[..., RedisServer], redis_prefix: str
) -> None:
    """kill -9 and restart with appendfsync always: every acknowledged event is still in
    history under the same epoch, and the subscriber gets each exactly once."""
    redis = redis_servers(appendonly=True)
    await redis.start()
    async with (
        redis_node(redis.url, redis_prefix, overrides=NODE) as sub_node,
        redis_node(redis.url, redis_prefix, overrides=NODE) as pub_node,
        connect(sub_node, TOK) as client,
    ):
        follower = Follower(client, CHANNEL)
        reply = await follower.subscribe()
        epoch = reply["data"]["epoch"]
        follower.start()
        producer = Producer(pub_node, 80)
        await producer.until_acked(15)
        redis.kill()
        await _readyz_is(sub_node, 503)
        await producer.until_unavailable()
        await redis.start()
        await _readyz_is(sub_node, 200)
        await asyncio.wait_for(producer.task, scaled(15))
        assert producer.unavailable > 0
        producer.check_offsets()
        status, history = await api(
            sub_node, "GET", f"/api/channels/{CHANNEL}/history?since=0&limit=1000"
        )
        assert status == 200, history
        assert history["epoch"] == epoch
        assert [e["id"] for e in history["events"]] == producer.ids
        await follower.until(lambda: set(producer.ids) <= set(follower.ids))
        follower.check_delivery(producer.ids)
        assert follower.not_recovered == 0
        assert follower.epoch == epoch
        await follower.stop()


async def test_restart_without_persistence_changes_the_epoch(
    redis_servers: Callable[..., RedisServer], redis_prefix: str
) -> None:
    """Redis restarted empty: subscribers are told (unsubscribed, insufficient_state,
    resubscribe true), recover gets recovered false, then the new epoch flows."""
    redis = redis_servers()
    await redis.start()
    async with (
        redis_node(redis.url, redis_prefix, overrides=NODE) as sub_node,
        redis_node(redis.url, redis_prefix, overrides=NODE) as pub_node,
        connect(sub_node, TOK) as client,
    ):
        follower = Follower(client, CHANNEL)
        reply = await follower.subscribe()
        old_epoch = reply["data"]["epoch"]
        follower.start()
        producer = Producer(pub_node, 5)
        await asyncio.wait_for(producer.task, TIMEOUT)
        await follower.until(lambda: len(follower.events) == 5)
        redis.kill()
        await _readyz_is(sub_node, 503)
        await redis.start()
        await _readyz_is(sub_node, 200)
        await follower.until(lambda: follower.not_recovered == 1)
        assert follower.told_to_resubscribe == 1
        assert follower.epoch != old_epoch
        after = Producer(pub_node, 3)
        await asyncio.wait_for(after.task, TIMEOUT)
        after.check_offsets()  # the new epoch starts again at 1
        await follower.until(lambda: len(follower.events) == 8)
        assert [e["offset"] for e in follower.events] == [1, 2, 3, 4, 5, 1, 2, 3]
        assert follower.violations == []
        follower.check_delivery(after.ids)
        await follower.stop()
