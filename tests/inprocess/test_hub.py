"""Hub: bookkeeping and per-tick coalesced fan-out, with fake connections (no sockets)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from fakes import FakeConn, next_tick, parse_frames
from tidings.hub import Hub
from tidings.protocol import encode_message, text_frame


def frame(offset: int, channel: str = "news:a") -> bytes:
    """A real encoded event frame for ``offset``."""
    return text_frame(
        encode_message("notification", {"n": offset}, channel=channel, offset=offset, timestamp=0.0)
    )


def offsets(conn: FakeConn) -> list[list[int]]:
    """The event offsets of each write the connection received."""
    return [[m["offset"] for m in parse_frames(write)] for write in conn.writes]


def make_hub(*conns: FakeConn, **kwargs: Any) -> Hub[FakeConn]:
    hub: Hub[FakeConn] = Hub(**kwargs)
    for conn in conns:
        hub.add_connection(conn)
    return hub


# -- the fake itself ------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_parse_frames_reads_every_length_form(size: int) -> None:
    """The test parser decodes joined frames with 7-bit, 16-bit and 64-bit lengths."""
    big = text_frame(encode_message("big", {"pad": "x" * size}, timestamp=0.0))
    small = text_frame(b'{"type":"small"}')
    messages = parse_frames(small + big + small)
    assert [m["type"] for m in messages] == ["small", "big", "small"]
    assert len(messages[1]["data"]["pad"]) == size


# -- fan-out --------------------------------------------------------------------------


async def test_frames_of_one_tick_are_joined_into_one_write_per_subscriber() -> None:
    """Frames delivered in one tick reach each subscriber as a single write, in order."""
    a, b = FakeConn("a"), FakeConn("b")
    hub = make_hub(a, b)
    hub.subscribe(a, "news:a", hold=False)
    hub.subscribe(b, "news:a", hold=False)
    assert hub.deliver("news:a", 1, frame(1)) == 2
    assert hub.deliver("news:a", 2, frame(2)) == 2
    assert hub.deliver("news:a", 3, frame(3)) == 2
    assert a.writes == [] and b.writes == []  # nothing before the end of the tick
    await next_tick()
    assert a.writes == [frame(1) + frame(2) + frame(3)]
    assert b.writes == a.writes
    hub.deliver("news:a", 4, frame(4))
    await next_tick()
    assert offsets(a) == [[1, 2, 3], [4]]
    assert offsets(b) == [[1, 2, 3], [4]]


async def test_deliver_to_a_channel_without_subscribers_is_dropped() -> None:
    """A channel nobody subscribes to here queues nothing and writes nothing."""
    a = FakeConn("a")
    hub = make_hub(a)
    hub.subscribe(a, "news:a", hold=False)
    assert hub.deliver("news:other", 1, frame(1, "news:other")) == 0
    await next_tick()
    assert a.writes == []


async def test_several_channels_are_written_separately_and_in_order() -> None:
    """Each channel's frames of a tick form one write; subscribers get only their channels."""
    a, b = FakeConn("a"), FakeConn("b")
    hub = make_hub(a, b)
    hub.subscribe(a, "news:a", hold=False)
    hub.subscribe(a, "news:b", hold=False)
    hub.subscribe(b, "news:b", hold=False)
    hub.deliver("news:a", 1, frame(1, "news:a"))
    hub.deliver("news:b", 7, frame(7, "news:b"))
    hub.deliver("news:a", 2, frame(2, "news:a"))
    hub.deliver("news:b", 8, frame(8, "news:b"))
    await next_tick()
    assert a.writes == [
        frame(1, "news:a") + frame(2, "news:a"),
        frame(7, "news:b") + frame(8, "news:b"),
    ]
    assert b.writes == [frame(7, "news:b") + frame(8, "news:b")]


async def test_subscriber_added_mid_tick_gets_the_tick_in_one_ordered_write() -> None:
    """A subscriber that joins during a tick gets that tick's frames, in order, once."""
    a, b = FakeConn("a"), FakeConn("b")
    hub = make_hub(a, b)
    hub.subscribe(a, "news:a", hold=False)
    assert hub.deliver("news:a", 1, frame(1)) == 1
    hub.subscribe(b, "news:a", hold=False)
    assert hub.deliver("news:a", 2, frame(2)) == 2
    await next_tick()
    assert offsets(a) == [[1, 2]]
    assert offsets(b) == [[1, 2]]


async def test_subscriber_added_mid_tick_with_after_skips_older_frames() -> None:
    """A subscriber joining mid-tick whose ``after`` covers the first frame gets the rest."""
    a, b = FakeConn("a"), FakeConn("b")
    hub = make_hub(a, b)
    hub.subscribe(a, "news:a", hold=False)
    hub.deliver("news:a", 1, frame(1))
    sub, first = hub.subscribe(b, "news:a", hold=True)
    assert not first
    assert hub.release(sub, 1) == []  # it went live at offset 1
    hub.deliver("news:a", 2, frame(2))
    await next_tick()
    assert offsets(a) == [[1, 2]]
    assert offsets(b) == [[2]]


async def test_after_filter_sends_only_newer_frames() -> None:
    """A subscriber whose ``after`` is at or past the first frame gets only newer frames."""
    a, b, c = FakeConn("a"), FakeConn("b"), FakeConn("c")
    hub = make_hub(a, b, c)
    for conn, after in ((a, 0), (b, 2), (c, 5)):
        sub, _ = hub.subscribe(conn, "news:a", hold=True)
        hub.release(sub, after)
    for offset in (1, 2, 3):
        hub.deliver("news:a", offset, frame(offset))
    await next_tick()
    assert offsets(a) == [[1, 2, 3]]
    assert offsets(b) == [[3]]
    assert c.writes == []  # nothing newer than 5: no empty write either


# -- hold and release -----------------------------------------------------------------


async def test_held_frames_are_released_in_order_after_the_replay_point() -> None:
    """A held subscriber writes nothing; release returns frames past ``after``, then live."""
    a = FakeConn("a")
    hub = make_hub(a)
    sub, first = hub.subscribe(a, "news:a", hold=True)
    assert first
    for offset in (4, 5, 6):
        hub.deliver("news:a", offset, frame(offset))
    await next_tick()
    assert a.writes == []
    hub.deliver("news:a", 7, frame(7))
    await next_tick()
    assert a.writes == []
    assert hub.release(sub, 5) == [frame(6), frame(7)]
    assert sub.pending is None
    assert sub.after == 7
    assert sub.start == 5
    # A duplicate of an already released offset is skipped; newer frames go out.
    hub.deliver("news:a", 7, frame(7))
    hub.deliver("news:a", 8, frame(8))
    await next_tick()
    assert offsets(a) == [[8]]


async def test_release_drops_duplicate_held_offsets() -> None:
    """Frames held twice for the same offset come out once, in increasing order."""
    a = FakeConn("a")
    hub = make_hub(a)
    sub, _ = hub.subscribe(a, "news:a", hold=True)
    for offset in (1, 2, 2, 3, 3):
        hub.deliver("news:a", offset, frame(offset))
    await next_tick()
    assert hub.release(sub, 0) == [frame(1), frame(2), frame(3)]
    assert sub.after == 3


async def test_release_with_after_past_every_held_frame_returns_nothing() -> None:
    """Held frames already covered by the replay are all discarded."""
    a = FakeConn("a")
    hub = make_hub(a)
    sub, _ = hub.subscribe(a, "news:a", hold=True)
    hub.deliver("news:a", 1, frame(1))
    hub.deliver("news:a", 2, frame(2))
    await next_tick()
    assert hub.release(sub, 2) == []
    assert sub.after == 2
    hub.deliver("news:a", 3, frame(3))
    await next_tick()
    assert offsets(a) == [[3]]


async def test_hold_again_holds_live_frames_until_the_next_release() -> None:
    """``hold`` on a live subscriber (re-subscription) holds frames until release."""
    a = FakeConn("a")
    hub = make_hub(a)
    sub, _ = hub.subscribe(a, "news:a", hold=False)
    hub.deliver("news:a", 1, frame(1))
    await next_tick()
    hub.hold(sub)
    hub.deliver("news:a", 2, frame(2))
    await next_tick()
    assert offsets(a) == [[1]]
    assert hub.release(sub, 1) == [frame(2)]
    assert sub.after == 2


async def test_subscribing_twice_keeps_one_membership_and_the_same_subscriber() -> None:
    """A second subscribe of the same connection returns the existing subscriber."""
    a = FakeConn("a")
    hub = make_hub(a)
    sub, first = hub.subscribe(a, "news:a", hold=True)
    again, first_again = hub.subscribe(a, "news:a", hold=False)
    assert first and not first_again
    assert again is sub
    assert hub.channel_counts() == {"news:a": 1}
    assert hub.subscriber(a, "news:a") is sub


async def test_pending_overflow_calls_the_callback_with_the_connection() -> None:
    """Holding more frames than ``pending_limit`` reports the subscriber's connection."""
    overflowed: list[FakeConn] = []
    a, b = FakeConn("a"), FakeConn("b")
    hub = make_hub(a, b, pending_limit=2, on_pending_overflow=overflowed.append)
    held, _ = hub.subscribe(a, "news:a", hold=True)
    hub.subscribe(b, "news:a", hold=False)
    hub.deliver("news:a", 1, frame(1))
    hub.deliver("news:a", 2, frame(2))
    await next_tick()
    assert overflowed == []  # at the limit, not past it
    hub.deliver("news:a", 3, frame(3))
    await next_tick()
    assert overflowed == [a]
    assert held.pending == []  # the held frames are dropped
    assert offsets(b) == [[1, 2], [3]]  # the direct subscriber is unaffected


async def test_on_written_reports_the_frames_each_connection_was_sent() -> None:
    """``on_written`` reports what was written: whole ticks once with their subscriber
    count, partial writes per subscriber, and nothing for held or already-sent frames."""
    reports: list[tuple[list[int], int]] = []

    def written(frames: Sequence[bytes], connections: int) -> None:
        reports.append(([m["offset"] for m in parse_frames(b"".join(frames))], connections))

    a, b, c, held = FakeConn("a"), FakeConn("b"), FakeConn("c"), FakeConn("held")
    hub = make_hub(a, b, c, held, on_written=written)
    for conn in (a, b, c):
        hub.subscribe(conn, "news:a", hold=False)
    hub.subscribe(held, "news:a", hold=True)
    behind, _ = hub.subscribe(c, "news:a", hold=False)
    behind.after = 2  # c was sent 1 and 2 already (a replay)
    for offset in (1, 2, 3):
        hub.deliver("news:a", offset, frame(offset))
    await next_tick()
    assert sorted(reports) == [([1, 2, 3], 2), ([3], 1)]
    assert offsets(c) == [[3]] and held.writes == []
    reports.clear()
    hub.deliver("news:a", 4, frame(4))
    await next_tick()
    assert reports == [([4], 3)]


# -- bookkeeping ----------------------------------------------------------------------


async def test_remove_connection_returns_the_channels_it_emptied() -> None:
    """Removing a connection reports exactly the channels left without local subscribers."""
    a, b = FakeConn("a", "u1"), FakeConn("b", "u2")
    hub = make_hub(a, b)
    for channel in ("news:a", "news:b", "news:c"):
        hub.subscribe(a, channel, hold=False)
    hub.subscribe(b, "news:b", hold=False)
    assert sorted(hub.remove_connection(a)) == ["news:a", "news:c"]
    assert not hub.is_connected(a)
    assert hub.peer("a") is None
    assert hub.connection_count() == 1
    assert hub.user_connection_count("u1") == 0
    assert hub.connections_of("u1") == []
    assert sorted(hub.channels()) == ["news:b"]
    assert hub.subscribers("news:b") == [b]
    assert not hub.has_channel("news:a")
    assert hub.remove_connection(a) == []  # unknown by now
    hub.deliver("news:a", 1, frame(1))
    await next_tick()
    assert a.writes == []


async def test_unsubscribe_reports_the_last_local_subscriber() -> None:
    """``unsubscribe`` is True only for the last local subscriber, and idempotent."""
    a, b = FakeConn("a"), FakeConn("b")
    hub = make_hub(a, b)
    hub.subscribe(a, "news:a", hold=False)
    hub.subscribe(b, "news:a", hold=False)
    assert hub.unsubscribe(a, "news:a") is False
    assert hub.unsubscribe(a, "news:a") is False  # not subscribed any more
    assert not hub.is_subscribed(a, "news:a")
    assert hub.is_subscribed(b, "news:a")
    assert hub.unsubscribe(b, "news:a") is True
    assert not hub.has_channel("news:a")
    assert hub.channel_counts() == {}


async def test_presence_and_channel_counts() -> None:
    """Presence counts connections per user; channel counts count subscribers."""
    a1, a2, b1 = FakeConn("a1", "alice"), FakeConn("a2", "alice"), FakeConn("b1", "bob")
    hub = make_hub(a1, a2, b1)
    for conn in (a1, a2, b1):
        hub.subscribe(conn, "room:1", hold=False)
    hub.subscribe(b1, "room:2", hold=False)
    assert hub.presence("room:1") == {"alice": 2, "bob": 1}
    assert hub.presence("room:2") == {"bob": 1}
    assert hub.presence("room:none") == {}
    assert hub.channel_counts() == {"room:1": 3, "room:2": 1}
    assert hub.user_connection_count("alice") == 2
    assert sorted(c.conn_id for c in hub.connections_of("alice")) == ["a1", "a2"]
    hub.remove_connection(a2)
    assert hub.presence("room:1") == {"alice": 1, "bob": 1}
    assert hub.channel_counts() == {"room:1": 2, "room:2": 1}


async def test_connections_snapshot_survives_removal_while_iterating() -> None:
    """``connections()`` is a snapshot: removing connections during iteration is safe."""
    conns = [FakeConn(f"c{i}") for i in range(5)]
    hub = make_hub(*conns)
    seen = []
    for conn in hub.connections():
        seen.append(conn.conn_id)
        hub.remove_connection(conn)
    assert seen == [c.conn_id for c in conns]
    assert hub.connection_count() == 0


async def test_send_that_closes_connections_during_flush_does_not_break_the_loop() -> None:
    """A write that unsubscribes its own and another connection mid-flush leaves the rest
    of the fan-out, later ticks and the bookkeeping intact."""
    hub: Hub[FakeConn]
    victim = FakeConn("victim")
    others = [FakeConn(f"o{i}") for i in range(3)]

    def close_on_send(conn: FakeConn, _: bytes) -> None:
        hub.unsubscribe(conn, "news:a")
        hub.remove_connection(conn)
        hub.remove_connection(victim)

    closer = FakeConn("closer", on_send=close_on_send)
    hub = make_hub(closer, victim, *others)
    for conn in (closer, victim, *others):
        hub.subscribe(conn, "news:a", hold=False)
        hub.subscribe(conn, "news:b", hold=False)
    hub.deliver("news:a", 1, frame(1, "news:a"))
    hub.deliver("news:b", 1, frame(1, "news:b"))
    await next_tick()
    for conn in others:
        assert offsets(conn) == [[1], [1]]
    assert len(closer.writes) == 1  # removed after its first write: no news:b
    assert hub.connection_count() == 3
    assert hub.channel_counts() == {"news:a": 3, "news:b": 3}
    hub.deliver("news:a", 2, frame(2, "news:a"))
    await next_tick()
    for conn in others:
        assert offsets(conn) == [[1], [1], [2]]
    assert len(closer.writes) == 1


async def test_a_send_that_delivers_again_is_flushed_on_the_next_tick() -> None:
    """A frame delivered from inside a write is not lost: a later flush writes it."""
    hub: Hub[FakeConn]

    def echo(conn: FakeConn, data: bytes) -> None:
        if len(conn.writes) == 1:
            hub.deliver("news:a", 2, frame(2))

    a = FakeConn("a", on_send=echo)
    hub = make_hub(a)
    hub.subscribe(a, "news:a", hold=False)
    hub.deliver("news:a", 1, frame(1))
    await next_tick()
    await next_tick()
    assert offsets(a) == [[1], [2]]


async def test_fan_out_is_timed_from_delivery_to_the_write_once_per_event() -> None:
    """on_fanned_out gets, per delivered event, the time from deliver until its frame was
    written to every subscriber at the end of the tick (slow writes included); nothing
    for a channel without subscribers, and a held subscriber is not waited for."""
    now = [0.0]

    def slow_write(conn: FakeConn, data: bytes) -> None:
        now[0] += 1.0  # each write into a transport takes one second of the fake clock

    a = FakeConn("a", on_send=slow_write)
    b = FakeConn("b", on_send=slow_write)
    held = FakeConn("held", on_send=slow_write)
    observed: list[float] = []
    hub = make_hub(a, b, held, on_fanned_out=observed.append, clock=lambda: now[0])
    hub.subscribe(a, "news:a", hold=False)
    hub.subscribe(b, "news:a", hold=False)
    hub.subscribe(b, "news:b", hold=False)
    hub.subscribe(held, "news:c", hold=True)
    hub.deliver("news:a", 1, frame(1))
    now[0] = 0.5
    hub.deliver("news:a", 2, frame(2))
    hub.deliver("news:b", 1, frame(1, "news:b"))
    hub.deliver("news:c", 1, frame(1, "news:c"))
    hub.deliver("news:none", 1, frame(1, "news:none"))
    assert observed == []  # nothing is written before the end of the tick
    await next_tick()
    # Three writes (a and b for news:a, b for news:b): the flush ends at 3.5.
    assert now[0] == 3.5
    assert observed == [3.5, 3.0, 3.0, 3.0]
    assert held.writes == []
