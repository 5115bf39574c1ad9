"""Unit tests of the client's pure parts: backoff, close-code decisions, offset bookkeeping,
the bounded subscription queue and the event model. No network."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidings.client import (
    Action,
    Backoff,
    ChannelTracker,
    Client,
    Event,
    Gap,
    ProtocolViolation,
    Subscription,
    decide,
)
from tidings.client.errors import AuthenticationFailed, SubscriptionError
from tidings.client.models import Item
from tidings.client.tokens import TokenSource, parse_expiry
from timeouts import TIMEOUT


def ev(offset: int, channel: str = "news:a") -> Event:
    return Event(
        "notification",
        channel,
        offset,
        f"evt_{offset}",
        datetime(2026, 1, 1, tzinfo=UTC),
        {"n": offset},
    )


def offsets(items: list[Item]) -> list[int | str]:
    return [i.offset if isinstance(i, Event) else f"gap:{i.last_offset}->{i.offset}" for i in items]


# -- backoff ---------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap() -> None:
    """With random() = 1 the delays are the ceilings: 0.5 s doubling up to the 20 s cap."""
    backoff = Backoff(random=lambda: 1.0)
    assert [backoff.next_delay() for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 20, 20, 20]


def test_backoff_full_jitter_scales_the_ceiling() -> None:
    """Full jitter: each delay is random() times the current ceiling, from zero up."""
    draws = iter([0.0, 0.5, 0.25, 0.999])
    backoff = Backoff(initial=1.0, cap=100.0, random=lambda: next(draws))
    assert [backoff.next_delay() for _ in range(4)] == [0.0, 1.0, 1.0, 8 * 0.999]


def test_backoff_slow_delay_has_a_floor() -> None:
    """A slow delay (4429) is the floor plus the jittered delay, so never below the floor."""
    assert Backoff(random=lambda: 0.0).next_delay(slow=True) == 5.0
    assert Backoff(random=lambda: 1.0).next_delay(slow=True) == 5.5
    late = Backoff(random=lambda: 0.5, slow_floor=5.0)
    late.attempt = 10
    assert late.next_delay(slow=True) == 15.0
    assert Backoff(random=lambda: 1.0, cap=0.1, slow_floor=3.0).next_delay(slow=True) == 3.1


def test_backoff_resets_after_a_connection_stayed_up() -> None:
    """The attempt counter resets only when the connection lasted reset_after seconds."""
    backoff = Backoff(random=lambda: 1.0)
    for _ in range(4):
        backoff.next_delay()
    backoff.connected(100.0)
    backoff.disconnected(109.9)
    assert backoff.next_delay() == 8.0
    backoff.connected(200.0)
    backoff.disconnected(210.0)
    assert backoff.attempt == 0
    assert backoff.next_delay() == 0.5


def test_backoff_rejects_bad_parameters() -> None:
    """Negative durations and a multiplier below 1 are refused."""
    with pytest.raises(ValueError):
        Backoff(initial=-1)
    with pytest.raises(ValueError):
        Backoff(multiplier=0.5)


# -- close-code decisions --------------------------------------------------------------


@pytest.mark.parametrize("code", [1001, 1009, 1011, 1013, 4408, None, 1006, 4000, 4999])
def test_decide_reconnects(code: int | None) -> None:
    """Going away, errors, overload, heartbeat timeout, abnormal and unknown closes reconnect."""
    assert decide(code, has_token_provider=False).action is Action.RECONNECT


def test_decide_4429_reconnects_slowly() -> None:
    """4429 (too many connections, command flood) reconnects after a longer floor."""
    assert decide(4429, has_token_provider=True).action is Action.RECONNECT_SLOWLY


def test_decide_4401_needs_a_provider() -> None:
    """4401 asks the provider for a token; without one the client stops with an auth error."""
    assert decide(4401, has_token_provider=True).action is Action.NEW_TOKEN
    stop = decide(4401, has_token_provider=False)
    assert stop.action is Action.STOP and stop.auth
    assert "token_provider" in stop.reason


@pytest.mark.parametrize("code", [1000, 4403])
def test_decide_stops(code: int) -> None:
    """Normal closure and a disconnect by the application stop the client for good."""
    decision = decide(code, has_token_provider=True)
    assert decision.action is Action.STOP and not decision.auth
    assert str(code) in decision.reason


# -- tokens ----------------------------------------------------------------------------


def test_refresh_is_scheduled_before_expiry() -> None:
    """Refresh refresh_margin before expiry, or at half the remaining lifetime if shorter."""
    now = [1000.0]
    tokens = TokenSource("t", lambda: "new", refresh_margin=30, wall_clock=lambda: now[0])
    assert tokens.refresh_delay() is None
    tokens.accepted("1970-01-01T01:16:40Z")  # 4600 = now + 3600
    assert parse_expiry("1970-01-01T01:16:40Z") == 4600
    assert tokens.refresh_delay() == 3570
    tokens.accepted("1970-01-01T00:16:50Z")  # now + 10
    assert tokens.refresh_delay() == 5
    now[0] = 2000.0
    assert tokens.refresh_delay() == 0
    static = TokenSource("t", None, refresh_margin=30, wall_clock=lambda: now[0])
    static.accepted("1970-01-01T01:16:40Z")
    assert static.refresh_delay() is None


def test_refreshed_token_must_expire_later() -> None:
    """A refreshed token that does not expire later stops the refresh loop (no spinning)."""
    tokens = TokenSource("t", lambda: "new", refresh_margin=30, wall_clock=lambda: 0.0)
    tokens.accepted("1970-01-01T00:01:40Z")
    assert tokens.refreshed("t2", "1970-01-01T00:03:20Z") and tokens.token == "t2"
    assert not tokens.refreshed("t3", "1970-01-01T00:03:20Z")


async def test_token_for_connection_asks_the_provider_when_needed() -> None:
    """The provider is asked with no token, after a rejection, or once the token expired."""
    calls = 0
    now = [0.0]

    async def provider() -> str:
        nonlocal calls
        calls += 1
        return f"p{calls}"

    tokens = TokenSource("static", provider, refresh_margin=30, wall_clock=lambda: now[0])
    assert await tokens.for_connection() == "static" and calls == 0
    tokens.rejected()
    assert await tokens.for_connection() == "p1"
    tokens.accepted("1970-01-01T00:01:40Z")
    now[0] = 100.0
    assert await tokens.for_connection() == "p2"


async def test_failing_or_empty_provider_is_an_authentication_failure() -> None:
    """A provider that raises or returns no token raises AuthenticationFailed."""

    def broken() -> str:
        raise RuntimeError("down")

    with pytest.raises(AuthenticationFailed, match="down"):
        await TokenSource(None, broken, refresh_margin=1, wall_clock=lambda: 0).fetch()
    with pytest.raises(AuthenticationFailed, match="no token"):
        await TokenSource(None, lambda: "", refresh_margin=1, wall_clock=lambda: 0).fetch()


# -- offset bookkeeping ----------------------------------------------------------------


def test_tracker_fresh_subscription_delivers_live_events_and_drops_duplicates() -> None:
    """After a plain subscribe the reply's offset is the baseline; repeats are dropped."""
    tracker = ChannelTracker("news:a")
    assert tracker.recover_point() is None
    assert tracker.subscribed(5, "e1", None) == []
    assert offsets(tracker.event(ev(6))) == [6]
    assert tracker.event(ev(6)) == []
    assert tracker.event(ev(3)) == []
    assert offsets(tracker.event(ev(7))) == [7]
    assert tracker.recover_point() == (7, "e1")


def test_tracker_recovered_replay_is_delivered_in_order_once() -> None:
    """recovered: true is followed by the replay of every missed offset, each once."""
    tracker = ChannelTracker("news:a")
    tracker.subscribed(7, "e1", None)
    tracker.begin()
    assert tracker.subscribed(10, "e1", True) == []
    delivered = [
        *tracker.event(ev(8)),
        *tracker.event(ev(8)),
        *tracker.event(ev(9)),
        *tracker.event(ev(10)),
        *tracker.event(ev(11)),
    ]
    assert offsets(delivered) == [8, 9, 10, 11]


def test_tracker_recovery_failure_is_a_gap() -> None:
    """recovered: false yields a Gap from the last delivered offset to the reply's offset."""
    tracker = ChannelTracker("news:a")
    tracker.subscribed(0, "e1", None)
    tracker.event(ev(1))
    tracker.begin()
    items = tracker.subscribed(250, "e1", False)
    assert items == [Gap("news:a", "recovery_failed", 1, "e1", 250, "e1")]
    assert offsets(tracker.event(ev(251))) == [251]


def test_tracker_epoch_change_restarts_offsets() -> None:
    """A new epoch (server restart) is a Gap; its lower offsets are then accepted."""
    tracker = ChannelTracker("news:a")
    tracker.subscribed(40, "old", None)
    tracker.event(ev(41))
    tracker.begin()
    assert tracker.subscribed(3, "new", False) == [
        Gap("news:a", "recovery_failed", 41, "old", 3, "new")
    ]
    assert offsets(tracker.event(ev(4))) == [4]
    assert tracker.recover_point() == (4, "new")


def test_tracker_new_epoch_replay_after_a_gap_is_delivered() -> None:
    """``recovered: false`` with ``since: 0`` under a new epoch is a Gap for the old
    epoch's tail, then the replayed new-epoch events 1..n (below the old offset) are
    delivered in order, not dropped as duplicates, and live events follow."""
    tracker = ChannelTracker("news:a")
    tracker.subscribed(40, "old", None)
    tracker.event(ev(41))
    tracker.begin()
    assert tracker.subscribed(3, "new", False, since=0) == [
        Gap("news:a", "recovery_failed", 41, "old", 0, "new")
    ]
    delivered = [
        *tracker.event(ev(1)),
        *tracker.event(ev(2)),
        *tracker.event(ev(3)),
        *tracker.event(ev(3)),
        *tracker.event(ev(4)),
    ]
    assert offsets(delivered) == [1, 2, 3, 4]
    assert tracker.recover_point() == (4, "new")


def test_tracker_new_epoch_replay_must_start_at_its_first_offset() -> None:
    """After ``since: 0`` the stream must go on at offset 1: a jump is a violation."""
    tracker = ChannelTracker("news:a")
    tracker.subscribed(40, "old", None)
    tracker.begin()
    tracker.subscribed(3, "new", False, since=0)
    with pytest.raises(ProtocolViolation):
        tracker.event(ev(4))


def test_tracker_holds_live_events_until_the_replay_is_done() -> None:
    """Personal channel: live events that arrive before the reply wait for the replay."""
    tracker = ChannelTracker("user:u1")
    tracker.subscribed(0, "e1", None)
    for offset in range(1, 9):
        tracker.event(ev(offset, "user:u1"))
    tracker.begin()
    assert tracker.event(ev(11, "user:u1")) == []
    assert tracker.event(ev(12, "user:u1")) == []
    assert tracker.subscribed(10, "e1", True) == []
    assert offsets(tracker.event(ev(9, "user:u1"))) == [9]
    assert offsets(tracker.event(ev(10, "user:u1"))) == [10, 11, 12]
    assert offsets(tracker.event(ev(13, "user:u1"))) == [13]


def test_tracker_first_automatic_subscription_has_no_gap() -> None:
    """The personal channel's first reply is a baseline: held live events follow, no Gap."""
    tracker = ChannelTracker("user:u1")
    tracker.event(ev(4, "user:u1"))
    tracker.event(ev(5, "user:u1"))
    assert offsets(tracker.subscribed(3, "e1", False)) == [4, 5]


def test_tracker_start_at_is_a_baseline_before_any_reply() -> None:
    """``start_at`` sets the recovery point before any reply; it never moves a baseline
    the tracker already has."""
    tracker = ChannelTracker("user:u1")
    tracker.start_at(3, "e1")
    assert tracker.recover_point() == (3, "e1") and tracker.awaiting
    tracker.event(ev(4, "user:u1"))
    assert offsets(tracker.subscribed(4, "e1", True)) == [4]
    tracker.start_at(9, "e2")
    assert tracker.recover_point() == (4, "e1")


def test_tracker_first_baseline_keeps_events_sent_before_the_reply() -> None:
    """When the first reply's offset already counts live events held before it (the
    server answers with the last offset it sent), those events are still delivered."""
    tracker = ChannelTracker("user:u1")
    tracker.event(ev(4, "user:u1"))
    tracker.event(ev(5, "user:u1"))
    assert offsets(tracker.subscribed(5, "e1", False)) == [4, 5]
    assert offsets(tracker.event(ev(6, "user:u1"))) == [6]


def test_tracker_no_gap_when_provably_nothing_was_missed() -> None:
    """recovered: false at the same epoch and offset as delivered hides nothing: no Gap."""
    tracker = ChannelTracker("news:a")
    tracker.subscribed(4, "e1", None)
    tracker.begin()
    assert tracker.subscribed(4, "e1", False) == []


def test_tracker_drops_stale_held_events_after_a_failed_recovery() -> None:
    """Held events at or below the new baseline are dropped; later ones are delivered."""
    tracker = ChannelTracker("user:u1")
    tracker.subscribed(0, "e1", None)
    tracker.begin()
    tracker.event(ev(2, "user:u1"))
    tracker.event(ev(3, "user:u1"))
    items = tracker.subscribed(2, "e2", False)
    assert offsets(items) == ["gap:0->2", 3]


def test_tracker_hole_in_the_stream_is_a_violation() -> None:
    """After the reply, an offset beyond the next one cannot be explained: violation."""
    tracker = ChannelTracker("news:a")
    tracker.subscribed(1, "e1", None)
    with pytest.raises(ProtocolViolation):
        tracker.event(ev(3))


def test_tracker_recovery_for_another_epoch_is_a_violation() -> None:
    """recovered: true for another epoch than the recovery point contradicts the contract."""
    tracker = ChannelTracker("news:a")
    tracker.subscribed(5, "e1", None)
    tracker.begin()
    with pytest.raises(ProtocolViolation):
        tracker.subscribed(9, "e2", True)


def test_tracker_bounds_held_events() -> None:
    """Too many events before the reply is a violation, not unbounded memory."""
    tracker = ChannelTracker("user:u1", max_held=2)
    tracker.event(ev(1))
    tracker.event(ev(2))
    with pytest.raises(ProtocolViolation):
        tracker.event(ev(3))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_tracker_never_duplicates_or_reorders(data: st.DataObject) -> None:
    """Across reconnects with overlapping replays and duplicates, each offset is delivered
    exactly once and in order."""
    total = data.draw(st.integers(1, 60))
    tracker = ChannelTracker("news:a")
    tracker.subscribed(0, "e", None)
    delivered: list[Item] = []
    sent = 0  # highest offset the "server" has sent
    while sent < total:
        if data.draw(st.booleans()):
            # A reconnect: held live events, then a recovered reply and the replay.
            tracker.begin()
            live = sent + data.draw(st.integers(0, 3))
            start = min(live, total)
            for offset in range(sent + 1, start + 1):
                delivered += tracker.event(ev(offset))
            point = data.draw(st.integers(0, tracker.offset))
            delivered += tracker.subscribed(max(sent, tracker.offset), "e", True)
            for offset in range(point + 1, max(sent, tracker.offset) + 1):
                delivered += tracker.event(ev(offset))
            sent = max(sent, start)
        else:
            sent += 1
            delivered += tracker.event(ev(sent))
            if data.draw(st.booleans()):
                delivered += tracker.event(ev(data.draw(st.integers(1, sent))))
    assert offsets(delivered) == list(range(1, total + 1))


# -- subscription queue ----------------------------------------------------------------


def make_sub(maxsize: int) -> Subscription:
    sub = Subscription(cast(Any, None), "news:a", maxsize=maxsize)
    sub.tracker.subscribed(0, "e1", None)
    return sub


async def drain(sub: Subscription) -> list[Item]:
    items = []
    while sub.qsize():
        items.append(await sub.__anext__())
    return items


async def test_overflow_becomes_one_gap_in_place() -> None:
    """A full queue drops new events and reports them as one overflow Gap, in order."""
    sub = make_sub(3)
    sub.push([ev(n) for n in range(1, 11)])
    items = await drain(sub)
    assert offsets(items) == [1, 2, 3, "gap:3->10"]
    assert isinstance(items[3], Gap) and items[3].reason == "overflow"
    sub.push([ev(11)])
    assert offsets(await drain(sub)) == [11]


async def test_overflow_gap_precedes_events_queued_after_room_was_made() -> None:
    """The overflow Gap takes the first free slot; later drops extend a new Gap."""
    sub = make_sub(3)
    sub.push([ev(n) for n in range(1, 7)])
    assert offsets([await sub.__anext__()]) == [1]
    sub.push([ev(7), ev(8)])
    # The Gap takes the freed slot; 7 and 8 find the queue full again.
    assert offsets(await drain(sub)) == [2, 3, "gap:3->6", "gap:6->8"]
    sub.push([ev(9)])
    assert offsets(await drain(sub)) == [9]


async def test_recovery_gap_is_never_dropped_by_overflow() -> None:
    """A recovery Gap is queued even when the queue is full, after the overflow Gap."""
    sub = make_sub(1)
    gap = Gap("news:a", "recovery_failed", 3, "e1", 9, "e2")
    sub.push([ev(1), ev(2), ev(3), gap, ev(10)])
    assert offsets(await drain(sub)) == [1, "gap:1->3", "gap:3->9", "gap:9->10"]


async def test_iteration_ends_after_queued_items() -> None:
    """finish() ends the stream after what is queued; with an error, that is raised."""
    sub = make_sub(10)
    sub.push([ev(1)])
    sub.finish(None)
    assert [item async for item in sub] == [ev(1)]
    failed = make_sub(10)
    failed.finish(SubscriptionError("news:a", "revoked", "gone"))
    with pytest.raises(SubscriptionError):
        await failed.__anext__()


async def test_waiting_reader_is_woken() -> None:
    """A reader waiting on an empty subscription gets the next pushed event."""
    sub = make_sub(10)
    reader = asyncio.create_task(sub.__anext__())
    await asyncio.sleep(0)
    sub.push([ev(1)])
    assert await asyncio.wait_for(reader, TIMEOUT) == ev(1)


async def test_callbacks_get_items_in_order_and_survive_errors() -> None:
    """on_event/on_gap get every item in order; a failing callback does not stop delivery."""
    sub = make_sub(10)
    seen: list[Item] = []
    done = asyncio.Event()

    async def on_event(event: Event) -> None:
        seen.append(event)
        if event.offset == 1:
            raise RuntimeError("application bug")
        if event.offset == 3:
            done.set()

    sub.start_callbacks(on_event, seen.append)
    gap = Gap("news:a", "recovery_failed", 1, "e1", 2, "e1")
    sub.push([ev(1), gap, ev(3)])
    await asyncio.wait_for(done.wait(), TIMEOUT)
    assert seen == [ev(1), gap, ev(3)]
    await sub.stop_callbacks()


# -- models and argument checks ---------------------------------------------------------


def test_event_round_trips_its_wire_form() -> None:
    """An event message parses into typed fields and serialises back unchanged."""
    message = {
        "type": "chat_message",
        "channel": "conversation:c1",
        "offset": 42,
        "id": "evt_1",
        "timestamp": "2026-11-27T16:45:46.123Z",
        "data": {"content": "hi"},
    }
    event = Event.from_message(message)
    assert event.timestamp == datetime(2026, 11, 27, 16, 45, 46, 123000, tzinfo=UTC)
    assert event.to_dict() == message
    with pytest.raises(ValueError):
        Event.from_message({**message, "offset": "42"})


async def test_client_argument_checks() -> None:
    """A client needs a token or provider; callbacks need a gap handler; names are checked."""
    with pytest.raises(ValueError):
        Client("ws://127.0.0.1:1/ws")
    client = Client("ws://127.0.0.1:1/ws", token="t")
    with pytest.raises(TypeError):
        await client.subscribe("news:a", on_event=print)
    with pytest.raises(ValueError):
        await client.subscribe("not a channel")
