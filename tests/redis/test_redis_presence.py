"""Presence events across nodes joined by Redis: one join/leave per transition, crashes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from helpers import Client, api, connect, publish, token
from redis_engines import cluster_scope
from redis_support import REDIS_URL, eventually, redis_node
from tidings.brokers.redis import RedisBroker
from timeouts import scaled
from webhook_receiver import SECRET, receiver


def _presence(ttl: float) -> dict[str, Any]:
    return {
        "namespaces": {
            "default": {"rule": "public"},
            "room": {"rule": "public", "presence_events": True, "presence_ttl": ttl},
        }
    }


async def _until(client: Client, kind: str, **data: Any) -> list[dict[str, Any]]:
    """Messages up to and including the first of type ``kind`` with ``data``."""
    seen = []
    while True:
        message = await client.recv()
        seen.append(message)
        if message["type"] == kind and all(message["data"].get(k) == v for k, v in data.items()):
            return seen


def _about(messages: list[dict[str, Any]], kind: str, user: str) -> int:
    return sum(1 for m in messages if m["type"] == kind and m["data"].get("user_id") == user)


async def test_one_join_and_one_leave_per_transition_across_nodes(redis_prefix: str) -> None:
    """A user on two nodes joins and leaves once for watchers on either node."""
    overrides = _presence(0.3)
    async with (
        redis_node(REDIS_URL, redis_prefix, overrides=overrides, presence_interval=0.05) as a,
        redis_node(REDIS_URL, redis_prefix, overrides=overrides, presence_interval=0.05) as b,
        connect(a, token("w1")) as w1,
        connect(b, token("w2")) as w2,
    ):
        for watcher in (w1, w2):
            await watcher.subscribe("room:p")
        async with connect(a, token("bob")) as bob_a, connect(b, token("bob")) as bob_b:
            await bob_a.subscribe("room:p")
            await bob_b.subscribe("room:p")
            for server in (a, b):
                await server.gateway.presence_events.settled()
            await publish(a, "room:p", data={"message": "joined", "level": "info"})
            for watcher in (w1, w2):
                seen = await _until(watcher, "notification", message="joined")
                assert _about(seen, "join", "bob") == 1, seen
        leaves = [await _until(watcher, "leave", user_id="bob") for watcher in (w1, w2)]
        await publish(b, "room:p", data={"message": "left", "level": "info"})
        for watcher, seen in zip((w1, w2), leaves, strict=True):
            seen += await _until(watcher, "notification", message="left")
            assert _about(seen, "leave", "bob") == 1, seen
            assert _about(seen, "join", "bob") == 0, seen
            assert all("offset" not in m for m in seen if m["type"] in ("join", "leave"))


async def test_crashed_nodes_users_leave_after_the_ttl(redis_prefix: str) -> None:
    """Users of a node that stops without cleanup leave once the ttl has passed."""
    overrides = _presence(0.4)
    async with (
        redis_node(REDIS_URL, redis_prefix, overrides=overrides, presence_interval=0.05) as a,
        redis_node(REDIS_URL, redis_prefix, overrides=overrides, presence_interval=0.05) as b,
        connect(a, token("w1")) as w1,
        connect(b, token("bob")) as bob,
    ):
        await w1.subscribe("room:c")
        await bob.subscribe("room:c")
        await _until(w1, "join", user_id="bob")
        broker = b.gateway.broker
        assert isinstance(broker, RedisBroker)
        await broker.close(clean=False)  # as if node b crashed: no depart, no refresh
        seen = await _until(w1, "leave", user_id="bob")
        assert _about(seen, "join", "bob") == 0


async def test_reconnect_to_another_node_within_ttl_is_silent(redis_prefix: str) -> None:
    """A user who moves from one node to another within the ttl causes no message."""
    overrides = _presence(30)
    async with (
        redis_node(REDIS_URL, redis_prefix, overrides=overrides, presence_interval=0.05) as a,
        redis_node(REDIS_URL, redis_prefix, overrides=overrides, presence_interval=0.05) as b,
        connect(a, token("w1")) as w1,
    ):
        await w1.subscribe("room:m")
        async with connect(a, token("bob")) as bob:
            await bob.subscribe("room:m")
            await _until(w1, "join", user_id="bob")
        await a.gateway.presence_events.settled()
        async with connect(b, token("bob")) as bob:
            await bob.subscribe("room:m")
            await b.gateway.presence_events.settled()
            await publish(a, "room:m", data={"message": "back", "level": "info"})
            seen = await _until(w1, "notification", message="back")
            assert _about(seen, "leave", "bob") == 0 and _about(seen, "join", "bob") == 0


async def test_each_transition_is_posted_by_one_node(redis_prefix: str) -> None:
    """With webhooks on both nodes, a user on both is posted once per event, crash included."""
    async with receiver() as hooks:
        overrides = {
            **_presence(0.3),
            "webhooks": {"url": hooks.url, "secret": SECRET, "retry_delay": 0.01},
        }
        async with (
            redis_node(REDIS_URL, redis_prefix, overrides=overrides, presence_interval=0.05) as a,
            redis_node(REDIS_URL, redis_prefix, overrides=overrides, presence_interval=0.05) as b,
        ):
            async with connect(a, token("bob")) as bob_a, connect(b, token("bob")) as bob_b:
                await bob_a.subscribe("room:h")
                await bob_b.subscribe("room:h")
                names = [(await hooks.next())[1]["event"] for _ in range(2)]
                assert names == ["channel_occupied", "user_joined"]
                broker = b.gateway.broker
                assert isinstance(broker, RedisBroker)
                await broker.close(clean=False)  # b's lease lapses; a still holds bob
            names = [(await hooks.next())[1]["event"] for _ in range(2)]
            assert names == ["user_left", "channel_vacated"]
            bodies = [json.loads(body) for _, body in hooks.requests]
            assert [body["event"] for body in bodies] == [
                "channel_occupied",
                "user_joined",
                "user_left",
                "channel_vacated",
            ]


async def test_presence_on_redis_cluster(tmp_path: Path, redis_prefix: str) -> None:
    """On Redis Cluster (sharded pub/sub), joins and a crashed node's leaves cross nodes."""
    overrides = {**_presence(0.4), "broker": {"timeout": 0.5}}
    async with (
        cluster_scope(tmp_path) as cluster,
        redis_node(cluster.url, redis_prefix, overrides=overrides, presence_interval=0.05) as a,
        redis_node(cluster.url, redis_prefix, overrides=overrides, presence_interval=0.05) as b,
    ):
        for server in (a, b):
            await eventually(lambda s=server: _ready(s), timeout=scaled(20))  # type: ignore[misc]
        async with connect(a, token("w1")) as w1, connect(b, token("bob")) as bob:
            names = {"room:x1", "room:x2", "room:x3"}
            for name in sorted(names):
                await w1.send("subscribe", {"channel": name}, id=name)
            for name in sorted(names):
                await _until(w1, "subscribed", channel=name)  # in order, before bob's
            for name in sorted(names):
                await bob.send("subscribe", {"channel": name}, id=name)
            joined: set[str] = set()
            while joined != names:
                joined.add((await _until(w1, "join", user_id="bob"))[-1]["channel"])
            broker = b.gateway.broker
            assert isinstance(broker, RedisBroker)
            await broker.close(clean=False)
            left: set[str] = set()
            while len(left) < 3:
                message = (await _until(w1, "leave", user_id="bob"))[-1]
                left.add(message["channel"])
            assert left == names


async def _ready(server: Any) -> bool:
    status, _ = await api(server, "GET", "/readyz", key=None)
    return status == 200


async def test_two_survivors_sweep_a_crashed_nodes_leave_once(redis_prefix: str) -> None:
    """Both surviving nodes sweep the crashed node's channel; each watcher gets one leave."""
    overrides = _presence(0.3)
    async with (
        redis_node(REDIS_URL, redis_prefix, overrides=overrides, presence_interval=0.02) as a,
        redis_node(REDIS_URL, redis_prefix, overrides=overrides, presence_interval=0.02) as b,
        redis_node(REDIS_URL, redis_prefix, overrides=overrides, presence_interval=0.02) as c,
        connect(a, token("w1")) as w1,
        connect(b, token("w2")) as w2,
        connect(c, token("bob")) as bob,
    ):
        for watcher in (w1, w2):
            await watcher.subscribe("room:s")
        await bob.subscribe("room:s")
        for watcher in (w1, w2):
            await _until(watcher, "join", user_id="bob")
        broker = c.gateway.broker
        assert isinstance(broker, RedisBroker)
        await broker.close(clean=False)
        seen = [await _until(watcher, "leave", user_id="bob") for watcher in (w1, w2)]
        await publish(a, "room:s", data={"message": "after", "level": "info"})
        for watcher, messages in zip((w1, w2), seen, strict=True):
            messages += await _until(watcher, "notification", message="after")
            assert _about(messages, "leave", "bob") == 1, messages
