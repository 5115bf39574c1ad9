"""The pure continuity tracker of the Redis broker: no Redis, no event loop."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from tidings.brokers.base import HistoryPage, StoredEvent, StreamPosition
from tidings.brokers.continuity import (
    LOST,
    REPAIR,
    Continuity,
    Deliver,
    Output,
)

E = "epoch-1"


def payload(offset: int, epoch: str = E) -> bytes:
    return f"{epoch}/{offset}".encode()


def d(offset: int, epoch: str = E) -> Deliver:
    return Deliver(offset, epoch, payload(offset, epoch))


def page(
    position: int, offsets: Sequence[int], *, epoch: str = E, complete: bool = True
) -> HistoryPage:
    events = [StoredEvent(o, payload(o, epoch)) for o in offsets]
    return HistoryPage(StreamPosition(position, epoch), events, complete)


def live(last: int, *, limit: int = 100, epoch: str = E) -> Continuity:
    tracker = Continuity(limit)
    assert tracker.start(StreamPosition(last, epoch)) == []
    return tracker


def receive(tracker: Continuity, *offsets: int, epoch: str = E) -> list[Output]:
    outputs: list[Output] = []
    for offset in offsets:
        outputs += tracker.receive(epoch, offset, payload(offset, epoch))
    return outputs


# -- live ------------------------------------------------------------------------------


def test_in_order_messages_are_delivered() -> None:
    """Each next offset is delivered at once, with its epoch and payload."""
    tracker = live(5)
    assert receive(tracker, 6, 7, 8) == [d(6), d(7), d(8)]
    assert (tracker.status, tracker.epoch, tracker.last, tracker.held) == ("live", E, 8, 0)


def test_duplicates_are_dropped() -> None:
    """An offset at or below the last delivered one is dropped silently."""
    tracker = live(5)
    assert receive(tracker, 6, 6, 5, 1, 7, 6) == [d(6), d(7)]
    assert tracker.status == "live"


def test_gap_holds_later_messages_until_history_fills_it() -> None:
    """A gap starts a repair; later messages wait; history fills the gap, then the held
    messages follow, in order and without duplicates."""
    tracker = live(5)
    assert receive(tracker, 8) == [REPAIR]
    assert receive(tracker, 9, 10) == []
    assert (tracker.status, tracker.held, tracker.since) == ("repair", 3, 5)
    step = tracker.repaired(page(9, [6, 7, 8, 9]))
    assert step.done and step.outputs == [d(6), d(7), d(8), d(9)]
    assert tracker.resume() == [d(10)]
    assert (tracker.status, tracker.last, tracker.held) == ("live", 10, 0)
    assert receive(tracker, 11) == [d(11)]


def test_second_gap_among_held_messages_starts_another_repair() -> None:
    """Resuming stops at the next gap in the held messages and asks for another repair."""
    tracker = live(5)
    assert receive(tracker, 7, 9) == [REPAIR]
    step = tracker.repaired(page(7, [6, 7]))
    assert step.done and step.outputs == [d(6), d(7)]
    assert tracker.resume() == [REPAIR]
    assert (tracker.status, tracker.since, tracker.held) == ("repair", 7, 1)
    step = tracker.repaired(page(9, [8, 9]))
    assert step.done and step.outputs == [d(8), d(9)]
    assert tracker.resume() == []
    assert (tracker.status, tracker.last) == ("live", 9)


def test_repair_reads_page_after_page_until_caught_up() -> None:
    """A page that stops short of the position is not the end: the next starts after it."""
    tracker = live(0)
    assert receive(tracker, 6) == [REPAIR]
    first = tracker.repaired(page(6, [1, 2, 3]))
    assert not first.done and first.outputs == [d(1), d(2), d(3)]
    assert tracker.since == 3
    second = tracker.repaired(page(6, [4, 5, 6]))
    assert second.done and second.outputs == [d(4), d(5), d(6)]
    assert tracker.resume() == []


def test_unfillable_gap_is_lost_and_delivery_goes_on_after_it() -> None:
    """History that no longer holds the gap means Lost; tracking restarts at its position."""
    tracker = live(5)
    assert receive(tracker, 9, 10, 11) == [REPAIR]
    step = tracker.repaired(page(10, [8, 9, 10], complete=False))
    assert step.done and step.outputs == [LOST]
    assert (tracker.epoch, tracker.last) == (E, 10)
    assert tracker.resume() == [d(11)]
    assert receive(tracker, 12) == [d(12)]


def test_page_that_does_not_continue_the_stream_is_lost() -> None:
    """A page with no event right after ``since`` cannot vouch for the gap: Lost."""
    tracker = live(5)
    assert receive(tracker, 9) == [REPAIR]
    step = tracker.repaired(page(9, [8, 9]))
    assert step.done and step.outputs == [LOST]
    assert tracker.last == 9
    assert tracker.resume() == []


def test_page_that_stops_continuing_part_way_is_lost_after_what_it_gave() -> None:
    """Events that do continue are delivered before the Lost of a later hole."""
    tracker = live(5)
    assert receive(tracker, 20) == [REPAIR]
    first = tracker.repaired(page(20, [6, 7]))
    assert not first.done and first.outputs == [d(6), d(7)]
    second = tracker.repaired(page(20, [10, 11]))
    assert second.done and second.outputs == [LOST]
    assert tracker.last == 20
    assert tracker.resume() == []


# -- epochs ----------------------------------------------------------------------------


def test_new_epoch_while_live_is_lost_and_tracking_restarts() -> None:
    """A message of another epoch reports Lost, is delivered, and becomes the start."""
    tracker = live(5)
    assert receive(tracker, 1, epoch="epoch-2") == [LOST, d(1, "epoch-2")]
    assert (tracker.epoch, tracker.last) == ("epoch-2", 1)
    assert receive(tracker, 2, epoch="epoch-2") == [d(2, "epoch-2")]
    assert receive(tracker, 3, epoch="epoch-3") == [LOST, d(3, "epoch-3")]
    assert receive(tracker, 4, epoch="epoch-3") == [d(4, "epoch-3")]


def test_new_epoch_found_by_a_repair_is_lost() -> None:
    """History in another epoch cannot fill a gap: Lost, and tracking moves to the new
    epoch; a held message of the old epoch counts as one more epoch change."""
    tracker = live(5)
    assert receive(tracker, 7) == [REPAIR]
    step = tracker.repaired(page(3, [1, 2, 3], epoch="epoch-2"))
    assert step.done and step.outputs == [LOST]
    assert (tracker.epoch, tracker.last) == ("epoch-2", 3)
    assert receive(tracker, 4, epoch="epoch-2") == []  # still repairing: held
    assert tracker.resume() == [LOST, d(7), LOST, d(4, "epoch-2")]
    assert (tracker.epoch, tracker.last) == ("epoch-2", 4)


# -- the bounded buffer ------------------------------------------------------------------


def test_overflow_drops_held_messages_and_history_delivers_them() -> None:
    """Past ``buffer_limit`` the held messages are dropped; the repair reads them from
    history instead, so nothing is lost while history holds them."""
    tracker = live(5, limit=3)
    assert receive(tracker, 7) == [REPAIR]
    assert receive(tracker, 8, 9) == []
    assert tracker.held == 3
    assert receive(tracker, 10) == []
    assert tracker.held == 0
    step = tracker.repaired(page(10, [6, 7, 8, 9, 10]))
    assert step.done and step.outputs == [d(6), d(7), d(8), d(9), d(10)]
    assert tracker.resume() == []
    assert receive(tracker, 11) == [d(11)]


def test_overflow_when_history_is_gone_too_is_lost() -> None:
    """Dropped held messages that history no longer holds end in Lost, not silence."""
    tracker = live(5, limit=2)
    assert receive(tracker, 7, 8, 9) == [REPAIR]
    assert tracker.held == 0
    step = tracker.repaired(page(9, [8, 9], complete=False))
    assert step.done and step.outputs == [LOST]
    assert tracker.resume() == []
    assert receive(tracker, 10) == [d(10)]


# -- initialisation --------------------------------------------------------------------


def test_messages_before_start_are_held_and_checked_against_the_position() -> None:
    """Messages that arrive before the starting position is known wait; those up to it
    are duplicates, later ones are delivered once it is known."""
    tracker = Continuity(100)
    assert tracker.status == "init"
    assert receive(tracker, 4, 5, 6, 7) == []
    assert tracker.held == 4
    assert tracker.start(StreamPosition(5, E)) == [d(6), d(7)]
    assert (tracker.status, tracker.last, tracker.held) == ("live", 7, 0)


def test_gap_after_the_starting_position_starts_a_repair() -> None:
    """A held message beyond the position's next offset is a gap like any other."""
    tracker = Continuity(100)
    assert receive(tracker, 8, 9) == []
    assert tracker.start(StreamPosition(5, E)) == [REPAIR]
    assert (tracker.status, tracker.since, tracker.held) == ("repair", 5, 2)
    step = tracker.repaired(page(9, [6, 7, 8, 9]))
    assert step.outputs == [d(6), d(7), d(8), d(9)]
    assert tracker.resume() == []


def test_held_message_of_another_epoch_than_the_start_is_lost() -> None:
    """An epoch change between the held messages and the position is reported."""
    tracker = Continuity(100)
    assert receive(tracker, 1, epoch="epoch-2") == []
    assert tracker.start(StreamPosition(5, E)) == [LOST, d(1, "epoch-2")]


def test_overflow_before_start_is_noticed_by_the_next_message() -> None:
    """Held messages dropped before the start leave a gap that the next message reveals."""
    tracker = Continuity(2)
    assert receive(tracker, 6, 7, 8) == []
    assert tracker.start(StreamPosition(5, E)) == []
    assert receive(tracker, 9) == [REPAIR]
    step = tracker.repaired(page(9, [6, 7, 8, 9]))
    assert step.outputs == [d(6), d(7), d(8), d(9)]


# -- reconnects --------------------------------------------------------------------------


def test_messages_are_ignored_while_disconnected() -> None:
    """A stale tracker holds nothing and delivers nothing."""
    tracker = live(5)
    assert receive(tracker, 7) == [REPAIR]
    tracker.disconnected()
    assert (tracker.status, tracker.held) == ("stale", 0)
    assert receive(tracker, 6, 8) == []
    assert tracker.held == 0
    assert tracker.resume() == []


def test_repair_after_reconnect_when_history_covers_the_outage() -> None:
    """Resubscribed, a stale tracker repairs from its last offset and misses nothing."""
    tracker = live(5)
    tracker.disconnected()
    assert tracker.resubscribed() == [REPAIR]
    assert (tracker.status, tracker.since) == ("repair", 5)
    assert receive(tracker, 9) == []
    step = tracker.repaired(page(8, [6, 7, 8]))
    assert step.done and step.outputs == [d(6), d(7), d(8)]
    assert tracker.resume() == [d(9)]
    assert tracker.status == "live"


def test_repair_after_reconnect_when_history_does_not_cover_the_outage() -> None:
    """History trimmed during the outage means Lost, then live from its position."""
    tracker = live(5)
    tracker.disconnected()
    assert tracker.resubscribed() == [REPAIR]
    step = tracker.repaired(page(50, [40], complete=False))
    assert step.done and step.outputs == [LOST]
    assert tracker.resume() == []
    assert receive(tracker, 51) == [d(51)]


def test_repair_after_reconnect_to_a_redis_that_restarted_empty() -> None:
    """A new epoch after the outage means Lost, then the new epoch is followed."""
    tracker = live(5)
    tracker.disconnected()
    assert tracker.resubscribed() == [REPAIR]
    step = tracker.repaired(page(0, [], epoch="epoch-2"))
    assert step.done and step.outputs == [LOST]
    assert tracker.resume() == []
    assert receive(tracker, 1, epoch="epoch-2") == [d(1, "epoch-2")]


def test_repair_after_reconnect_with_nothing_missed() -> None:
    """A reconnect during which nothing was published just goes live again."""
    tracker = live(5)
    tracker.disconnected()
    assert tracker.resubscribed() == [REPAIR]
    step = tracker.repaired(page(5, []))
    assert step.done and step.outputs == []
    assert tracker.resume() == []
    assert receive(tracker, 6) == [d(6)]


def test_resubscribed_only_repairs_a_stale_tracker() -> None:
    """A subscription confirmation for a live or repairing tracker changes nothing."""
    tracker = live(5)
    assert tracker.resubscribed() == []
    assert tracker.status == "live"
    assert receive(tracker, 7) == [REPAIR]
    assert tracker.resubscribed() == []
    assert (tracker.status, tracker.held) == ("repair", 1)


def test_resume_outside_a_repair_does_nothing() -> None:
    """``resume`` on a live or init tracker delivers nothing and changes nothing."""
    fresh = Continuity(100)
    receive(fresh, 1)
    assert fresh.resume() == []
    assert (fresh.status, fresh.held) == ("init", 1)
    tracker = live(5)
    assert tracker.resume() == []
    assert tracker.status == "live"


# -- property: whatever arrives, the output keeps its promise ----------------------------


class _History:
    """A channel that published offsets 1..top, of which history still holds
    ``oldest``..top; answers like ``Broker.history``."""

    def __init__(self, top: int, oldest: int) -> None:
        self.top = top
        self.oldest = oldest

    def page(self, since: int, limit: int) -> HistoryPage:
        offsets = [o for o in range(max(since + 1, self.oldest), self.top + 1)][:limit]
        complete = since + 1 >= self.oldest and since <= self.top
        return page(self.top, offsets, complete=complete)


class _Node:
    """Carries out a tracker's decisions the way the Redis broker does, one repair at
    a time, and records what reached the node's handler."""

    def __init__(self, tracker: Continuity, history: _History, chunk: int) -> None:
        self.tracker = tracker
        self.history = history
        self.chunk = chunk
        self.repairing = False
        self.log: list[Output] = []

    def carry_out(self, outputs: list[Output]) -> None:
        for output in outputs:
            if output == REPAIR:
                self.repairing = True
            else:
                self.log.append(output)

    def repair_page(self) -> None:
        if not self.repairing:
            return
        step = self.tracker.repaired(self.history.page(self.tracker.since, self.chunk))
        self.carry_out(step.outputs)
        if step.done:
            self.repairing = False
            self.carry_out(self.tracker.resume())

    def disconnect(self) -> None:
        if self.tracker.status != "init":
            self.tracker.disconnected()
            self.repairing = False  # the repair task is cancelled

    def resubscribe(self) -> None:
        self.carry_out(self.tracker.resubscribed())

    def finish(self) -> None:
        for _ in range(10_000):
            if not self.repairing:
                return
            self.repair_page()
        raise AssertionError("the repair never ended")


_STEP = st.one_of(
    st.tuples(st.just("message"), st.integers(1, 30)),
    st.tuples(st.just("page"), st.just(0)),
    st.tuples(st.just("disconnect"), st.just(0)),
    st.tuples(st.just("resubscribe"), st.just(0)),
)


@settings(max_examples=400, deadline=None)
@given(
    top=st.integers(0, 30),
    oldest_back=st.integers(0, 31),
    start=st.integers(0, 30),
    early=st.lists(st.integers(1, 30), max_size=8),
    steps=st.lists(_STEP, max_size=60),
    limit=st.integers(1, 5),
    chunk=st.integers(1, 4),
)
def test_any_arrival_order_gives_gap_free_increasing_output_or_an_explicit_loss(
    top: int,
    oldest_back: int,
    start: int,
    early: list[int],
    steps: list[tuple[str, int]],
    limit: int,
    chunk: int,
) -> None:
    """Random reordering, duplication and loss of messages, disconnects, any buffer
    bound and any history trimming: delivered offsets always go up by exactly 1 except
    right after a Lost; with full history nothing is ever Lost nor missing."""
    start = min(start, top)
    oldest = max(1, top + 1 - oldest_back)  # history holds oldest..top
    history = _History(top, oldest)
    node = _Node(Continuity(limit), history, chunk)
    for offset in early:
        if offset <= top:
            node.carry_out(node.tracker.receive(E, offset, payload(offset)))
    node.carry_out(node.tracker.start(StreamPosition(start, E)))
    for kind, offset in steps:
        if kind == "message" and offset <= top:
            node.carry_out(node.tracker.receive(E, offset, payload(offset)))
        elif kind == "page":
            node.repair_page()
        elif kind == "disconnect":
            node.disconnect()
        elif kind == "resubscribe":
            node.resubscribe()
    # The end: the connection is (back) up and the latest event arrives, as it would.
    node.resubscribe()
    node.finish()
    if top > 0:
        node.carry_out(node.tracker.receive(E, top, payload(top)))
    node.finish()

    assert node.tracker.status == "live"
    assert node.tracker.last == top
    expected_next = start + 1
    delivered: list[int] = []
    for output in node.log:
        if output == LOST:
            expected_next = -1  # anything later may follow a reported loss
            continue
        assert isinstance(output, Deliver)
        assert output.epoch == E and output.payload == payload(output.offset)
        if expected_next != -1:
            assert output.offset == expected_next, node.log
        assert not delivered or output.offset > delivered[-1], node.log
        delivered.append(output.offset)
        expected_next = output.offset + 1
    if oldest <= start + 1:
        # History holds everything after the start: nothing may be lost or skipped.
        assert LOST not in node.log
        assert delivered == list(range(start + 1, top + 1))
