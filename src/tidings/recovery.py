"""Recovery decisions: which missed events a subscription may replay. Pure functions.

Protocol section 5: with ``recover`` the server replays every event after the client's
offset, in order and before any live event, or answers ``recovered: false``; each offset
reaches a connection at most once and in increasing order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tidings.brokers.base import HistoryPage, StoredEvent
from tidings.protocol import Recover

__all__ = ["Replay", "recover_live", "recover_new"]


@dataclass(frozen=True, slots=True)
class Replay:
    """The answer to a ``recover``: whether it is complete, and the events to send."""

    recovered: bool
    events: Sequence[StoredEvent] = ()


def recover_new(recover: Recover, page: HistoryPage) -> Replay:
    """A new subscription: complete when the epoch matches and the page holds every event
    from ``recover.offset`` to the channel's latest offset."""
    latest = page.position.offset
    complete = (
        recover.epoch == page.position.epoch
        and recover.offset <= latest
        and page.complete
        and len(page.events) == latest - recover.offset
    )
    return Replay(True, page.events) if complete else Replay(False)


def recover_live(recover: Recover, page: HistoryPage, start: int, sent: int) -> Replay:
    """A subscription that is already live since offset ``start`` and has sent offsets up
    to ``sent``: it can replay ``(recover.offset, start]`` only while nothing beyond
    ``start`` went out, or offsets would arrive out of order."""
    if page.position.epoch != recover.epoch:
        return Replay(False)
    if recover.offset >= start:
        # Everything after the client's offset came, or comes, from the live stream.
        return Replay(recover.offset <= page.position.offset)
    events = [event for event in page.events if event.offset <= start]
    complete = sent <= start and page.complete and len(events) == start - recover.offset
    return Replay(True, events) if complete else Replay(False)
