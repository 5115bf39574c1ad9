"""The Redis broker's parts: slots, topology replies, pub/sub batching, the pipelined
link and the committed-offset scripts (pure ones first, then against the shared Redis)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.crc import key_slot as redis_key_slot
from redis.exceptions import ResponseError

from redis_support import REDIS_URL, NullHandler
from tidings.brokers import PublishRequest
from tidings.brokers.redis import RedisBroker
from tidings.brokers.redis.link import Link, open_connection, parse_role
from tidings.brokers.redis.publisher import Publisher, Scripts
from tidings.brokers.redis.pubsub import Subscriber
from tidings.brokers.redis.resp import pack_commands
from tidings.brokers.redis.scripts import SLOTS, KeyLayout, key_slot
from tidings.brokers.redis.topology import parse_cluster_slots
from tidings.brokers.redis.urls import parse_url
from tidings.errors import BrokerUnavailable


@pytest.mark.parametrize(
    "key",
    [b"", b"abc", b"x:{news:1}:meta", b"{}a", b"a{b}{c}", b"{user1000}.following", "é{ü}".encode()],
)
def test_key_slot_matches_redis_py(key: bytes) -> None:
    """The pure slot function agrees with redis-py's, hash tags included."""
    assert key_slot(key) == redis_key_slot(key)


def test_channel_keys_and_pubsub_share_a_slot() -> None:
    """Every key of a channel and its pub/sub channel hash to the channel's slot."""
    from tidings.brokers.redis.scripts import KeyLayout

    keys = KeyLayout("p")
    slot = key_slot(b"news:1")
    for key in (
        keys.meta("news:1"),
        keys.stream("news:1"),
        keys.presence("news:1"),
        keys.idempotency("news:1", "k"),
    ):
        assert key_slot(key.encode()) == slot
    assert key_slot(keys.events("news:1")) == slot


def test_cluster_slots_reply_becomes_a_slot_map() -> None:
    """CLUSTER SLOTS ranges map to their primaries; an empty host is the node asked."""
    reply = [
        [0, 5460, [b"10.0.0.1", 7000, b"id1"], [b"10.0.0.4", 7003, b"id4"]],
        [5461, 10922, [b"", 7001, b"id2"]],
        [10923, 16383, [b"10.0.0.3", 7002, b"id3"]],
    ]
    slots = parse_cluster_slots(reply, ("10.0.0.2", 7001))
    assert slots is not None and len(slots) == SLOTS
    assert slots[0] == ("10.0.0.1", 7000) and slots[5460] == ("10.0.0.1", 7000)
    assert slots[5461] == ("10.0.0.2", 7001)
    assert slots[16383] == ("10.0.0.3", 7002)


def test_cluster_slots_with_holes_still_maps_every_slot() -> None:
    """Unassigned slots point at some primary (their commands get CLUSTERDOWN, retried)."""
    slots = parse_cluster_slots([[100, 200, [b"h", 1, b"i"]]], ("h", 1))
    assert slots is not None and set(slots) == {("h", 1)}
    assert parse_cluster_slots([], ("h", 1)) is None


def test_role_reply() -> None:
    """ROLE tells a primary with its live replicas from a replica."""
    assert parse_role([b"master", 10, [[b"h", b"1", b"10"]]]).replicas == 1
    assert parse_role([b"master", 10, []]).primary
    assert not parse_role([b"slave", b"h", 1, b"connected", 10]).primary


class _Events:
    def on_message(self, name: bytes, data: bytes) -> None: ...
    def on_confirmed(self, subscriber: Subscriber, name: bytes) -> None: ...
    def on_dropped(self, subscriber: Subscriber, names: list[bytes]) -> None: ...
    def on_down(self, subscriber: Subscriber) -> None: ...


def _subscriber(sharded: bool) -> Subscriber:
    async def opener(address: Any) -> Any:
        raise OSError("not used")

    return Subscriber(("h", 1), opener, _Events(), sharded=sharded, timeout=1.0, ping_interval=1.0)


def test_sharded_batches_one_command_per_slot_and_kind() -> None:
    """Sharded (un)subscriptions of one tick become one command per slot, kinds in order."""
    sub = _subscriber(sharded=True)
    a, b = b"p:{news:1}", b"p:{news:2}"
    queue = [
        (b"SSUBSCRIBE", a),
        (b"SSUBSCRIBE", b),
        (b"SSUBSCRIBE", b"x:{news:1}"),
        (b"SUNSUBSCRIBE", a),
    ]
    commands = sub._batches(queue)
    assert commands[0] == (b"SSUBSCRIBE", a, b"x:{news:1}")
    assert commands[1] == (b"SSUBSCRIBE", b)
    assert commands[2] == (b"SUNSUBSCRIBE", a)


def test_plain_batches_merge_every_channel() -> None:
    """Unsharded subscriptions of one tick go out as one command (in chunks of 1000)."""
    sub = _subscriber(sharded=False)
    queue = [(b"SUBSCRIBE", f"c{i}".encode()) for i in range(1500)]
    commands = sub._batches(queue)
    assert [len(c) - 1 for c in commands] == [1000, 500]


def test_pack_commands_matches_redis_py() -> None:
    """Commands are packed to the same bytes as redis-py packs them, and a bool is
    refused as redis-py refuses it."""
    from redis.asyncio.connection import Connection

    commands = [
        ("EVALSHA", "ab" * 20, 2, "k:{c}", b"\x00bin\r\n", 10**20, -3, 1.5, "ünï"),
        ("PING",),
        ("WAIT", 1, 250),
        ("SPUBLISH", memoryview(b"ch"), bytearray(b"x")),
    ]
    expected = b"".join(Connection().pack_commands(commands))
    assert pack_commands(commands) == expected
    with pytest.raises(TypeError):
        pack_commands([("SET", "k", True)])


@pytest.mark.parametrize("key", [None, "k-1"])
def test_prepacked_publish_commands_are_what_they_say(key: str | None) -> None:
    """An event's command packed ahead (per-channel parts cached) is byte for byte the
    packing of its argument tuple, with and without an idempotency key, twice over."""
    publisher = Publisher(
        None,  # type: ignore[arg-type]
        KeyLayout("t"),
        Scripts("a" * 40, "b" * 40, "c", "d"),
        pubsub_command="PUBLISH",
        history_size=100,
        ttl_ms=300_000,
        window_ms=60_000,
        ack_replicas=0,
        timeout=1.0,
    )
    for _ in range(2):
        event = publisher._event(PublishRequest("news:p", "notification", {"n": 1}, key))
        packed = publisher._packed("a" * 40, event)
        assert packed.packed == pack_commands([tuple(packed)])
        assert pack_commands([packed]) == packed.packed
        assert packed[:2] == ("EVALSHA", "a" * 40)


# -- against the shared Redis ----------------------------------------------------------


async def _link(timeout: float = 1.0) -> Link:
    target = parse_url(REDIS_URL)

    async def opener(address: Any) -> Any:
        return await open_connection(target, address, timeout=timeout, client_name="t")

    return Link(target.hosts[0], opener, timeout=timeout)


async def test_link_keeps_order_and_returns_errors_in_place(redis_prefix: str) -> None:
    """Calls made in one tick come back in order; an error reply sits in its place."""
    link = await _link()
    try:
        key = f"{redis_prefix}:n"
        futures = [link.call([("INCR", key)]) for _ in range(50)]
        futures.append(link.call([("INCR", key), ("HGET", key, "f"), ("GET", key)]))
        results = await asyncio.gather(*futures)
        assert [r[0] for r in results[:50]] == list(range(1, 51))
        assert results[50][0] == 51 and isinstance(results[50][1], ResponseError)
        assert results[50][2] == b"51"
        assert link.role is not None and link.role.primary
    finally:
        await link.close()


async def test_link_bounds_what_is_in_flight(redis_prefix: str) -> None:
    """Calls past max_pending fail at once instead of queueing."""
    target = parse_url(REDIS_URL)

    async def opener(address: Any) -> Any:
        return await open_connection(target, address, timeout=1.0, client_name="t")

    link = Link(target.hosts[0], opener, timeout=1.0, max_pending=3)
    try:
        futures = [link.call([("PING",)]) for _ in range(4)]
        with pytest.raises(BrokerUnavailable, match="too many"):
            await futures[3]
        assert [r[0] for r in await asyncio.gather(*futures[:3])] == [b"PONG"] * 3
    finally:
        await link.close()


async def test_link_to_nowhere_fails_every_call() -> None:
    """A link whose server refuses connections fails its calls with BrokerUnavailable."""
    target = parse_url("redis://127.0.0.1:1/0")

    async def opener(address: Any) -> Any:
        return await open_connection(target, address, timeout=0.5, client_name="t")

    link = Link(("127.0.0.1", 1), opener, timeout=0.5)
    try:
        with pytest.raises(BrokerUnavailable):
            await link.call([("PING",)])
    finally:
        await link.close()


async def test_uncommitted_events_are_never_shown(redis_prefix: str) -> None:
    """An appended, uncommitted event is neither in history nor in the position; a reader
    that already saw it gets its own offset back; the commit shows it."""
    broker = RedisBroker(REDIS_URL, prefix=redis_prefix, timeout=1.0, ack_replicas=0)
    await broker.start(NullHandler())
    try:
        await broker.publish([PublishRequest("news:u", "notification", {"n": 1})])
        event = broker._publisher._event(PublishRequest("news:u", "notification", {"n": 2}))
        (reply,) = await broker._router.run(
            event.slot, [("EVALSHA", broker._scripts.append, *event.command)]
        )
        assert int(reply[1]) == 2
        page = await broker.history("news:u", 0, 10)
        assert page.position.offset == 1 and [e.offset for e in page.events] == [1]
        assert (await broker.position("news:u")).offset == 1
        ahead = await broker.history("news:u", 2, 10)
        assert ahead.position.offset == 2 and ahead.complete and ahead.events == []
        beyond = await broker.history("news:u", 3, 10)
        assert not beyond.complete
        meta = broker._keys.meta("news:u")
        (committed,) = await broker._router.run(
            event.slot,
            [
                (
                    "EVALSHA",
                    broker._scripts.commit,
                    2,
                    meta,
                    broker._keys.stream("news:u"),
                    reply[0],
                    2,
                    "PUBLISH",
                    broker._keys.events("news:u"),
                )
            ],
        )
        assert committed == 2
        page = await broker.history("news:u", 0, 10)
        assert [e.offset for e in page.events] == [1, 2] and page.position.offset == 2
    finally:
        await broker.close()


async def test_ack_replicas_without_replicas_refuses_and_shows_nothing(redis_prefix: str) -> None:
    """ack_replicas = 1 on a primary with no replica: the publish fails and nothing of it
    can be read."""
    broker = RedisBroker(REDIS_URL, prefix=redis_prefix, timeout=0.4, ack_replicas=1)
    await broker.start(NullHandler())
    try:
        with pytest.raises(BrokerUnavailable, match="replicas"):
            await broker.publish([PublishRequest("news:w", "notification", {"n": 1})])
        page = await broker.history("news:w", 0, 10)
        assert page.events == [] and page.position.offset == 0
    finally:
        await broker.close()
