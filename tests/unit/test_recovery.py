"""Unit tests of the pure recovery decisions."""

from __future__ import annotations

from tidings.brokers.base import HistoryPage, StoredEvent, StreamPosition
from tidings.protocol import Recover
from tidings.recovery import Replay, history_since, recover_live, recover_new


def page(latest: int, first: int, epoch: str = "e1", complete: bool = True) -> HistoryPage:
    events = [StoredEvent(o, b"{}") for o in range(first, latest + 1)]
    return HistoryPage(StreamPosition(latest, epoch), events, complete)


def test_new_subscription_recovers_every_missed_event() -> None:
    """A matching epoch with the whole gap in history replays it in order."""
    replay = recover_new(Recover(2, "e1"), page(5, 3))
    assert replay.recovered and [e.offset for e in replay.events] == [3, 4, 5]
    assert replay.since == 2


def test_new_subscription_with_nothing_missed_is_recovered() -> None:
    """An offset at the latest event is recovered with nothing to replay."""
    replay = recover_new(Recover(5, "e1"), page(5, 6))
    assert replay.recovered and not replay.events


def test_new_subscription_not_recovered_on_other_epoch() -> None:
    """A changed epoch is never recovered, and a page that does not start at offset 1
    (read after the client's offset) replays nothing of the current epoch."""
    assert recover_new(Recover(2, "old"), page(5, 3)) == Replay(False)


def test_new_subscription_not_recovered_when_history_is_incomplete() -> None:
    """A gap older than the history window is not recovered and replays nothing."""
    replay = recover_new(Recover(0, "e1"), page(5, 3, complete=False))
    assert not replay.recovered and not replay.events


def test_new_subscription_not_recovered_for_an_offset_in_the_future() -> None:
    """An offset beyond the latest event cannot be vouched for."""
    assert not recover_new(Recover(9, "e1"), page(5, 6)).recovered


def test_new_subscription_not_recovered_when_page_is_short() -> None:
    """A page that holds fewer events than the gap is not a recovery."""
    short = HistoryPage(StreamPosition(5, "e1"), [StoredEvent(3, b"{}")], True)
    assert not recover_new(Recover(2, "e1"), short).recovered


def test_live_subscription_replays_up_to_its_start() -> None:
    """A live subscription that sent nothing beyond its start replays up to the start."""
    replay = recover_live(Recover(1, "e1"), page(6, 2), start=4, sent=4)
    assert replay.recovered and [e.offset for e in replay.events] == [2, 3, 4]


def test_live_subscription_refuses_once_later_events_went_out() -> None:
    """Replaying after a later live event would reorder offsets: not recovered."""
    assert not recover_live(Recover(1, "e1"), page(6, 2), start=4, sent=5).recovered


def test_live_subscription_from_its_start_needs_no_replay() -> None:
    """A recover at or after the live start is recovered without replay."""
    replay = recover_live(Recover(5, "e1"), page(6, 2), start=4, sent=6)
    assert replay.recovered and not replay.events


def test_live_subscription_other_epoch_is_not_recovered() -> None:
    """A live subscription with a foreign epoch is not recovered."""
    assert not recover_live(Recover(5, "other"), page(6, 2), start=4, sent=6).recovered


# -- another epoch: the current one is replayed from offset 1 when history holds it --------


def test_history_is_read_from_the_start_only_for_another_epoch() -> None:
    """History is read after the client's offset for its own epoch or none, else after 0."""
    assert history_since(Recover(7, "e1"), "e1") == 7
    assert history_since(Recover(7, "old"), "e1") == 0
    assert history_since(Recover(0, ""), "e1") == 0
    assert history_since(Recover(7, ""), "e1") == 7


def test_new_subscription_replays_a_new_epoch_from_its_first_offset() -> None:
    """Another epoch with the current one complete from offset 1: not recovered, but its
    events 1..latest are replayed in order, after offset 0."""
    replay = recover_new(Recover(40, "old"), page(3, 1, "e2"))
    assert not replay.recovered and replay.since == 0
    assert [e.offset for e in replay.events] == [1, 2, 3]


def test_new_subscription_new_epoch_trimmed_replays_nothing() -> None:
    """A new epoch whose first offsets left history is not replayed at all."""
    assert recover_new(Recover(40, "old"), page(5, 3, "e2", complete=False)) == Replay(False)


def test_new_subscription_new_epoch_beyond_the_limit_replays_nothing() -> None:
    """A new epoch longer than the page (the recovery limit) is not replayed."""
    limited = HistoryPage(StreamPosition(5, "e2"), [StoredEvent(o, b"{}") for o in (1, 2)])
    assert recover_new(Recover(40, "old"), limited) == Replay(False)


def test_new_subscription_new_epoch_without_events_replays_nothing() -> None:
    """A new epoch with no event yet has nothing to replay and no ``since``."""
    assert recover_new(Recover(40, "old"), page(0, 1, "e2")) == Replay(False)


def test_new_subscription_without_an_epoch_replays_nothing() -> None:
    """An empty epoch names no stream (a first subscription): a baseline, no replay."""
    assert recover_new(Recover(0, ""), page(3, 1, "e2")) == Replay(False)


def test_live_subscription_replays_a_new_epoch_up_to_its_start() -> None:
    """A live subscription recovered with another epoch replays the current epoch's 1..start
    under ``recovered: false`` while nothing beyond its start went out."""
    replay = recover_live(Recover(40, "old"), page(6, 1, "e2"), start=4, sent=4)
    assert not replay.recovered and replay.since == 0
    assert [e.offset for e in replay.events] == [1, 2, 3, 4]


def test_live_subscription_new_epoch_refused_once_later_events_went_out() -> None:
    """After a live event beyond the start, older offsets would arrive out of order."""
    assert recover_live(Recover(40, "old"), page(6, 1, "e2"), start=4, sent=5) == Replay(False)


def test_live_subscription_new_epoch_trimmed_replays_nothing() -> None:
    """A live subscription's current epoch that lost its first offsets is not replayed."""
    trimmed = page(6, 3, "e2", complete=False)
    assert recover_live(Recover(40, "old"), trimmed, start=4, sent=4) == Replay(False)


def test_live_subscription_that_replayed_from_zero_replays_nothing_again() -> None:
    """Once the start is 0 (the new epoch was replayed), another recover naming the old
    epoch has nothing left to send."""
    assert recover_live(Recover(40, "old"), page(6, 1, "e2"), start=0, sent=6) == Replay(False)


def test_live_subscription_without_an_epoch_replays_nothing() -> None:
    """An empty epoch on a live subscription is a baseline at the live start, no replay."""
    assert recover_live(Recover(0, ""), page(6, 1, "e2"), start=4, sent=4) == Replay(False)
