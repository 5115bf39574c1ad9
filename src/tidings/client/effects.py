"""What the client session asks its asyncio shell to do, and what it refers to.

``ChannelState`` is one channel's bookkeeping; the effects are what
``tidings.client.session.Session.receive`` returns (see that module), and ``Outcome``,
``Reconnect`` and ``Stop`` describe the end of a connection and what follows it. Plain
values: nothing here does anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tidings.client.errors import ClientError, ConnectionClosed
from tidings.client.models import Item, Presence, Recovery
from tidings.client.tracker import ChannelTracker

__all__ = [
    "Added",
    "AppEffect",
    "ChannelState",
    "Confirm",
    "Connected",
    "Deliver",
    "Effect",
    "End",
    "Failed",
    "LinkEffect",
    "Outcome",
    "PresenceSeen",
    "Reconnect",
    "RecoverFresh",
    "Recovered",
    "Reply",
    "Resubscribe",
    "RetrySubscribe",
    "StartRefresh",
    "Stop",
    "SubscribeNow",
]


@dataclass(eq=False, slots=True)
class ChannelState:
    """One channel's bookkeeping across connections (compared by identity: a channel
    unsubscribed and subscribed again gets a new one, and replies to the old are stale)."""

    channel: str
    #: Offsets, epoch, held events: what the application has received.
    tracker: ChannelTracker = field(init=False)
    #: The server subscribed this channel automatically at connect (the personal channel).
    automatic: bool = False
    #: The server confirmed the subscription at least once.
    confirmed: bool = False
    #: Connection generation on which the last ``subscribe`` was sent.
    sent_on: int = -1
    #: Id of the latest ``subscribe`` sent; replies to older ones are stale.
    pending_id: str | None = None
    #: Retries of a failed resubscription on the current connection.
    retries: int = 0
    #: Connection generation of the last unsubscribe-and-recover fallback.
    fallback_on: int = -1

    def __post_init__(self) -> None:
        self.tracker = ChannelTracker(self.channel)


# -- effects ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Deliver:
    """Queue ``items`` on the subscription of ``channel``."""

    channel: str
    items: list[Item]


@dataclass(frozen=True, slots=True)
class Confirm:
    """The server confirmed the subscription of ``channel``."""

    channel: str


@dataclass(frozen=True, slots=True)
class PresenceSeen:
    """A ``join``/``leave`` of ``channel`` arrived: tell its subscription."""

    channel: str
    presence: Presence


@dataclass(frozen=True, slots=True)
class Recovered:
    """The subscription of ``channel`` was recovered (see ``Recovery``)."""

    channel: str
    recovery: Recovery


@dataclass(frozen=True, slots=True)
class End:
    """The subscription of ``channel`` is over (the session dropped it): end it with
    ``error``."""

    channel: str
    error: ClientError


@dataclass(frozen=True, slots=True)
class Added:
    """The session added ``state`` for a channel the server subscribed automatically:
    create its subscription."""

    state: ChannelState


@dataclass(frozen=True, slots=True)
class Connected:
    """The ``connected`` message arrived: the connection is up."""


@dataclass(frozen=True, slots=True)
class Resubscribe:
    """After ``connected``: send ``unsubscribes`` (automatic channels the application
    dropped), then subscribe each of ``channels`` that still ``needs_resubscribe``, paced
    by ``pacing_delay``."""

    gen: int
    unsubscribes: tuple[dict[str, Any], ...]
    channels: tuple[ChannelState, ...]


@dataclass(frozen=True, slots=True)
class SubscribeNow:
    """Subscribe ``state`` again on connection ``gen`` (the server ended it with
    ``resubscribe: true``)."""

    state: ChannelState
    gen: int


@dataclass(frozen=True, slots=True)
class RetrySubscribe:
    """Wait ``delay`` seconds, then subscribe ``state`` again if it is still current."""

    state: ChannelState
    gen: int
    delay: float


@dataclass(frozen=True, slots=True)
class RecoverFresh:
    """Unsubscribe ``state``'s channel (a command whose reply nobody waits for), then
    subscribe it with recover: a fresh subscription replays from history."""

    state: ChannelState
    gen: int


@dataclass(frozen=True, slots=True)
class StartRefresh:
    """Start refreshing the token on this connection (there is a token provider)."""


@dataclass(frozen=True, slots=True)
class Reply:
    """The reply ``data`` to the command ``id`` (``pong``, ``refreshed``,
    ``unsubscribed``)."""

    id: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Failed:
    """An ``error`` answering the command ``id``; when no command waits for it, the shell
    passes it back to ``Session.server_error``."""

    id: str
    code: str
    message: str


#: What the application sees: its subscriptions' items and ends, and the connection state.
AppEffect = Deliver | Confirm | Recovered | PresenceSeen | End | Added | Connected
#: Work on the current connection: commands to send, replies to hand over.
LinkEffect = (
    Resubscribe | SubscribeNow | RetrySubscribe | RecoverFresh | StartRefresh | Reply | Failed
)
Effect = AppEffect | LinkEffect


# -- the end of a connection -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one connection attempt ended: the close code (None: lost, refused, timed out),
    the reason, and whether the server had sent ``connected``."""

    code: int | None
    reason: str
    welcomed: bool


@dataclass(frozen=True, slots=True)
class Reconnect:
    """Connect again after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop for good with ``error``."""

    error: ConnectionClosed
