"""Continuity of one channel's event stream over an at-most-once transport. Pure.

Redis pub/sub may drop messages (a slow or broken connection, a Redis restart) and, in
rare cases, repeat them. A node therefore tracks ``(epoch, last offset)`` for every
channel it serves, and a ``Continuity`` turns each arriving message, and each page of
history read to fill a gap, into decisions. It is plain synchronous code: it never reads
a socket, never sleeps and never starts a task; ``tidings.brokers.redis.fanout`` does the I/O
and carries out the decisions in the order they are returned.

Decisions (``Output``):

* ``Deliver(offset, epoch, payload)``: hand the event to the node.
* ``Lost()``: continuity cannot be vouched for (a gap history cannot fill, a changed
  epoch); the channel's local subscribers must be told to resubscribe.
* ``Repair()``: a gap was seen; read history after ``since`` and pass each page to
  ``repaired`` until it says ``done``, then call ``resume`` (start a repair only if none
  is running for the channel).

Guarantee: within one epoch, the offsets of ``Deliver`` outputs are strictly increasing,
each one exactly 1 above the previous: no gap, no duplicate. Whenever that cannot hold, a
``Lost`` output comes first and delivery goes on from a new starting point (a later
offset, or the first offset seen in a new epoch). Nothing is ever delivered out of order.

States (``status``):

* ``init``: subscribed, waiting for the starting position, which the caller reads after
  the SUBSCRIBE is confirmed so that every later event also comes through pub/sub;
  arriving messages are held. ``start`` goes live.
* ``live``: messages are checked and delivered as they arrive.
* ``repair``: a gap is being filled from history; later messages are held.
* ``stale``: the pub/sub connection is down; messages are ignored. ``resubscribed``
  starts a repair from the last delivered offset.

At most ``buffer_limit`` messages are held. When one more arrives the held ones are
dropped: they are in history, and the repair (or, after ``init``, the gap the next
message reveals) reads them from there, or reports ``Lost`` if history lost them too.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from tidings.brokers.base import HistoryPage, StreamPosition

__all__ = [
    "LOST",
    "REPAIR",
    "Continuity",
    "Deliver",
    "Lost",
    "Output",
    "Repair",
    "RepairStep",
    "Status",
]

Status = Literal["init", "live", "repair", "stale"]


@dataclass(frozen=True, slots=True)
class Deliver:
    """Hand one event to the node: the next offset of the channel's stream."""

    offset: int
    epoch: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Lost:
    """Continuity is lost: the channel's local subscribers must resubscribe."""


@dataclass(frozen=True, slots=True)
class Repair:
    """A gap was seen: fill it from history (unless a repair is already running)."""


LOST = Lost()
REPAIR = Repair()

Output = Deliver | Lost | Repair


@dataclass(frozen=True, slots=True)
class RepairStep:
    """What one page of history gave: outputs, and whether the repair is over."""

    outputs: list[Output]
    done: bool


@dataclass(slots=True, eq=False)
class Continuity:
    """The continuity tracker of one channel; see the module docstring for guarantees.

    ``epoch`` and ``last`` are the stream position of the last event delivered (or the
    starting position): the next event to deliver is ``last + 1`` in ``epoch``.
    """

    buffer_limit: int
    status: Status = "init"
    epoch: str = ""
    last: int = 0
    _held: deque[tuple[str, int, bytes]] = field(default_factory=deque)

    @property
    def held(self) -> int:
        """How many messages are held (waiting for ``start`` or for a repair)."""
        return len(self._held)

    @property
    def since(self) -> int:
        """The offset after which a repair reads history: the last one delivered."""
        return self.last

    def start(self, position: StreamPosition) -> list[Output]:
        """``init`` only: the channel's position read after the SUBSCRIBE was confirmed.

        Goes live from there and applies the held messages: those up to ``position`` are
        duplicates, later ones are delivered in order (a gap among them starts a repair).
        """
        self.epoch, self.last = position.epoch, position.offset
        return self._drain()

    def receive(self, epoch: str, offset: int, payload: bytes) -> list[Output]:
        """One message from pub/sub.

        ``live``: the next offset is delivered, an older one dropped as a duplicate, a
        later one held while a ``Repair`` fills the gap before it; a new epoch is
        ``Lost`` and tracking restarts at the message, which is delivered.
        ``init``/``repair``: held (all of them dropped past ``buffer_limit``).
        ``stale``: ignored.
        """
        if self.status == "live":
            return self._apply(epoch, offset, payload)
        if self.status in ("init", "repair"):
            self._held.append((epoch, offset, payload))
            if len(self._held) > self.buffer_limit:
                # History has them; the repair reads on until it catches up.
                self._held.clear()
        return []

    def repaired(self, page: HistoryPage) -> RepairStep:
        """``repair`` only: one page of history after ``since``.

        Delivers the page's events that continue the stream. Done when the stream is
        caught up with the page's position. Done with ``Lost`` when history cannot vouch
        for the gap (another epoch, events after ``since`` no longer held, or a page that
        does not continue where the stream is); tracking then restarts at the position.
        Not done otherwise: read the next page after the new ``since``.
        """
        position = page.position
        if position.epoch != self.epoch or not page.complete:
            self.epoch, self.last = position.epoch, position.offset
            return RepairStep([LOST], done=True)
        before = self.last
        outputs: list[Output] = []
        for event in page.events:
            if event.offset == self.last + 1:
                self.last = event.offset
                outputs.append(Deliver(event.offset, self.epoch, event.payload))
        if self.last >= position.offset:
            return RepairStep(outputs, done=True)
        if self.last == before:
            # History does not continue where we are: cannot vouch.
            outputs.append(LOST)
            self.last = position.offset
            return RepairStep(outputs, done=True)
        return RepairStep(outputs, done=False)

    def resume(self) -> list[Output]:
        """The repair is over (or was abandoned): go live and apply the held messages.

        Nothing happens unless the tracker is still in ``repair``.
        """
        if self.status != "repair":
            return []
        return self._drain()

    def disconnected(self) -> None:
        """The pub/sub connection is down: hold nothing, ignore messages until
        ``resubscribed``. (A tracker still in ``init`` is abandoned by its caller.)"""
        self.status = "stale"
        self._held.clear()

    def resubscribed(self) -> list[Output]:
        """The subscription is back on a new connection: a ``stale`` tracker repairs
        from ``since``, since anything may have been missed meanwhile."""
        if self.status != "stale":
            return []
        self.status = "repair"
        return [REPAIR]

    def _apply(self, epoch: str, offset: int, payload: bytes) -> list[Output]:
        outputs: list[Output] = []
        if epoch != self.epoch:
            outputs.append(LOST)
            self.epoch, self.last = epoch, offset - 1
        if offset <= self.last:
            return outputs  # a duplicate
        if offset == self.last + 1:
            self.last = offset
            outputs.append(Deliver(offset, epoch, payload))
            return outputs
        self._held.appendleft((epoch, offset, payload))
        self.status = "repair"
        outputs.append(REPAIR)
        return outputs

    def _drain(self) -> list[Output]:
        """Go live and apply the held messages (stops if one of them starts a repair)."""
        self.status = "live"
        outputs: list[Output] = []
        while self._held and self.status == "live":
            outputs += self._apply(*self._held.popleft())
        return outputs
