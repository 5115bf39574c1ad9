"""Value types the client hands to the application: events, gaps and state changes."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = ["Event", "Gap", "GapReason", "Item", "Presence", "Recovery", "State", "StateChange"]


class State(enum.Enum):
    """Connection state, as reported to state listeners."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class StateChange:
    """One state transition.

    ``code``/``reason``: the close code (None for a lost or refused connection) and reason
    that ended the previous connection (DISCONNECTED, CLOSED). ``retry_in``: seconds until
    the next attempt (DISCONNECTED). ``error``: why the client stopped (CLOSED), None when
    the application closed it.
    """

    state: State
    code: int | None = None
    reason: str = ""
    retry_in: float | None = None
    error: BaseException | None = None


def parse_timestamp(value: str) -> datetime:
    """An RFC 3339 UTC timestamp as an aware ``datetime``."""
    return datetime.fromisoformat(value).astimezone(UTC)


def format_timestamp(value: datetime) -> str:
    """The wire form: RFC 3339 UTC with milliseconds."""
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


@dataclass(frozen=True, slots=True)
class Event:
    """An event published to a channel."""

    type: str
    channel: str
    offset: int
    id: str
    timestamp: datetime
    data: dict[str, Any]

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Event:
        """Build from a decoded server message; raise ``ValueError`` if it is not an event."""
        kind, channel, offset = message.get("type"), message.get("channel"), message.get("offset")
        event_id, stamp, data = message.get("id"), message.get("timestamp"), message.get("data")
        if not (
            isinstance(kind, str)
            and isinstance(channel, str)
            and type(offset) is int
            and isinstance(event_id, str)
            and isinstance(stamp, str)
            and isinstance(data, dict)
        ):
            raise ValueError("not a well-formed event")
        return cls(kind, channel, offset, event_id, parse_timestamp(stamp), data)

    def to_dict(self) -> dict[str, Any]:
        """The event in its wire form (JSON-ready)."""
        return {
            "type": self.type,
            "channel": self.channel,
            "offset": self.offset,
            "id": self.id,
            "timestamp": format_timestamp(self.timestamp),
            "data": self.data,
        }


GapReason = Literal["recovery_failed", "overflow"]


@dataclass(frozen=True, slots=True)
class Gap:
    """Events of a channel were missed: the application should reload its state.

    Delivered in the subscription's stream at the place of the hole: every event before it
    has offset <= ``last_offset`` (in ``last_epoch``), every event after it has offset >
    ``offset`` (in ``epoch``). ``reason``:

    * ``recovery_failed``: the server answered ``recovered: false`` after a reconnect or a
      server-initiated resubscribe (history too short, or the stream's epoch changed, for
      example after a restart of an in-memory server). When the epoch changed and history
      still holds the new one from its start, ``offset`` is 0: only the old epoch's tail
      was lost, and the new epoch's events follow the gap from offset 1;
    * ``overflow``: the application read too slowly and the subscription's bounded queue
      was full; the events with offsets ``last_offset + 1`` to ``offset`` were dropped.
    """

    channel: str
    reason: GapReason
    last_offset: int
    last_epoch: str | None
    offset: int
    epoch: str | None


@dataclass(frozen=True, slots=True)
class Presence:
    """A user joined or left a channel whose namespace has presence events.

    Ephemeral: not an event (no offset, not in history, not recovered). After a reconnect
    fetch the presence query (``GET /api/channels/{channel}/presence``, via your backend)
    to resynchronise.
    """

    channel: str
    #: ``join`` or ``leave``.
    kind: str
    user_id: str


@dataclass(frozen=True, slots=True)
class Recovery:
    """A subscription was recovered: after a reconnect (or a resubscribe the server asked
    for) the server answered ``recovered: true``, so every event of ``epoch`` after
    ``last_offset`` up to ``offset`` reaches the application, in order, without a gap;
    those that had not arrived yet are replayed from history."""

    channel: str
    #: The last offset the application had when the subscription was sent again.
    last_offset: int
    #: The channel's offset when the server answered.
    offset: int
    epoch: str

    @property
    def count(self) -> int:
        """How many events the application had missed (0: none were published meanwhile)."""
        return self.offset - self.last_offset


Item = Event | Gap
