"""The Redis broker on its own: offsets, epochs, history, idempotency, expiry and fan-out."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import pytest
import redis.asyncio as aioredis

from redis_support import FAST, REDIS_URL, client_scope, eventually, free_port
from tidings.brokers.base import PublishRequest
from tidings.brokers.presence_table import PresenceChange
from tidings.brokers.redis import RedisBroker, redact_url
from tidings.errors import BrokerUnavailable
from tidings.protocol.wire import encode_message
from timeouts import TIMEOUT

NOTE = {"message": "hi", "level": "info"}


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    async with client_scope() as client:
        yield client


class Recorder:
    """A ``BrokerHandler`` that records what the broker delivers."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, str, bytes]] = []
        self.lost: list[str] = []
        self.disconnects: list[tuple[str, str]] = []
        self.channels: dict[str, int] = {}
        self.users: dict[str, dict[str, int]] = {}
        self._changed = asyncio.Event()

    def on_event(
        self, channel: str, offset: int, epoch: str, payload: bytes, trace: str | None = None
    ) -> None:
        self.events.append((channel, offset, epoch, payload))
        self._changed.set()

    def on_continuity_lost(self, channel: str) -> None:
        self.lost.append(channel)
        self._changed.set()

    def on_disconnect_user(self, user_id: str, reason: str) -> None:
        self.disconnects.append((user_id, reason))
        self._changed.set()

    def local_channels(self) -> Mapping[str, int]:
        return dict(self.channels)

    def local_presence(self, channel: str) -> Mapping[str, int]:
        return dict(self.users.get(channel, {}))

    def on_presence(self, channel: str, payload: bytes) -> None:
        pass

    def on_presence_change(self, change: PresenceChange) -> None:
        pass

    def offsets(self, channel: str) -> list[int]:
        return [offset for name, offset, _, _ in self.events if name == channel]

    async def until(self, check: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        """Wait until ``check()`` holds after some delivery."""
        async with asyncio.timeout(timeout):
            while not check():
                self._changed.clear()
                await self._changed.wait()


@contextlib.asynccontextmanager
async def broker(
    prefix: str, url: str = REDIS_URL, handler: Recorder | None = None, **options: Any
) -> AsyncIterator[tuple[RedisBroker, Recorder]]:
    instance = RedisBroker(
        url, prefix=prefix, timeout=options.pop("timeout", 1.0), **{**FAST, **options}
    )
    recorder = handler or Recorder()
    await instance.start(recorder)
    try:
        yield instance, recorder
    finally:
        await instance.close()


def note(channel: str, key: str | None = None, **data: Any) -> PublishRequest:
    return PublishRequest(channel, "notification", {**NOTE, **data}, key)


async def test_offsets_increase_by_one_within_one_epoch(redis_prefix: str) -> None:
    """Offsets start at 1 and grow by exactly 1 per event; the epoch stays the same."""
    async with broker(redis_prefix) as (b, _):
        empty = await b.position("news:a")
        assert empty.offset == 0
        results = [(await b.publish([note("news:a")]))[0] for _ in range(3)]
        assert [r.offset for r in results] == [1, 2, 3]
        assert {r.epoch for r in results} == {empty.epoch}
        assert len({r.id for r in results}) == 3
        position = await b.position("news:a")
        assert (position.offset, position.epoch) == (3, empty.epoch)
        other = await b.publish([note("news:b")])
        assert other[0].offset == 1
        assert other[0].epoch != empty.epoch


async def test_batch_keeps_order_across_channels(redis_prefix: str) -> None:
    """A batch is published in order and answers in the same order."""
    async with broker(redis_prefix) as (b, _):
        requests = [note("news:a"), note("news:b"), note("news:a"), note("news:a"), note("news:b")]
        results = await b.publish(requests)
        assert [(r.channel, r.offset) for r in results] == [
            ("news:a", 1),
            ("news:b", 1),
            ("news:a", 2),
            ("news:a", 3),
            ("news:b", 2),
        ]


async def test_payload_is_byte_identical_to_the_wire_format(redis_prefix: str) -> None:
    """Stored and delivered payloads are exactly what encode_message produces."""
    moment = 1_780_000_000.123
    async with (
        broker(redis_prefix, wall_clock=lambda: moment) as (b, _),
        broker(redis_prefix) as (sub, seen),
    ):
        await sub.subscribe("chat:room-1")
        data = {
            "conversation_id": "c1",
            "sender_id": "ü-1",
            "content": 'héllo "x" ✓',
            "nested": {"list": [1, 2.5, None, True]},
        }
        for _ in range(11):  # offsets of several digits
            [result] = await b.publish([PublishRequest("chat:room-1", "chat_message", data)])
        expected = encode_message(
            "chat_message",
            data,
            id=result.id,
            channel="chat:room-1",
            offset=result.offset,
            timestamp=moment,
        )
        page = await b.history("chat:room-1", 10, 5)
        assert [e.offset for e in page.events] == [11]
        assert page.events[0].payload == expected
        await seen.until(lambda: len(seen.events) == 11)
        assert seen.events[-1] == ("chat:room-1", 11, result.epoch, expected)


async def test_history_pages_and_completeness(redis_prefix: str) -> None:
    """history returns the oldest events after since, and complete like the memory broker."""
    async with broker(redis_prefix) as (b, _):
        fresh = await b.history("news:h", 0, 10)
        assert (fresh.position.offset, list(fresh.events), fresh.complete) == (0, [], True)
        await b.publish([note("news:h", n=i) for i in range(5)])
        page = await b.history("news:h", 2, 2)
        assert [e.offset for e in page.events] == [3, 4]
        assert page.complete and page.position.offset == 5
        assert [e.offset for e in (await b.history("news:h", 0, 100)).events] == [1, 2, 3, 4, 5]
        assert (await b.history("news:h", 5, 10)).complete
        assert (await b.history("news:h", 5, 10)).events == []
        beyond = await b.history("news:h", 9, 10)
        assert not beyond.complete and beyond.events == []
        assert (await b.history("news:h", 2, 0)).events == []
        huge = await b.history("news:h", 10**30, 10)
        assert not huge.complete


async def test_idempotency_key_returns_the_first_result(
    redis_prefix: str, redis_client: aioredis.Redis
) -> None:
    """A retried key answers the first offset, marked duplicate, and publishes nothing,
    per channel, until the window ends."""
    async with (
        broker(redis_prefix, idempotency_window=60) as (b, _),
        broker(redis_prefix) as (sub, seen),
    ):
        await sub.subscribe("news:i")
        [first] = await b.publish([note("news:i", key="k-1")])
        [again] = await b.publish([note("news:i", key="k-1", message="other")])
        assert not first.duplicate
        assert again == first._replace(duplicate=True)
        [other] = await b.publish([note("news:j", key="k-1")])
        assert other.offset == 1 and other.channel == "news:j" and not other.duplicate
        # Twice in one call (one pipeline): the second is the first's duplicate.
        once, twice = await b.publish([note("news:k", key="k-2"), note("news:k", key="k-2")])
        assert (once.offset, once.duplicate) == (1, False)
        assert twice == once._replace(duplicate=True)
        assert (await b.position("news:i")).offset == 1
        key = f"{redis_prefix}:{{news:i}}:idem:k-1"
        ttl = await redis_client.pttl(key)
        assert 0 < ttl <= 60_000
        await redis_client.pexpire(key, 1)
        await eventually(lambda: _gone(redis_client, key))
        [fresh] = await b.publish([note("news:i", key="k-1")])
        assert fresh.offset == 2 and not fresh.duplicate
        await seen.until(lambda: seen.offsets("news:i") == [1, 2])


async def _gone(client: aioredis.Redis, *keys: str) -> bool:
    return await client.exists(*keys) == 0


async def test_history_expires_after_ttl_and_a_new_epoch_starts(
    redis_prefix: str, redis_client: aioredis.Redis
) -> None:
    """Keys carry the history ttl; once they expire the channel restarts under a new epoch."""
    async with broker(redis_prefix, history_ttl=30) as (b, _):
        first, _ = await b.publish([note("news:t"), note("news:t")])
        meta, stream = f"{redis_prefix}:{{news:t}}:meta", f"{redis_prefix}:{{news:t}}:stream"
        for key in (meta, stream):
            assert 0 < await redis_client.pttl(key) <= 30_000
        await redis_client.pexpire(meta, 1)
        await redis_client.pexpire(stream, 1)
        await eventually(lambda: _gone(redis_client, meta, stream))
        position = await b.position("news:t")
        assert position.offset == 0 and position.epoch != first.epoch
        [after] = await b.publish([note("news:t")])
        assert (after.offset, after.epoch) == (1, position.epoch)
        page = await b.history("news:t", 0, 10)
        assert [e.offset for e in page.events] == [1] and page.complete


async def test_stream_is_trimmed_to_about_history_size(
    redis_prefix: str, redis_client: aioredis.Redis
) -> None:
    """XADD MAXLEN ~ keeps at least history.size events and drops old ones."""
    async with broker(redis_prefix, history_size=10) as (b, _):
        for start in range(0, 400, 100):
            await b.publish([note("news:m", n=i) for i in range(start, start + 100)])
        length = await redis_client.xlen(f"{redis_prefix}:{{news:m}}:stream")
        assert 10 <= length < 400
        assert not (await b.history("news:m", 0, 10)).complete
        tail = await b.history("news:m", 390, 100)
        assert tail.complete and [e.offset for e in tail.events] == list(range(391, 401))


async def test_unreachable_redis_is_broker_unavailable(redis_prefix: str) -> None:
    """Every operation against a closed port raises BrokerUnavailable quickly, without
    leaking the URL's password; ready() is False."""
    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
    assert "s3cret-pw" not in redact_url(url)
    started = time.monotonic()
    async with broker(redis_prefix, url=url, timeout=0.3) as (b, _):
        assert not await b.ready()
        for call in (
            b.publish([note("news:u")]),
            b.position("news:u"),
            b.history("news:u", 0, 10),
            b.subscribe("news:u"),
            b.presence("news:u"),
            b.channels(""),
            b.disconnect_user("u", ""),
        ):
            with pytest.raises(BrokerUnavailable) as caught:
                await call
            assert "s3cret" not in caught.value.message
            assert "127.0.0.1" not in caught.value.message
    assert time.monotonic() - started < 5


async def test_subscribe_delivers_in_order_until_unsubscribed(redis_prefix: str) -> None:
    """A subscribed node receives every event once in order; after unsubscribe, none."""
    async with broker(redis_prefix) as (pub, _), broker(redis_prefix) as (sub, seen):
        await pub.publish([note("news:s")])  # before the subscription: not delivered
        await sub.subscribe("news:s")
        await sub.subscribe("news:other")
        for i in range(30):
            await pub.publish([note("news:s", n=i)])
        await seen.until(lambda: len(seen.offsets("news:s")) == 30)
        assert seen.offsets("news:s") == list(range(2, 32))
        await sub.unsubscribe("news:s")
        await pub.publish([note("news:s")])
        await pub.publish([note("news:other")])
        # Pub/sub keeps order on one connection: news:other arriving means news:s did not.
        await seen.until(lambda: seen.offsets("news:other") == [1])
        assert seen.offsets("news:s") == list(range(2, 32))
        assert sub.served_channels() == ["news:other"]


async def test_gap_is_filled_from_history_before_later_events(redis_prefix: str) -> None:
    """An event missing from pub/sub is read from history and delivered in order."""
    async with broker(redis_prefix) as (pub, _), broker(redis_prefix) as (sub, seen):
        await sub.subscribe("news:g")
        await pub.publish([note("news:g")])
        await _publish_silently(pub, "news:g")
        await _publish_silently(pub, "news:g")
        await pub.publish([note("news:g")])
        await seen.until(lambda: len(seen.offsets("news:g")) == 4)
        assert seen.offsets("news:g") == [1, 2, 3, 4]
        assert seen.lost == []
        payloads = [p for _, _, _, p in seen.events]
        history = await pub.history("news:g", 0, 10)
        assert payloads == [e.payload for e in history.events]


async def _publish_silently(b: RedisBroker, channel: str) -> None:
    """Publish an event whose pub/sub message goes nowhere (as if it were lost)."""
    event = b._publisher._event(note(channel))
    command = list(event.command)
    command[1 + command[0] + 6] = b"nowhere"  # ARGV[7]: the pub/sub channel
    await b._router.run(event.slot, [("EVALSHA", b._scripts.publish, *command)])


async def test_unfillable_gap_reports_continuity_lost(
    redis_prefix: str, redis_client: aioredis.Redis
) -> None:
    """A gap that history no longer holds is reported, and delivery resumes after it."""
    async with broker(redis_prefix) as (pub, _), broker(redis_prefix) as (sub, seen):
        await sub.subscribe("news:l")
        await _publish_silently(pub, "news:l")
        await redis_client.delete(f"{redis_prefix}:{{news:l}}:stream")
        await pub.publish([note("news:l")])
        await seen.until(lambda: seen.lost == ["news:l"])
        await pub.publish([note("news:l")])
        await seen.until(lambda: seen.offsets("news:l") == [3])


async def test_changed_epoch_reports_continuity_lost(
    redis_prefix: str, redis_client: aioredis.Redis
) -> None:
    """When a channel's history is lost (new epoch) the node says so, then goes on."""
    async with broker(redis_prefix) as (pub, _), broker(redis_prefix) as (sub, seen):
        await sub.subscribe("news:e")
        [old] = await pub.publish([note("news:e")])
        await seen.until(lambda: seen.offsets("news:e") == [1])
        await redis_client.delete(
            f"{redis_prefix}:{{news:e}}:meta", f"{redis_prefix}:{{news:e}}:stream"
        )
        [new] = await pub.publish([note("news:e")])
        assert new.offset == 1 and new.epoch != old.epoch
        await seen.until(lambda: len(seen.events) == 2)
        assert seen.lost == ["news:e"]
        assert seen.events[-1][1:3] == (1, new.epoch)


async def test_channels_lost_together_are_one_log_line(
    redis_prefix: str, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Channels whose history is lost at once (Redis emptied) are each reported to the
    handler, and logged as one rate-limited line, not one per channel."""
    caplog.set_level("INFO", logger="tidings.brokers.redis.fanout")
    channels = ["news:x1", "news:x2", "news:x3"]
    async with broker(redis_prefix) as (pub, _), broker(redis_prefix) as (sub, seen):
        for channel in channels:
            await sub.subscribe(channel)
            await pub.publish([note(channel)])
        await seen.until(lambda: len(seen.events) == len(channels))
        for channel in channels:
            await redis_client.delete(
                f"{redis_prefix}:{{{channel}}}:meta", f"{redis_prefix}:{{{channel}}}:stream"
            )
            await pub.publish([note(channel)])
        await seen.until(lambda: sorted(seen.lost) == channels)
    lines = [r for r in caplog.records if "continuity lost" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelname == "INFO" and lines[0].exc_info is None


async def test_duplicate_messages_are_dropped(
    redis_prefix: str, redis_client: aioredis.Redis
) -> None:
    """A message repeated on pub/sub is delivered once."""
    async with broker(redis_prefix) as (pub, _), broker(redis_prefix) as (sub, seen):
        await sub.subscribe("news:d")
        [result] = await pub.publish([note("news:d")])
        await seen.until(lambda: len(seen.events) == 1)
        message = f"{result.epoch}:1:".encode() + seen.events[0][3]
        await redis_client.publish(f"{redis_prefix}:{{news:d}}", message)
        await pub.publish([note("news:d")])
        await seen.until(lambda: len(seen.events) == 2)
        assert seen.offsets("news:d") == [1, 2]


async def test_lost_pubsub_connection_is_repaired_from_history(
    redis_prefix: str, redis_client: aioredis.Redis
) -> None:
    """After the pub/sub connection is killed, the node reconnects, re-subscribes and
    delivers what it missed, once and in order."""
    async with (
        broker(redis_prefix) as (pub, _),
        broker(redis_prefix, reconnect_delay=(0.3, 0.3)) as (sub, seen),
    ):
        await sub.subscribe("news:r")
        await pub.publish([note("news:r") for _ in range(3)])
        await seen.until(lambda: len(seen.events) == 3)
        killed = await _kill_pubsub(redis_client, sub)
        assert killed == 1
        await pub.publish([note("news:r") for _ in range(3)])  # while it is away
        await seen.until(lambda: len(seen.events) == 6)
        await eventually(lambda: _is_connected(sub))
        await pub.publish([note("news:r")])
        await seen.until(lambda: len(seen.events) == 7)
        assert seen.offsets("news:r") == list(range(1, 8))
        assert seen.lost == []


async def _is_connected(b: RedisBroker) -> bool:
    return b.is_connected()


async def _kill_pubsub(client: aioredis.Redis, b: RedisBroker) -> int:
    """Kill only ``b``'s pub/sub connection on the shared Redis."""
    clients = await client.client_list(_type="pubsub")
    ids = [c["id"] for c in clients if c.get("name") == f"tidings:{b.node_id}:pubsub"]
    for client_id in ids:
        await client.client_kill_filter(_id=client_id)
    return len(ids)


async def test_presence_and_channels_across_nodes(redis_prefix: str) -> None:
    """Presence and channel counts add up over live nodes; a node that stops cleanly
    leaves at once, one that crashes leaves within its ttl."""
    async with (
        broker(redis_prefix, node_ttl=1.0) as (a, ha),
        broker(redis_prefix, node_ttl=1.0) as (b, hb),
        broker(redis_prefix, node_ttl=1.0) as (c, hc),
    ):
        ha.channels, ha.users = {"room:1": 2}, {"room:1": {"u1": 2}}
        hb.channels, hb.users = (
            {"room:1": 1, "room:2": 1},
            {"room:1": {"u2": 1}, "room:2": {"u2": 1}},
        )
        hc.channels, hc.users = {"room:1": 1}, {"room:1": {"u1": 1}}
        await a.subscribe("room:1")
        await b.subscribe("room:1")
        await c.subscribe("room:1")

        async def everyone() -> bool:
            return await a.presence("room:1") == {"u1": 3, "u2": 1} and await a.channels(
                "room:"
            ) == {"room:1": 4, "room:2": 1}

        await eventually(everyone)
        assert await b.channels("room:2") == {"room:2": 1}
        await b.close()  # clean: its entries go at once
        assert await a.presence("room:1") == {"u1": 3}
        assert await a.channels("") == {"room:1": 3}
        await c.close(clean=False)  # as if it crashed: gone within its ttl

        async def crashed_gone() -> bool:
            return await a.presence("room:1") == {"u1": 2}

        await eventually(crashed_gone)
        assert await a.channels("") == {"room:1": 2}


async def test_presence_follows_local_changes(redis_prefix: str) -> None:
    """A user joining or leaving on one node shows on the others after the next sync."""
    async with broker(redis_prefix) as (a, _), broker(redis_prefix) as (b, hb):
        hb.channels, hb.users = {"room:1": 1}, {"room:1": {"u1": 1}}
        await b.subscribe("room:1")

        async def present(expected: dict[str, int]) -> bool:
            return await a.presence("room:1") == expected

        await eventually(lambda: present({"u1": 1}))
        hb.users = {"room:1": {"u1": 1, "u3": 1}}
        hb.channels = {"room:1": 2}
        await eventually(lambda: present({"u1": 1, "u3": 1}))
        hb.users, hb.channels = {}, {}
        await b.unsubscribe("room:1")
        await eventually(lambda: present({}))


async def test_disconnect_user_reaches_every_node(redis_prefix: str) -> None:
    """disconnect_user is carried out on every node, once each."""
    async with broker(redis_prefix) as (a, ha), broker(redis_prefix) as (b, hb):
        await a.disconnect_user("user-9", "banned")
        await hb.until(lambda: hb.disconnects == [("user-9", "banned")])
        assert ha.disconnects == [("user-9", "banned")]
        await b.disconnect_user("user-8", "")
        await ha.until(lambda: len(ha.disconnects) == 2)
        assert ha.disconnects[-1] == ("user-8", "")


async def test_ready_and_close_leave_no_tasks(redis_prefix: str) -> None:
    """ready() is True when connected; close() stops every task the broker started."""
    before = set(asyncio.all_tasks())
    async with broker(redis_prefix) as (b, _):
        assert await b.ready()
        await b.subscribe("news:c")
        await b.publish([note("news:c")])
    left = [t for t in asyncio.all_tasks() - before if not t.done()]
    assert left == []


async def test_a_failed_sync_loop_is_logged_and_restarted(
    redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The presence/channel-count sync loop is supervised: when a round raises, the
    failure is logged and the loop runs again instead of ending silently."""
    instance = RedisBroker(REDIS_URL, prefix=redis_prefix, timeout=1.0, **FAST)
    real_sync = instance._views.sync_forever
    runs = 0
    restarted = asyncio.Event()

    async def flaky_sync() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RuntimeError("boom")
        restarted.set()
        await real_sync()

    instance._views.sync_forever = flaky_sync  # type: ignore[method-assign]
    await instance.start(Recorder())
    try:
        await asyncio.wait_for(restarted.wait(), TIMEOUT)
    finally:
        await instance.close()
    assert any("redis-sync failed" in r.getMessage() for r in caplog.records)
