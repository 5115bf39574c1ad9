"""Presence transitions: who joined or left a channel, debounced by a ttl. Pure.

A user is *present* in a channel while at least one of their connections (on any node)
is subscribed to it, and for ``ttl`` seconds after the last one went away (a *pending
leave*). A user who becomes present emits ``join``; a pending leave that reaches its
deadline emits ``leave``; a user who comes back before the deadline emits neither. The
first present user of a channel also marks it ``occupied``, the last one to leave
``vacated``.

``PresenceTable`` is the in-process form (the memory broker); the Redis broker runs the
same rules in ``PRESENCE_SCRIPT`` (``tidings.brokers.redis.presence``), atomically per
channel. Both number each channel's transitions (``seq``) so that each has a stable
identity (``idempotency_key``) for webhooks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from tidings.protocol.wire import encode_message

__all__ = ["Kind", "PresenceChange", "PresenceTable", "idempotency_key", "presence_payload"]

Kind = Literal["join", "leave"]


class PresenceChange(NamedTuple):
    """One cluster-wide transition of one user in one channel, seen by exactly one node.

    ``occupancy``: ``occupied`` when this join made the channel go from no present user
    to one, ``vacated`` when this leave made it go back to none, else None. ``generation``
    and ``seq`` identify the transition (``seq`` increases with each transition within
    one ``generation`` of the state that counts them).
    """

    channel: str
    user_id: str
    kind: Kind
    generation: str
    seq: int
    occupancy: Literal["occupied", "vacated"] | None = None


def idempotency_key(change: PresenceChange, event: str) -> str:
    """A key that is the same for every delivery (and retry) of ``event`` made for
    ``change``, and differs between transitions: a hash, so it reveals no user id."""
    text = "\n".join((change.channel, change.generation, str(change.seq), event, change.user_id))
    return "pre_" + hashlib.sha256(text.encode()).hexdigest()[:32]


def presence_payload(change: PresenceChange, timestamp: float) -> bytes:
    """The wire message of a ``join`` or ``leave`` (no ``id``, no ``offset``)."""
    return encode_message(
        change.kind, {"user_id": change.user_id}, channel=change.channel, timestamp=timestamp
    )


@dataclass(slots=True)
class _Channel:
    #: user -> connections holding them present (here: local subscriptions).
    present: dict[str, int] = field(default_factory=dict)
    #: user -> deadline of their pending leave.
    leaving: dict[str, float] = field(default_factory=dict)

    def empty(self) -> bool:
        return not self.present and not self.leaving


class PresenceTable:
    """Presence of every channel of one process; see the module docstring.

    Guarantee: per (channel, user), joins and leaves alternate, starting with a join;
    ``arrive``/``depart`` calls must pair up per (channel, user).
    """

    def __init__(self, generation: str) -> None:
        self._generation = generation
        self._channels: dict[str, _Channel] = {}
        # One counter for all channels: a channel's state is forgotten when it empties,
        # and a per-channel count would then repeat its numbers.
        self._seq = 0

    def arrive(self, channel: str, user_id: str) -> list[PresenceChange]:
        """One more holder of ``user_id`` in ``channel``: a join, or nothing."""
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = _Channel()
        holders = state.present.get(user_id, 0)
        state.present[user_id] = holders + 1
        if holders or state.leaving.pop(user_id, None) is not None:
            return []  # already present, or back within the ttl
        occupied = len(state.present) + len(state.leaving) == 1
        return [self._change(channel, user_id, "join", "occupied" if occupied else None)]

    def depart(self, channel: str, user_id: str, deadline: float) -> None:
        """One holder less; the last one leaves a pending leave due at ``deadline``."""
        state = self._channels.get(channel)
        holders = state.present.get(user_id, 0) if state is not None else 0
        if state is None or not holders:
            return
        if holders > 1:
            state.present[user_id] = holders - 1
            return
        del state.present[user_id]
        state.leaving[user_id] = deadline

    def expire(self, now: float) -> list[PresenceChange]:
        """The leaves whose deadline is at or before ``now``, removed and reported."""
        changes: list[PresenceChange] = []
        for channel, state in list(self._channels.items()):
            due = [user for user, deadline in state.leaving.items() if deadline <= now]
            for user in sorted(due, key=state.leaving.__getitem__):
                del state.leaving[user]
                vacated = state.empty()
                changes.append(self._change(channel, user, "leave", "vacated" if vacated else None))
            if state.empty():
                del self._channels[channel]
        return changes

    def next_deadline(self) -> float | None:
        """The earliest pending leave's deadline, or None."""
        deadlines = [d for state in self._channels.values() for d in state.leaving.values()]
        return min(deadlines) if deadlines else None

    def present(self, channel: str) -> list[str]:
        """Users present in ``channel``, pending leaves included (sorted)."""
        state = self._channels.get(channel)
        return sorted({*state.present, *state.leaving}) if state is not None else []

    def _change(
        self,
        channel: str,
        user_id: str,
        kind: Kind,
        occupancy: Literal["occupied", "vacated"] | None,
    ) -> PresenceChange:
        self._seq += 1
        return PresenceChange(channel, user_id, kind, self._generation, self._seq, occupancy)
