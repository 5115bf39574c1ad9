"""Recovery decisions: which missed events a subscription may replay. Pure functions.

Protocol section 5: with ``recover`` the server replays every event after the client's
offset, in order and before any live event, or answers ``recovered: false``; each offset
reaches a connection at most once and in increasing order.

``recovered: false`` says that events may have been lost, not that everything before the
answer was. When the client names another epoch than the channel's (the old stream is
gone, and its tail may have gone with it) while history still holds the current epoch
complete from its first offset, those events are not lost: they are replayed after the
answer, from offset 1 (``Replay.since`` is 0), and only the old epoch's tail is reported
missing. A ``recover`` with an empty epoch names no stream at all (a client's first
subscription): it asks for a baseline, not for history, and gets no replay.

The gateway reads history after ``history_since(...)``: the client's offset while the
epoch matches, 0 otherwise (a second read, on that rare path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tidings.brokers.base import HistoryPage, StoredEvent
from tidings.protocol import Recover

__all__ = ["Replay", "history_since", "recover_live", "recover_new"]


@dataclass(frozen=True, slots=True)
class Replay:
    """The answer to a ``recover``: whether it is complete, the events to send right after
    the ``subscribed`` reply, and ``since``: every event of the channel's current epoch
    after that offset reaches the connection (the replayed ones first). ``since`` is the
    client's offset when ``recovered``, 0 when a new epoch is replayed from its start under
    ``recovered: false``, and None when nothing before the live stream is sent."""

    recovered: bool
    events: Sequence[StoredEvent] = ()
    since: int | None = None


_LOST = Replay(False)


def history_since(recover: Recover, epoch: str) -> int:
    """The offset after which history must be read to decide ``recover`` once the channel's
    current ``epoch`` is known: the client's offset, or 0 (the current epoch from its first
    offset) when the client names another, non-empty epoch."""
    return recover.offset if recover.epoch in (epoch, "") else 0


def _run(page: HistoryPage, after: int, upto: int) -> Sequence[StoredEvent] | None:
    """The events of ``page`` with offsets in ``(after, upto]``, in order; None unless the
    page holds every one of them.

    Offsets within an epoch increase by exactly 1, so a slice of the right length whose
    ends are ``after + 1`` and ``upto`` holds them all. The page may have been read after
    any offset not above ``after``.
    """
    if upto < after or not page.complete:
        return None
    count = upto - after
    if count == 0:
        return ()
    events = page.events
    first = after + 1 - (events[0].offset if events else after + 1)
    if first < 0:
        return None
    run = events if first == 0 and len(events) == count else events[first : first + count]
    if len(run) != count or run[0].offset != after + 1 or run[-1].offset != upto:
        return None
    return run


def _other_epoch(recover: Recover, page: HistoryPage, upto: int) -> Replay:
    """The client names another epoch than the page's: not recovered, but the current
    epoch's events ``1..upto`` are replayed when the page holds all of them."""
    if not recover.epoch:
        return _LOST  # no stream named: the answer is a baseline, not a replay
    events = _run(page, 0, upto)
    return Replay(False, events, 0) if events else _LOST


def recover_new(recover: Recover, page: HistoryPage) -> Replay:
    """A new subscription, with ``page`` read after ``history_since(recover, epoch)``.

    Recovered when the epoch matches and the page holds every event from
    ``recover.offset`` to the channel's latest offset. With another epoch: not recovered,
    and the current epoch is replayed from offset 1 when the page holds every one of its
    events up to the latest (nothing trimmed or expired, not beyond the page's limit).
    """
    latest, epoch = page.position
    if recover.epoch != epoch:
        return _other_epoch(recover, page, latest)
    events = _run(page, recover.offset, latest)
    return _LOST if events is None else Replay(True, events, recover.offset)


def recover_live(recover: Recover, page: HistoryPage, start: int, sent: int) -> Replay:
    """A subscription that is already live and has sent offsets up to ``sent``; every
    offset after ``start`` came, or comes, to the connection (from the live stream or an
    earlier replay), none at or below it.

    It can replay ``(recover.offset, start]`` only while nothing beyond ``start`` went
    out, or offsets would arrive out of order. With another epoch the same holds for the
    current epoch's ``1..start``, replayed under ``recovered: false``.
    """
    latest, epoch = page.position
    if recover.epoch != epoch:
        return _other_epoch(recover, page, start) if sent <= start else _LOST
    if recover.offset >= start:
        # Everything after the client's offset came, or comes, from the live stream.
        return Replay(True, (), recover.offset) if recover.offset <= latest else _LOST
    events = _run(page, recover.offset, start) if sent <= start else None
    return _LOST if events is None else Replay(True, events, recover.offset)
