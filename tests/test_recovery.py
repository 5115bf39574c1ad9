"""Unit tests of the pure recovery decisions."""

from __future__ import annotations

from tidings.brokers.base import HistoryPage, StoredEvent, StreamPosition
from tidings.protocol import Recover
from tidings.recovery import recover_live, recover_new


def page(latest: int, first: int, epoch: str = "e1", complete: bool = True) -> HistoryPage:
    events = [StoredEvent(o, b"{}") for o in range(first, latest + 1)]
    return HistoryPage(StreamPosition(latest, epoch), events, complete)


def test_new_subscription_recovers_every_missed_event() -> None:
    """A matching epoch with the whole gap in history replays it in order."""
    replay = recover_new(Recover(2, "e1"), page(5, 3))
    assert replay.recovered and [e.offset for e in replay.events] == [3, 4, 5]


def test_new_subscription_with_nothing_missed_is_recovered() -> None:
    """An offset at the latest event is recovered with nothing to replay."""
    replay = recover_new(Recover(5, "e1"), page(5, 6))
    assert replay.recovered and not replay.events


def test_new_subscription_not_recovered_on_other_epoch() -> None:
    """A changed epoch is never recovered."""
    assert not recover_new(Recover(2, "old"), page(5, 3)).recovered


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
