"""Per-channel offset bookkeeping: recovery points, ordering and dedupe (pure).

One ``ChannelTracker`` per subscribed channel follows the channel's stream across
connections. Its rules, from the wire contract:

* Each connection (re)subscribes with ``recover`` = the last delivered offset and the
  epoch; ``begin()`` marks that moment. Until the ``subscribed`` reply arrives, events of
  the channel are held (the automatic personal channel can deliver live events before the
  reply to its recovering ``subscribe``).
* ``subscribed`` with ``recovered: true`` announces the replay of every offset after the
  recovery point, in order; ``recovered: false`` (or a changed epoch) starts again at the
  reply's offset and yields a ``Gap`` unless it is provable that nothing was missed. A
  ``recovered: false`` with ``since`` (the epoch changed, and history still holds the new
  one from its start) starts again at ``since`` instead: the ``Gap`` covers the old
  epoch's tail only, and the replay of the new epoch's ``since + 1 ..`` follows. The
  very first reply is the baseline; events held before it (a channel live since
  ``connected``) are part of the stream and are kept. A server that announces the
  position of an automatic channel in ``connected`` gives the baseline before any reply
  (``start_at``), and the first ``subscribe`` then recovers from it like any other.
* An event at or below the last delivered offset is a duplicate and is dropped; after the
  reply, the next event must be exactly the next offset, otherwise the stream has a hole
  the client cannot explain and ``ProtocolViolation`` is raised (the client then drops the
  connection and recovers on a new one).
"""

from __future__ import annotations

from tidings.client.models import Event, Gap, Item

__all__ = ["ChannelTracker", "ProtocolViolation"]

#: Events held for one channel while its ``subscribed`` reply is awaited.
MAX_HELD = 10_000


class ProtocolViolation(Exception):
    """The server's stream broke an ordering guarantee; reconnect and recover."""


class ChannelTracker:
    """Where the application is in one channel; see the module docstring."""

    def __init__(self, channel: str, *, max_held: int = MAX_HELD) -> None:
        self.channel = channel
        #: Epoch of the stream the application follows; None until the first reply.
        self.epoch: str | None = None
        #: Highest offset delivered to the application in ``epoch``.
        self.offset = 0
        #: True between ``begin()`` and the ``subscribed`` reply.
        self.awaiting = True
        #: Set by the client when the channel was live on an earlier connection (the
        #: automatic personal channel) that ended before its first reply: events from
        #: then may be missed, so the first baseline is reported as a ``Gap`` from 0.
        self.baseline_lost = False
        self._held: dict[int, Event] = {}
        self._max_held = max_held

    def recover_point(self) -> tuple[int, str] | None:
        """``(offset, epoch)`` to send as ``recover``, None before the first reply."""
        return None if self.epoch is None else (self.offset, self.epoch)

    def start_at(self, offset: int, epoch: str) -> None:
        """Take the position a ``connected`` message announced for this (automatic)
        channel as its first baseline, before any reply: a connection lost before the
        reply then recovers from it instead of reporting a ``Gap`` from 0. Ignored once
        the channel has a baseline."""
        if self.epoch is None:
            self.epoch = epoch
            self.offset = offset

    def begin(self) -> None:
        """A ``subscribe`` for this channel is being sent on a (new) connection."""
        self.awaiting = True
        self._held.clear()

    def subscribed(
        self, offset: int, epoch: str, recovered: bool | None, since: int | None = None
    ) -> list[Item]:
        """Apply a ``subscribed`` reply; return what to deliver now. ``since`` (at most
        ``offset``) is the reply's field of that name: with ``recovered: false``, the
        events of ``epoch`` after it are replayed next, so they are not duplicates."""
        out: list[Item] = []
        if recovered is True and self.epoch is not None:
            if epoch != self.epoch:
                raise ProtocolViolation(f"{self.channel}: 'recovered: true' for another epoch")
            # The replay of (self.offset, offset] follows, in order.
        else:
            if recovered is False and since is not None:
                # The replay of (since, offset] follows: the baseline is `since`, so the
                # Gap reports only what is really lost and the replay is delivered.
                offset = since
            if self.epoch is None and self._held:
                # First baseline of a channel that was live before the reply (the
                # automatic personal channel): the held events are part of the stream.
                offset = min(offset, min(self._held) - 1)
            nothing_missed = epoch == self.epoch and offset == self.offset
            if (self.epoch is not None and not nothing_missed) or (
                self.epoch is None and self.baseline_lost
            ):
                out.append(
                    Gap(self.channel, "recovery_failed", self.offset, self.epoch, offset, epoch)
                )
            self.baseline_lost = False
            self.epoch = epoch
            self.offset = offset
        self.awaiting = False
        out.extend(self._release())
        return out

    def event(self, event: Event) -> list[Item]:
        """Apply one received event; return what to deliver now (possibly nothing)."""
        if self.awaiting:
            if len(self._held) >= self._max_held:
                raise ProtocolViolation(f"{self.channel}: too many events before 'subscribed'")
            self._held[event.offset] = event
            return []
        if event.offset <= self.offset:
            return []
        if event.offset != self.offset + 1:
            raise ProtocolViolation(
                f"{self.channel}: expected offset {self.offset + 1}, got {event.offset}"
            )
        self.offset = event.offset
        return [event, *self._release()]

    def _release(self) -> list[Item]:
        out: list[Item] = []
        held = self._held
        for stale in [o for o in held if o <= self.offset]:
            del held[stale]
        while held:
            nxt = held.pop(self.offset + 1, None)
            if nxt is None:
                break
            out.append(nxt)
            self.offset = nxt.offset
        return out
