"""Local bookkeeping and fan-out: connections by id and user, subscribers by channel.

The hub is the one owner of subscription state on a node: who is subscribed to what,
whether each subscription is confirmed (its ``subscribed`` reply sent) or still being set
up, and how many confirmed subscriptions there are. Sessions keep only the count their
limit needs; the gateway reads the rest here.

The hub never parses frames, verifies tokens or talks to a broker. Fan-out follows the
"cork" rule: frames delivered to a channel during one event-loop tick are collected, and
at the end of the tick joined and written once into each subscriber's transport. There is
no task, queue or ``await`` per subscriber.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from tidings.protocol.deflate import deflate_frame

__all__ = ["Hub", "Outbound", "Subscriber"]


class Outbound(Protocol):
    """The hub's view of one connection."""

    @property
    def conn_id(self) -> str: ...

    @property
    def user_id(self) -> str: ...

    @property
    def deflate(self) -> bool:
        """Whether the connection negotiated permessage-deflate; constant once connected."""

    def send(self, data: bytes) -> None:
        """Queue plain (uncompressed) frames for the socket without blocking; a
        connection with ``deflate`` compresses them itself.

        When the connection's bounded buffer overflows, the connection closes itself
        with 1013; the call still returns normally.
        """

    def send_encoded(self, data: bytes) -> None:
        """Like ``send``, for frames already encoded for this connection (compressed
        when ``deflate`` is true, plain otherwise): written as they are."""


C = TypeVar("C", bound=Outbound)


@dataclass(slots=True, eq=False)
class Subscriber(Generic[C]):
    """One connection's membership in one channel.

    While ``pending`` is not None the subscription is being set up (recovery): live frames
    are held there, in offset order, instead of being written, so that the replayed
    history can go out first. ``after`` is the highest offset already sent (or not to be
    sent); frames at or below it are skipped. ``start`` is the offset at which the
    subscription went live: everything after it came from the live stream. ``confirmed``:
    the subscription was set up and announced (``Hub.confirm``); until then it exists only
    to hold frames, and counts nowhere.
    """

    conn: C
    after: int = 0
    start: int = 0
    pending: list[tuple[int, bytes]] | None = None
    confirmed: bool = False


@dataclass(slots=True)
class _Channel(Generic[C]):
    subscribers: dict[str, Subscriber[C]] = field(default_factory=dict)
    #: Frames collected this tick; None between ticks (most channels are idle).
    frames: list[tuple[int, bytes]] | None = None


class Hub(Generic[C]):
    """Who is connected and subscribed here, and the fan-out of pre-encoded frames.

    Fan-out to connections with ``deflate`` writes compressed frames made by
    ``compress`` (default ``deflate_frame``): at most once per frame and flush, only when
    such a subscriber gets it, and shared by all of them.

    Guarantee: frames of a channel reach each direct subscriber in the order they were
    delivered, at the end of the current loop tick, as one write per subscriber.
    ``pending_limit`` bounds the frames held for a subscriber under setup; past it the
    ``on_pending_overflow`` callback decides (the gateway closes with 1013).

    ``on_written(frames, connections)`` is called after each flush of a channel: each of
    ``frames`` was handed to ``send`` of ``connections`` connections (once per channel
    for the subscribers that got the whole tick, once per subscriber that got part of
    it). Frames held for a subscriber under setup, or skipped as already sent, are not
    reported; held frames are reported by whoever writes what ``release`` returns.

    ``on_fanned_out(seconds)`` is called once per delivered event (never per subscriber),
    at the end of the flush that wrote it: ``seconds`` on ``clock`` from ``deliver`` until
    its frame was handed to every direct subscriber's transport. Frames held for a
    subscriber under setup go out later and are not part of it.
    """

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        pending_limit: int = 10_000,
        on_pending_overflow: Callable[[C], None] | None = None,
        on_written: Callable[[Sequence[bytes], int], None] | None = None,
        compress: Callable[[bytes], bytes] = deflate_frame,
        on_fanned_out: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._compress = compress
        self._on_fanned_out = on_fanned_out
        self._clock = clock
        # When each event delivered since the last flush arrived (with on_fanned_out).
        self._arrivals: list[float] = []
        self._loop = loop
        self._connections: dict[str, C] = {}
        # Lists: most users hold one connection, where a dict costs ~170 bytes more.
        self._by_user: dict[str, list[C]] = {}
        self._channels: dict[str, _Channel[C]] = {}
        # Lists, not sets: a connection holds few channels, and most connections are idle
        # with only their personal channel, where a set costs about 150 bytes more.
        self._memberships: dict[str, list[str]] = {}
        self._dirty: list[_Channel[C]] = []
        self._confirmed = 0
        self._flush_scheduled = False
        self._pending_limit = pending_limit
        self._on_pending_overflow = on_pending_overflow
        self._on_written = on_written

    # -- connections -----------------------------------------------------------------

    def add_connection(self, conn: C) -> None:
        self._connections[conn.conn_id] = conn
        self._by_user.setdefault(conn.user_id, []).append(conn)
        self._memberships[conn.conn_id] = []

    def remove_connection(self, conn: C) -> list[str]:
        """Forget a connection; return the channels that lost their last local subscriber."""
        if self._connections.pop(conn.conn_id, None) is None:
            return []
        users = self._by_user.get(conn.user_id)
        if users is not None:
            users.remove(conn)
            if not users:
                del self._by_user[conn.user_id]
        emptied = []
        for channel in self._memberships.pop(conn.conn_id, []):
            if self._drop(conn.conn_id, channel)[1]:
                emptied.append(channel)
        return emptied

    def connection_count(self) -> int:
        return len(self._connections)

    def user_connection_count(self, user_id: str) -> int:
        return len(self._by_user.get(user_id, ()))

    def connections_of(self, user_id: str) -> list[C]:
        return list(self._by_user.get(user_id, ()))

    def connections(self) -> Iterator[C]:
        """A snapshot: safe while connections come and go."""
        return iter(list(self._connections.values()))

    def is_connected(self, conn: C) -> bool:
        return self._connections.get(conn.conn_id) is conn

    def peer(self, conn_id: str) -> C | None:
        return self._connections.get(conn_id)

    # -- subscriptions ---------------------------------------------------------------

    def subscribe(self, conn: C, channel: str, *, hold: bool) -> tuple[Subscriber[C], bool]:
        """Add ``conn`` to ``channel``; return the subscriber and whether it is the first
        local one. With ``hold`` live frames are held until ``release``."""
        entry = self._channels.get(channel)
        first = entry is None
        if entry is None:
            entry = self._channels[channel] = _Channel()
        sub = entry.subscribers.get(conn.conn_id)
        if sub is None:
            sub = Subscriber(conn, pending=[] if hold else None)
            entry.subscribers[conn.conn_id] = sub
            self._memberships[conn.conn_id].append(channel)
        return sub, first

    def subscriber(self, conn: C, channel: str) -> Subscriber[C] | None:
        entry = self._channels.get(channel)
        return entry.subscribers.get(conn.conn_id) if entry is not None else None

    def hold(self, sub: Subscriber[C]) -> None:
        """Hold live frames for ``sub`` again (re-subscription with recovery)."""
        if sub.pending is None:
            sub.pending = []

    def release(self, sub: Subscriber[C], after: int) -> list[bytes]:
        """End setup: return the held frames with offset > ``after`` (in order) and
        switch the subscriber to direct writes. The caller sends them right away."""
        held = sub.pending or []
        sub.pending = None
        sub.start = max(sub.start, after)
        out = []
        for offset, frame in held:
            if offset > after:
                out.append(frame)
                after = offset
        sub.after = after
        return out

    def confirm(self, sub: Subscriber[C]) -> None:
        """The subscription was set up and announced: it counts from now on."""
        if not sub.confirmed:
            sub.confirmed = True
            self._confirmed += 1

    def unsubscribe(self, conn: C, channel: str) -> bool:
        """Remove ``conn`` from ``channel``; True when the channel has no local subscriber left."""
        return self.drop(conn, channel)[1]

    def drop(self, conn: C, channel: str) -> tuple[bool, bool]:
        """Remove ``conn`` from ``channel``: whether the subscription was confirmed, and
        whether the channel has no local subscriber left."""
        members = self._memberships.get(conn.conn_id)
        if members is None or channel not in members:
            return False, False
        members.remove(channel)
        return self._drop(conn.conn_id, channel)

    def _drop(self, conn_id: str, channel: str) -> tuple[bool, bool]:
        entry = self._channels.get(channel)
        if entry is None:
            return False, False
        sub = entry.subscribers.pop(conn_id, None)
        confirmed = sub is not None and sub.confirmed
        if confirmed:
            self._confirmed -= 1
        if entry.subscribers:
            return confirmed, False
        del self._channels[channel]
        return confirmed, True

    def is_subscribed(self, conn: C, channel: str) -> bool:
        """Whether ``conn`` holds ``channel``, confirmed or still being set up."""
        return channel in self._memberships.get(conn.conn_id, ())

    def is_confirmed(self, conn: C, channel: str) -> bool:
        """Whether ``conn`` holds a confirmed subscription to ``channel``."""
        sub = self.subscriber(conn, channel)
        return sub is not None and sub.confirmed

    def channels_of(self, conn: C) -> list[str]:
        """The channels ``conn`` holds confirmed subscriptions to, in subscription order."""
        return [
            channel
            for channel in self._memberships.get(conn.conn_id, ())
            if self.is_confirmed(conn, channel)
        ]

    def subscription_count(self) -> int:
        """Confirmed subscriptions on this node, over all connections."""
        return self._confirmed

    def has_channel(self, channel: str) -> bool:
        return channel in self._channels

    def subscribers(self, channel: str) -> list[C]:
        entry = self._channels.get(channel)
        return [sub.conn for sub in entry.subscribers.values()] if entry else []

    def channel_counts(self) -> Mapping[str, int]:
        return {name: len(entry.subscribers) for name, entry in self._channels.items()}

    def presence(self, channel: str) -> Mapping[str, int]:
        users: dict[str, int] = {}
        entry = self._channels.get(channel)
        for sub in entry.subscribers.values() if entry else ():
            users[sub.conn.user_id] = users.get(sub.conn.user_id, 0) + 1
        return users

    def channels(self) -> Iterable[str]:
        return list(self._channels)

    # -- fan-out ---------------------------------------------------------------------

    def deliver(self, channel: str, offset: int, frame: bytes) -> int:
        """Queue one encoded frame for every local subscriber of ``channel``; return how
        many subscribers the channel has (an upper bound on the writes: ``on_written``
        reports the real ones)."""
        entry = self._channels.get(channel)
        if entry is None:
            return 0
        if self._on_fanned_out is not None:
            self._arrivals.append(self._clock())
        frames = entry.frames
        if frames is None:
            entry.frames = frames = []
            self._dirty.append(entry)
        frames.append((offset, frame))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop = self._loop or asyncio.get_running_loop()
            loop.call_soon(self.flush)
        return len(entry.subscribers)

    def deliver_now(self, channel: str, frame: bytes) -> int:
        """Write a frame without an offset (presence) to every live local subscriber of
        ``channel`` now, after the frames this tick already collected (so that it keeps
        its place among them); subscribers under setup do not get it. Returns the
        number of writes."""
        entry = self._channels.get(channel)
        if entry is None:
            return 0
        if entry.frames:
            self.flush()
        written = 0
        # Copy: a write may close a connection, which unsubscribes it.
        for sub in list(entry.subscribers.values()):
            if sub.pending is None:
                sub.conn.send(frame)
                written += 1
        return written

    def flush(self) -> None:
        """Write every channel's collected frames, joined, once per subscriber."""
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        arrivals, self._arrivals = self._arrivals, []
        written = self._on_written
        for entry in dirty:
            frames, entry.frames = entry.frames, None
            if not frames:
                continue
            first, last = frames[0][0], frames[-1][0]
            joined = frames[0][1] if len(frames) == 1 else b"".join(f for _, f in frames)
            whole = 0
            # Compressed forms, made on first need and shared by the deflate subscribers.
            packed: list[bytes] | None = None
            packed_joined: bytes | None = None
            # Copy: a write may close a connection, which unsubscribes it.
            for sub in list(entry.subscribers.values()):
                conn = sub.conn
                if sub.pending is not None:
                    self._hold(sub, sub.pending, frames)
                elif sub.after < first:
                    sub.after = last
                    if conn.deflate:
                        if packed_joined is None:
                            if packed is None:
                                packed = [self._compress(f) for _, f in frames]
                            packed_joined = packed[0] if len(packed) == 1 else b"".join(packed)
                        conn.send_encoded(packed_joined)
                    else:
                        # Plain frames are this connection's encoding: no second look.
                        conn.send_encoded(joined)
                    whole += 1
                else:
                    indices = [i for i, (o, _) in enumerate(frames) if o > sub.after]
                    if indices:
                        sub.after = last
                        part = [frames[i][1] for i in indices]
                        if conn.deflate:
                            if packed is None:
                                packed = [self._compress(f) for _, f in frames]
                            conn.send_encoded(b"".join(packed[i] for i in indices))
                        else:
                            conn.send_encoded(b"".join(part))
                        if written is not None:
                            written(part, 1)
            if whole and written is not None:
                written([f for _, f in frames], whole)
        fanned_out = self._on_fanned_out
        if arrivals and fanned_out is not None:
            # One clock reading for the whole flush: the loop does nothing else meanwhile,
            # so an event's frame is out by then, and reading per channel would cost more.
            done = self._clock()
            for arrived in arrivals:
                fanned_out(done - arrived)

    def _hold(
        self, sub: Subscriber[C], pending: list[tuple[int, bytes]], frames: list[tuple[int, bytes]]
    ) -> None:
        pending.extend(frames)
        if len(pending) > self._pending_limit:
            sub.pending = []
            if self._on_pending_overflow is not None:
                self._on_pending_overflow(sub.conn)
