"""Redis Cluster and Sentinel under faults, on engines each test starts from redis-server.

Two Tidings nodes share a 3-shard cluster (each primary with one replica) or a Sentinel
service. Publishers send events with idempotency keys and retry a 503 with the same key;
followers on both nodes read their channel as an application would. For every fault
(SIGKILL of a primary, a live slot migration, a whole shard restarted, a shard paused
past the node timeout): every acknowledged event reaches every follower exactly once and
in order, and nothing is reported lost, because an event is shown only once a replica
has it (``broker.ack_replicas`` auto).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from helpers import Client, api, connect, token
from redis_engines import ClusterEngine, EngineNode, cluster_scope, sentinel_scope, stop_all
from redis_support import (
    Follower,
    NullHandler,
    Producer,
    eventually,
    redis_node,
)
from tidings.brokers import PublishRequest, PublishResult
from tidings.brokers.redis import RedisBroker
from tidings.brokers.redis.scripts import key_slot
from tidings.errors import BrokerUnavailable
from tidings.server import RunningServer
from timeouts import TIMEOUT, scaled

pytestmark = pytest.mark.timeout(150)

TOK = token("reader", ("news:*",))
#: Redis calls time out fast so that publishes answer 503 quickly during a failover.
NODE = {"broker": {"timeout": 0.5}}


def channel_on(cluster_slots: set[int], avoid: set[int] | None = None) -> str:
    """A channel name whose slot is in ``cluster_slots`` (found by trying names)."""
    for index in range(100_000):
        name = f"news:c{index}"
        slot = key_slot(name.encode())
        if slot in cluster_slots and slot not in (avoid or set()):
            return name
    raise AssertionError("no channel name found")


async def slots_of(cluster: ClusterEngine, port: int) -> set[int]:
    """The slots that the primary on ``port`` owns (CLUSTER SLOTS)."""
    node = next(n for n in cluster.nodes if n.port == port)
    owned: set[int] = set()
    for start, end, primary, *_ in await node.ask("CLUSTER", "SLOTS"):
        if int(primary[1]) == port:
            owned.update(range(int(start), int(end) + 1))
    return owned


class Scenario:
    """Two nodes; per channel a producer on node A and followers on nodes A and B."""

    def __init__(self, node_a: RunningServer, node_b: RunningServer) -> None:
        self.nodes = (node_a, node_b)
        self.producers: list[Producer] = []
        self.followers: list[Follower] = []
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Scenario:
        await self._stack.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        for follower in self.followers:
            await follower.stop()
        for producer in self.producers:
            producer.task.cancel()
        await self._stack.__aexit__(*exc)

    async def follow(self, channel: str) -> None:
        for node in self.nodes:
            client: Client = await self._stack.enter_async_context(connect(node, TOK))
            follower = Follower(client, channel)
            await follower.subscribe()
            follower.start()
            self.followers.append(follower)

    def produce(self, channel: str, count: int) -> Producer:
        producer = Producer(self.nodes[0], count, channel=channel, key_prefix=f"{channel}-")
        self.producers.append(producer)
        return producer

    async def finish(self) -> None:
        """Wait for the producers, then check every follower got every acknowledged
        event of its channel once, in order, with no loss reported."""
        for producer in self.producers:
            await asyncio.wait_for(producer.task, scaled(90))
            producer.check_offsets()
        for follower in self.followers:
            acked = next(p for p in self.producers if p.channel == follower.channel).ids

            def caught_up(f: Follower = follower, a: list[str] = acked) -> bool:
                return set(a) <= set(f.ids) or f.not_recovered > 0

            await follower.until(caught_up, timeout=scaled(30))
            follower.check_delivery(acked)
            assert follower.not_recovered == 0, "an acknowledged event was reported lost"


def _has_events(follower: Follower) -> bool:
    return bool(follower.events)


@contextlib.asynccontextmanager
async def two_nodes(url: str, prefix: str) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    async with (
        redis_node(url, prefix, overrides=NODE) as a,
        redis_node(url, prefix, overrides=NODE) as b,
    ):
        await eventually(lambda: _ready(a), timeout=scaled(20))
        await eventually(lambda: _ready(b), timeout=scaled(20))
        yield a, b


async def _ready(server: RunningServer) -> bool:
    status, _ = await api(server, "GET", "/readyz", key=None)
    return status == 200


async def test_cluster_primary_killed_under_load(tmp_path: Path, redis_prefix: str) -> None:
    """SIGKILL of the primary that owns a live channel: its replica takes over and no
    acknowledged event is lost, doubled or reordered; another shard's channel is unharmed."""
    async with cluster_scope(tmp_path) as cluster:
        victim = (await cluster.primaries())[0]
        other = (await cluster.primaries())[1]
        hit = channel_on(await slots_of(cluster, victim.port))
        spared = channel_on(await slots_of(cluster, other.port))
        async with two_nodes(cluster.url, redis_prefix) as (a, b), Scenario(a, b) as run:
            for channel in (hit, spared):
                await run.follow(channel)
            producers = [run.produce(hit, 120), run.produce(spared, 120)]
            await producers[0].until_acked(20)
            await cluster.kill_primary(victim)
            await run.finish()
            assert producers[0].unavailable > 0, "the failover was not noticed"


async def test_cluster_slot_migration_under_load(tmp_path: Path, redis_prefix: str) -> None:
    """A live migration of the slot of a busy channel: subscriptions follow the slot to
    its new owner and the events published meanwhile are repaired from history."""
    async with cluster_scope(tmp_path) as cluster:
        source, target = (await cluster.primaries())[:2]
        channel = channel_on(await slots_of(cluster, source.port))
        async with two_nodes(cluster.url, redis_prefix) as (a, b), Scenario(a, b) as run:
            await run.follow(channel)
            producer = run.produce(channel, 150)
            await producer.until_acked(20)
            await cluster.migrate_slot(key_slot(channel.encode()), target)
            assert key_slot(channel.encode()) in await slots_of(cluster, target.port)
            await run.finish()


async def test_cluster_shard_restarted_with_aof(tmp_path: Path, redis_prefix: str) -> None:
    """A whole shard (primary and replica) killed and restarted from its AOF: publishes to
    it answer 503 meanwhile, the other shards go on, and nothing acknowledged is lost."""
    async with cluster_scope(tmp_path, appendonly=True) as cluster:
        primary = (await cluster.primaries())[0]
        replicas = await cluster.replicas_of(primary)
        channel = channel_on(await slots_of(cluster, primary.port))
        async with two_nodes(cluster.url, redis_prefix) as (a, b), Scenario(a, b) as run:
            await run.follow(channel)
            producer = run.produce(channel, 100)
            await producer.until_acked(20)
            for node in (*replicas, primary):
                node.kill()
            await producer.until_unavailable()
            for node in (primary, *replicas):
                await node.start()
            await cluster.wait_ok()
            await run.finish()
            assert producer.unavailable > 0


async def test_cluster_shard_paused_past_the_node_timeout(
    tmp_path: Path, redis_prefix: str
) -> None:
    """A primary frozen (SIGSTOP) until its replica is promoted, then resumed as a stale
    replica: nothing it held unreplicated was shown, so nothing is lost or doubled."""
    async with cluster_scope(tmp_path) as cluster:
        primary = (await cluster.primaries())[0]
        (replica,) = await cluster.replicas_of(primary)
        channel = channel_on(await slots_of(cluster, primary.port))
        async with two_nodes(cluster.url, redis_prefix) as (a, b), Scenario(a, b) as run:
            await run.follow(channel)
            producer = run.produce(channel, 120)
            await producer.until_acked(20)
            primary.pause()
            try:
                await eventually(lambda: _primary_now(cluster, replica.port), timeout=scaled(30))
            finally:
                primary.resume()
            await cluster.wait_ok()
            await run.finish()


async def _primary_now(cluster: ClusterEngine, port: int) -> bool:
    return any(node.port == port for node in await cluster.primaries())


async def test_cluster_events_are_shown_only_once_a_replica_has_them(
    tmp_path: Path, redis_prefix: str
) -> None:
    """With the replica frozen a publish answers 503 and is neither delivered nor in
    history; retried with its key once the replica is back, it arrives exactly once."""
    async with cluster_scope(tmp_path) as cluster:
        primary = (await cluster.primaries())[0]
        (replica,) = await cluster.replicas_of(primary)
        channel = channel_on(await slots_of(cluster, primary.port))
        body = {
            "channel": channel,
            "type": "notification",
            "idempotency_key": "once",
            "data": {"message": "held back", "level": "info"},
        }
        async with two_nodes(cluster.url, redis_prefix) as (a, b), Scenario(a, b) as run:
            await run.follow(channel)
            replica.pause()
            try:
                status, answer = await api(a, "POST", "/api/publish", body)
                assert status == 503, answer
                status, history = await api(
                    b, "GET", f"/api/channels/{channel}/history?since=0&limit=10"
                )
                assert status == 200 and history["events"] == [], history
            finally:
                replica.resume()
            status, answer = await api(a, "POST", "/api/publish", body)
            assert status == 200, answer
            event_id = answer["results"][0]["id"]
            for follower in run.followers:
                await follower.until(partial(_has_events, follower))
                assert follower.ids == [event_id]
            status, history = await api(
                b, "GET", f"/api/channels/{channel}/history?since=0&limit=10"
            )
            assert [e["id"] for e in history["events"]] == [event_id]


async def test_auto_ack_follows_a_replica_that_joins_later(tmp_path: Path) -> None:
    """ack_replicas auto on a primary that had no replica when the node connected: once a
    replica joins it is waited for, so with that replica frozen or gone a publish fails."""
    sync = ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
    primary = EngineNode(tmp_path / "primary", options=sync)
    replica = EngineNode(tmp_path / "replica")
    await primary.start()
    broker = RedisBroker(f"redis://{primary.address}", timeout=0.5, ping_interval=0.05)
    try:
        await broker.start(NullHandler())
        request = PublishRequest("news:late", "notification", {"n": 1})
        [first] = await broker.publish([request])  # no replica: nothing to wait for
        replica.options = ["--replicaof", "127.0.0.1", str(primary.port), *sync]
        await replica.start()

        async def replica_online() -> bool:
            role = await primary.ask("ROLE")
            return len(role[2]) == 1

        await eventually(replica_online, timeout=scaled(20))

        async def counted() -> bool:
            [link] = broker._router.links()
            return link.replicas_seen == 1

        await eventually(counted, timeout=TIMEOUT)
        replica.pause()
        try:
            with pytest.raises(BrokerUnavailable, match="replicas"):
                await broker.publish([request])
        finally:
            replica.resume()

        async def acknowledged() -> PublishResult | None:
            # A replica just thawed may need a moment to drain its backlog and answer the
            # primary's GETACK; until it does, publishes still (correctly) fail.
            try:
                [result] = await broker.publish([request])
            except BrokerUnavailable:
                return None
            return result

        later = await eventually(acknowledged, timeout=TIMEOUT)
        assert later is not None and later.offset > first.offset
        # Gone for good (as far as the primary knows): still waited for, never skipped.
        replica.stop()

        async def seen_gone() -> bool:
            [link] = broker._router.links()
            return link.role is not None and link.role.replicas == 0

        await eventually(seen_gone, timeout=TIMEOUT)
        with pytest.raises(BrokerUnavailable, match="replicas"):
            await broker.publish([request])
    finally:
        await broker.close()
        stop_all([replica, primary])


async def test_sentinel_failover_under_load(tmp_path: Path, redis_prefix: str) -> None:
    """Sentinel promotes the replica after the primary is killed: the nodes follow the
    switch and every acknowledged event reaches every follower once, in order."""
    async with sentinel_scope(tmp_path) as sentinel:
        channel = "news:sentinel"
        async with two_nodes(sentinel.url, redis_prefix) as (a, b), Scenario(a, b) as run:
            await run.follow(channel)
            producer = run.produce(channel, 120)
            await producer.until_acked(20)
            await sentinel.kill_primary()
            await run.finish()
            assert producer.unavailable > 0
