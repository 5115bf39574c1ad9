"""MemoryBroker: offsets, epochs, history, idempotency, expiry and delivery (fake clock)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from fakes import FakeClock
from tidings.brokers import PublishRequest, PublishResult
from tidings.brokers.memory import MemoryBroker
from tidings.brokers.presence_table import PresenceChange
from tidings.supervisor import Supervisor
from timeouts import TIMEOUT

TTL = 60.0
WINDOW = 30.0


@dataclass
class RecordingHandler:
    """A ``BrokerHandler`` that records every call and serves fixed local views."""

    events: list[tuple[str, int, str, dict[str, Any]]] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    disconnects: list[tuple[str, str]] = field(default_factory=list)
    channels: dict[str, int] = field(default_factory=dict)
    presence: dict[str, dict[str, int]] = field(default_factory=dict)
    changes: list[PresenceChange] = field(default_factory=list)

    def on_event(
        self, channel: str, offset: int, epoch: str, payload: bytes, trace: str | None = None
    ) -> None:
        self.events.append((channel, offset, epoch, json.loads(payload)))

    def on_continuity_lost(self, channel: str) -> None:
        self.lost.append(channel)

    def on_disconnect_user(self, user_id: str, reason: str) -> None:
        self.disconnects.append((user_id, reason))

    def local_channels(self) -> Mapping[str, int]:
        return self.channels

    def local_presence(self, channel: str) -> Mapping[str, int]:
        return self.presence.get(channel, {})

    def on_presence(self, channel: str, payload: bytes) -> None:
        pass

    def on_presence_change(self, change: PresenceChange) -> None:
        self.changes.append(change)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()


def make_broker(clock: FakeClock, **kwargs: Any) -> MemoryBroker:
    options: dict[str, Any] = {
        "history_size": 100,
        "history_ttl": TTL,
        "idempotency_window": WINDOW,
        "clock": clock,
        "wall_clock": lambda: 1_800_000_000.0,
    }
    options.update(kwargs)
    return MemoryBroker(**options)


@pytest.fixture
async def broker(clock: FakeClock, handler: RecordingHandler) -> AsyncIterator[MemoryBroker]:
    broker = make_broker(clock)
    await broker.start(handler)
    yield broker
    await broker.close()


def request(channel: str = "news:a", n: int = 0, key: str | None = None) -> PublishRequest:
    return PublishRequest(channel, "notification", {"message": f"m{n}", "level": "info"}, key)


async def publish(
    broker: MemoryBroker, channel: str = "news:a", count: int = 1, key: str | None = None
) -> list[PublishResult]:
    return await broker.publish([request(channel, n, key) for n in range(count)])


# -- offsets and epochs ---------------------------------------------------------------


async def test_offsets_increase_by_exactly_one_per_event(broker: MemoryBroker) -> None:
    """Offsets of a channel go 1, 2, 3... across single and multi-event publishes."""
    first = await publish(broker, count=1)
    batch = await publish(broker, count=4)
    last = await publish(broker, count=1)
    results = first + batch + last
    assert [r.offset for r in results] == [1, 2, 3, 4, 5, 6]
    assert len({r.epoch for r in results}) == 1
    assert len({r.id for r in results}) == 6
    assert all(r.channel == "news:a" for r in results)
    position = await broker.position("news:a")
    assert (position.offset, position.epoch) == (6, results[0].epoch)


async def test_channels_have_independent_offsets_and_epochs(broker: MemoryBroker) -> None:
    """Each channel counts from 1 under its own epoch; a mixed publish keeps request order."""
    results = await broker.publish([request("news:a"), request("news:b"), request("news:a")])
    assert [(r.channel, r.offset) for r in results] == [("news:a", 1), ("news:b", 1), ("news:a", 2)]
    assert results[0].epoch == results[2].epoch
    assert results[0].epoch != results[1].epoch


async def test_epochs_differ_between_streams_and_between_brokers() -> None:
    """Epochs are 8 hex digits, distinct per stream and per broker instance (a restarted
    server must never reuse its predecessor's epochs)."""
    first, second = MemoryBroker(), MemoryBroker()
    epochs = [
        (await broker.position(f"news:{index}")).epoch
        for broker in (first, second)
        for index in range(100)
    ]
    assert all(len(epoch) == 8 and int(epoch, 16) >= 0 for epoch in epochs)
    assert len(set(epochs)) == len(epochs)


async def test_position_of_an_empty_channel_is_zero_with_a_stable_epoch(
    broker: MemoryBroker,
) -> None:
    """An unknown channel is at offset 0; its epoch stays the one its first event gets."""
    empty = await broker.position("news:new")
    assert empty.offset == 0
    assert empty.epoch
    (result,) = await publish(broker, "news:new")
    assert result.offset == 1
    assert result.epoch == empty.epoch


async def test_a_new_broker_starts_every_stream_under_a_new_epoch(clock: FakeClock) -> None:
    """After a restart (a new broker) history is gone: offsets restart under a new epoch."""
    before = make_broker(clock)
    (old,) = await publish(before)
    after = make_broker(clock)
    (new,) = await publish(after)
    assert new.offset == 1
    assert new.epoch != old.epoch
    page = await after.history("news:a", 0, 10)
    assert [e.offset for e in page.events] == [1]


# -- history --------------------------------------------------------------------------


async def test_history_returns_the_oldest_limit_events_after_since(broker: MemoryBroker) -> None:
    """``history(since, limit)`` returns the first ``limit`` events after ``since``."""
    results = await publish(broker, count=10)
    page = await broker.history("news:a", 3, 4)
    assert [e.offset for e in page.events] == [4, 5, 6, 7]
    assert page.complete
    assert (page.position.offset, page.position.epoch) == (10, results[0].epoch)
    payload = json.loads(page.events[0].payload)
    assert payload["type"] == "notification"
    assert payload["channel"] == "news:a"
    assert payload["offset"] == 4
    assert payload["id"] == results[3].id
    assert payload["data"] == {"message": "m3", "level": "info"}
    assert payload["timestamp"].endswith("Z")
    everything = await broker.history("news:a", 0, 100)
    assert [e.offset for e in everything.events] == list(range(1, 11))
    assert (await broker.history("news:a", 3, 0)).events == []


async def test_history_at_and_past_the_head(broker: MemoryBroker) -> None:
    """Since the latest offset: complete and empty; since a future offset: not complete."""
    await publish(broker, count=3)
    at_head = await broker.history("news:a", 3, 10)
    assert at_head.events == [] and at_head.complete
    future = await broker.history("news:a", 4, 10)
    assert future.events == [] and not future.complete
    empty = await broker.history("news:none", 0, 10)
    assert empty.position.offset == 0 and empty.events == [] and empty.complete


async def test_history_is_incomplete_when_since_is_older_than_the_oldest_kept(
    clock: FakeClock,
) -> None:
    """With a small history, asking from before the oldest kept event is not complete."""
    broker = make_broker(clock, history_size=3)
    await publish(broker, count=5)
    kept = await broker.history("news:a", 2, 10)
    assert [e.offset for e in kept.events] == [3, 4, 5]
    assert kept.complete
    gap = await broker.history("news:a", 1, 10)
    assert [e.offset for e in gap.events] == [3, 4, 5]
    assert not gap.complete
    assert not (await broker.history("news:a", 0, 10)).complete
    assert (await broker.history("news:a", 4, 1)).complete


async def test_history_size_zero_keeps_nothing(clock: FakeClock) -> None:
    """With history.size 0 offsets still advance, no event is kept, and only the head is
    complete."""
    broker = make_broker(clock, history_size=0)
    results = await publish(broker, count=2)
    assert [r.offset for r in results] == [1, 2]
    behind = await broker.history("news:a", 0, 10)
    assert behind.events == [] and not behind.complete
    assert behind.position.offset == 2
    head = await broker.history("news:a", 2, 10)
    assert head.events == [] and head.complete


# -- idempotency ----------------------------------------------------------------------


async def test_idempotent_retry_returns_the_first_result(
    broker: MemoryBroker, handler: RecordingHandler
) -> None:
    """A retry with the same key and channel returns the first result, marked duplicate,
    and publishes nothing."""
    await broker.subscribe("news:a")
    (first,) = await publish(broker, key="k1")
    (retry,) = await publish(broker, key="k1")
    assert not first.duplicate
    assert retry == first._replace(duplicate=True)
    assert (await broker.position("news:a")).offset == 1
    assert [offset for _, offset, _, _ in handler.events] == [1]
    (other,) = await publish(broker)
    assert other.offset == 2


async def test_idempotency_is_scoped_per_channel(broker: MemoryBroker) -> None:
    """The same key on another channel is another event; a retry of both is deduplicated,
    and so is a repeat within one call."""
    first = await broker.publish([request("news:a", key="k"), request("news:b", key="k")])
    assert [(r.channel, r.offset) for r in first] == [("news:a", 1), ("news:b", 1)]
    retry = await broker.publish([request("news:a", key="k"), request("news:b", key="k")])
    assert retry == [result._replace(duplicate=True) for result in first]
    once, twice = await broker.publish([request("news:d", key="k"), request("news:d", key="k")])
    assert (once.offset, once.duplicate) == (1, False)
    assert twice == once._replace(duplicate=True)
    (fresh,) = await publish(broker, "news:c", key="k")
    assert fresh.offset == 1 and fresh.channel == "news:c"


async def test_idempotency_expires_after_the_window(broker: MemoryBroker, clock: FakeClock) -> None:
    """Inside the window a retry is deduplicated; after it the same key publishes again."""
    (first,) = await publish(broker, key="k")
    clock.advance(WINDOW - 0.5)
    (inside,) = await publish(broker, key="k")
    assert inside == first._replace(duplicate=True)
    clock.advance(1.0)
    (after,) = await publish(broker, key="k")
    assert after.offset == 2 and not after.duplicate
    assert after.id != first.id
    (again,) = await publish(broker, key="k")
    assert again == after._replace(duplicate=True)  # the new publish opened a new window


async def test_expire_drops_stale_idempotency_records(
    broker: MemoryBroker, clock: FakeClock
) -> None:
    """``expire()`` forgets records older than the window but keeps fresh ones."""
    (old,) = await publish(broker, key="old")
    clock.advance(WINDOW / 2)
    (fresh,) = await publish(broker, key="fresh")
    clock.advance(WINDOW / 2 + 0.1)
    broker.expire()
    (old_again,) = await publish(broker, key="old")
    (fresh_again,) = await publish(broker, key="fresh")
    assert old_again.offset == 3 and old_again.id != old.id and not old_again.duplicate
    assert fresh_again == fresh._replace(duplicate=True)


# -- expiry ---------------------------------------------------------------------------


async def test_idle_stream_expires_and_comes_back_under_a_new_epoch(
    broker: MemoryBroker, clock: FakeClock
) -> None:
    """An unsubscribed stream idle for ``history_ttl`` is forgotten: new epoch, offset 0."""
    (first,) = await publish(broker)
    clock.advance(TTL - 1)
    broker.expire()
    assert (await broker.position("news:a")).epoch == first.epoch  # not yet
    clock.advance(1)
    broker.expire()
    position = await broker.position("news:a")
    assert position.offset == 0
    assert position.epoch != first.epoch
    assert (await broker.history("news:a", 0, 10)).events == []
    (again,) = await publish(broker)
    assert again.offset == 1 and again.epoch == position.epoch


async def test_publishing_keeps_a_stream_alive(broker: MemoryBroker, clock: FakeClock) -> None:
    """Each publish restarts the idle time of its stream."""
    (first,) = await publish(broker)
    clock.advance(TTL - 1)
    await publish(broker)
    clock.advance(TTL - 1)
    broker.expire()
    position = await broker.position("news:a")
    assert (position.offset, position.epoch) == (2, first.epoch)


async def test_a_subscribed_stream_does_not_expire(broker: MemoryBroker, clock: FakeClock) -> None:
    """While this node subscribes to a channel its stream is kept; after unsubscribe it
    expires once idle for the TTL."""
    await broker.subscribe("news:a")
    (first,) = await publish(broker)
    clock.advance(TTL * 10)
    broker.expire()
    position = await broker.position("news:a")
    assert (position.offset, position.epoch) == (1, first.epoch)
    await broker.unsubscribe("news:a")
    clock.advance(TTL - 1)
    broker.expire()
    assert (await broker.position("news:a")).epoch == first.epoch
    clock.advance(1)
    broker.expire()
    assert (await broker.position("news:a")).epoch != first.epoch


async def test_a_departure_becomes_a_leave_once_its_ttl_has_passed(
    broker: MemoryBroker, handler: RecordingHandler, clock: FakeClock
) -> None:
    """A departed user leaves when ``ttl`` has passed on the clock, not before, and one
    who comes back within the ttl never leaves (the expiry is called by hand here; the
    broker's own timer waits the real ttl, far longer than this test)."""
    await broker.presence_arrive("room:a", "alice", TTL)
    await broker.presence_arrive("room:a", "bob", TTL)
    assert [(c.user_id, c.kind) for c in handler.changes] == [("alice", "join"), ("bob", "join")]
    await broker.presence_depart("room:a", "alice", TTL)
    await broker.presence_depart("room:a", "bob", TTL)
    clock.advance(TTL - 1)
    broker.expire_presence()
    assert len(handler.changes) == 2
    await broker.presence_arrive("room:a", "bob", TTL)  # back within the ttl
    clock.advance(1)
    broker.expire_presence()
    assert [(c.user_id, c.kind) for c in handler.changes[2:]] == [("alice", "leave")]
    clock.advance(TTL * 10)
    broker.expire_presence()
    assert len(handler.changes) == 3


# -- delivery and node views ----------------------------------------------------------


async def test_delivery_only_for_subscribed_channels_in_order(
    broker: MemoryBroker, handler: RecordingHandler
) -> None:
    """Only node-subscribed channels reach ``on_event``, synchronously and in offset order."""
    await broker.subscribe("news:a")
    results = await broker.publish(
        [request("news:a", 0), request("news:b", 0), request("news:a", 1)]
    )
    assert [(c, o) for c, o, _, _ in handler.events] == [("news:a", 1), ("news:a", 2)]
    assert {e for _, _, e, _ in handler.events} == {results[0].epoch}
    channel, offset, _, message = handler.events[1]
    assert message["channel"] == channel and message["offset"] == offset
    assert message["id"] == results[2].id
    assert message["data"] == {"message": "m1", "level": "info"}
    await broker.unsubscribe("news:a")
    await publish(broker)
    assert len(handler.events) == 2
    await broker.subscribe("news:b")
    await publish(broker, "news:b", count=2)
    assert [(c, o) for c, o, _, _ in handler.events[2:]] == [("news:b", 2), ("news:b", 3)]
    assert handler.lost == []


async def test_no_delivery_before_start_or_after_close(clock: FakeClock) -> None:
    """Without a started handler a publish still lands in history but is not delivered."""
    handler = RecordingHandler()
    broker = make_broker(clock)
    await broker.subscribe("news:a")
    await publish(broker)
    await broker.start(handler)
    await publish(broker)
    await broker.close()
    await publish(broker)
    assert [o for _, o, _, _ in handler.events] == [2]
    assert [e.offset for e in (await broker.history("news:a", 0, 10)).events] == [1, 2, 3]


async def test_channels_presence_and_disconnect_delegate_to_the_handler(
    broker: MemoryBroker, handler: RecordingHandler
) -> None:
    """Node views come from the handler; disconnect_user is handed to it."""
    handler.channels.update({"news:a": 2, "news:b": 1, "chat:x": 3})
    handler.presence["news:a"] = {"alice": 2, "bob": 1}
    assert await broker.channels("") == {"news:a": 2, "news:b": 1, "chat:x": 3}
    assert await broker.channels("news:") == {"news:a": 2, "news:b": 1}
    assert await broker.channels("nope") == {}
    assert await broker.presence("news:a") == {"alice": 2, "bob": 1}
    assert await broker.presence("news:b") == {}
    await broker.disconnect_user("alice", "banned")
    assert handler.disconnects == [("alice", "banned")]
    assert await broker.ready()


async def test_views_are_empty_without_a_handler(clock: FakeClock) -> None:
    """A broker that was never started reports no channels or presence and disconnects
    nobody."""
    broker = make_broker(clock)
    assert await broker.channels("") == {}
    assert await broker.presence("news:a") == {}
    await broker.disconnect_user("alice", "")


async def test_sweep_survives_a_failing_expire(
    clock: FakeClock,
    handler: RecordingHandler,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An expire() that raises is logged and the sweep runs again, so idle streams are
    still forgotten afterwards (the sweeper is supervised, not a bare task)."""
    broker = make_broker(clock, sweep_interval=0.001, supervisor=Supervisor(delays=(0.001, 0.001)))
    calls = 0
    swept_again = asyncio.Event()
    real_expire = broker.expire

    def flaky_expire() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        real_expire()
        swept_again.set()

    monkeypatch.setattr(broker, "expire", flaky_expire)
    await broker.start(handler)
    try:
        await asyncio.wait_for(swept_again.wait(), TIMEOUT)
    finally:
        await broker.close()
    assert any("memory-broker-sweep failed" in r.getMessage() for r in caplog.records)
