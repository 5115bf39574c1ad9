"""The ``Broker`` protocol: offsets, history, fan-out between nodes, presence.

A broker assigns each published event its offset, stores it in the channel's history and
delivers it to every node that subscribed to the channel. It never sees a connection: it
delivers into a ``BrokerHandler``, which belongs to the node.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

if TYPE_CHECKING:
    from tidings.brokers.presence_table import PresenceChange

# The small records made per event or per handshake are named tuples: as immutable as a
# frozen dataclass, and several times cheaper to build.

__all__ = [
    "Broker",
    "BrokerHandler",
    "HistoryPage",
    "NodeRelay",
    "PublishRequest",
    "PublishResult",
    "StoredEvent",
    "StreamPosition",
]


class StreamPosition(NamedTuple):
    """The latest offset of a channel and the epoch of its history stream."""

    offset: int
    epoch: str


class PublishRequest(NamedTuple):
    """One event to publish to one channel; the caller has validated it.

    ``trace``: the W3C ``traceparent`` of the span that publishes it (``tidings.telemetry``),
    or None. Opaque to brokers, which hand it to ``BrokerHandler.on_event`` with the event
    where they can (never to clients); it never contains ``:``.
    """

    channel: str
    type: str
    data: Mapping[str, Any]
    idempotency_key: str | None = None
    trace: str | None = None


class PublishResult(NamedTuple):
    """Where an acknowledged event landed. ``duplicate``: the request's idempotency key
    had already published this event (inside the window), and nothing new was published."""

    channel: str
    offset: int
    id: str
    epoch: str
    duplicate: bool = False


class StoredEvent(NamedTuple):
    """An event in history: its offset and its encoded wire message (JSON bytes)."""

    offset: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """A slice of history after some offset.

    ``complete`` is true when no event after the requested offset is missing from
    ``events`` (other than those beyond ``limit``): the stream still holds everything
    after it.
    """

    position: StreamPosition
    events: Sequence[StoredEvent] = field(default_factory=tuple)
    complete: bool = True


class BrokerHandler(Protocol):
    """The node side of a broker: where events arrive and node-local views come from.

    Failing-handler contract, the same for every broker: the delivery callbacks
    (``on_event``, ``on_continuity_lost``, ``on_disconnect_user``, ``on_presence``,
    ``on_presence_change``) must not raise, and when one does anyway the broker logs that
    call's failure once (with its traceback) and goes on: the rest of the batch is still
    delivered, and a publish whose event it was is still acknowledged, since the event is
    committed to history. A broker never lets a handler's exception escape into
    ``publish`` or into its own background loops.
    """

    def on_event(
        self, channel: str, offset: int, epoch: str, payload: bytes, trace: str | None = None
    ) -> None:
        """Deliver one event of a channel this node subscribed to.

        Guarantee: per channel, calls arrive in strictly increasing offset order with no
        gap and no duplicate, for as long as the broker can vouch for continuity.
        ``trace``: the publish's ``PublishRequest.trace``, passed (by keyword) only when
        there is one and it reached this node with the event; events read from history
        have none. Must not block or raise.
        """

    def on_continuity_lost(self, channel: str) -> None:
        """The broker can no longer vouch that every event of ``channel`` arrived
        (unfillable gap, changed epoch). Local subscribers must be told to resubscribe."""

    def on_disconnect_user(self, user_id: str, reason: str) -> None:
        """Close every local connection of ``user_id`` (4403)."""

    def on_presence(self, channel: str, payload: bytes) -> None:
        """Deliver one ``join``/``leave`` message (no offset, not in history) to the
        local subscribers of ``channel``. Exactly one call per transition reaches each
        node that serves the channel. Must not block or raise."""

    def on_presence_change(self, change: PresenceChange) -> None:
        """A presence transition that this node's broker observed: exactly one node in
        the cluster gets each (the one whose call or sweep made it), for webhooks.
        Must not block or raise."""

    def local_channels(self) -> Mapping[str, int]:
        """Channels with local subscribers, and how many."""

    def local_presence(self, channel: str) -> Mapping[str, int]:
        """Users subscribed to ``channel`` on this node, with their connection counts."""


class Broker(Protocol):
    """Offsets, history and fan-out, in memory or through Redis.

    Guarantees: a ``publish`` returns only after every event has its offset and is in
    history; offsets of a channel increase by exactly 1 per event within one epoch; a
    retried publish with the same ``(idempotency_key, channel)`` inside the deduplication
    window returns the first result, marked ``duplicate``, and publishes nothing. Failures
    to reach the backing store raise ``BrokerUnavailable``.
    """

    async def start(self, handler: BrokerHandler) -> None:
        """Connect and start delivering into ``handler``."""

    async def close(self) -> None:
        """Stop delivering and release every resource."""

    async def publish(self, requests: Sequence[PublishRequest]) -> list[PublishResult]:
        """Publish events in order; results are in the same order."""

    async def subscribe(self, channel: str) -> None:
        """Start delivering ``channel`` to this node (first local subscriber)."""

    async def unsubscribe(self, channel: str) -> None:
        """Stop delivering ``channel`` to this node (last local subscriber left)."""

    async def position(self, channel: str) -> StreamPosition:
        """The channel's latest offset and epoch (0 and a fresh epoch when empty)."""

    async def history(self, channel: str, since: int, limit: int) -> HistoryPage:
        """The oldest ``limit`` events with offset > ``since``, in order."""

    async def channels(self, prefix: str) -> dict[str, int]:
        """Channels with subscribers across all nodes, by name, with subscriber counts."""

    async def presence(self, channel: str) -> dict[str, int]:
        """Users subscribed to ``channel`` across all nodes, with connection counts."""

    async def disconnect_user(self, user_id: str, reason: str) -> None:
        """Ask every node to close ``user_id``'s connections."""

    async def presence_arrive(self, channel: str, user_id: str, ttl: float) -> None:
        """This node's first connection of ``user_id`` subscribed ``channel`` (whose
        namespace has presence events): a cluster-wide ``join`` when the user was not
        present, nothing when they come back before their pending leave (``ttl``).
        Raises ``BrokerUnavailable``; the broker keeps trying to register it."""

    async def presence_depart(self, channel: str, user_id: str, ttl: float) -> None:
        """This node's last connection of ``user_id`` in ``channel`` went away: a
        ``leave`` follows ``ttl`` seconds later unless the user comes back anywhere.
        Raises ``BrokerUnavailable``."""

    async def ready(self) -> bool:
        """True when the backing store is reachable."""


@runtime_checkable
class NodeRelay(Protocol):
    """Requests from one node to another, each answered (a broker's ``relay``, when its
    nodes can reach each other: the Redis broker's; the memory broker has none).

    Bodies and answers are JSON objects. Guarantees: ``request`` returns the answer of
    ``node``'s handler (set with ``serve``), or raises ``BrokerUnavailable`` when none
    came within the relay's timeout (node gone, Redis away, too many requests in
    flight); requests and their answers are bounded in number on both sides.
    """

    @property
    def node_id(self) -> str:
        """This node's id, as other nodes address it."""

    def serve(self, handler: Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]]) -> None:
        """Answer requests addressed to this node with ``handler`` (which must not raise)."""

    async def request(self, node: str, body: Mapping[str, Any]) -> Mapping[str, Any]:
        """Send ``body`` to ``node`` and return its answer."""
