"""One connection's protocol state, without I/O.

The transport feeds it frames and clock readings; it answers with effects: typed
messages to send (``tidings.protocol.messages``), a close, or work for the gateway
(subscribe, unsubscribe, refresh, a check of the channels after a refresh). The gateway
reports each outcome back (``subscribe_done``, ``unsubscribe_done``, ``continuity_lost``,
``revoke``, ``refreshed``, ``fail``), and the session answers with the replies, in the
order they must reach the client: every reply the protocol defines is made here.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from tidings.auth import Identity
from tidings.config import LimitsSettings
from tidings.errors import TidingsError
from tidings.protocol import (
    BadCommand,
    CloseCode,
    ErrorCode,
    Ping,
    Refresh,
    Subscribe,
    Unsubscribe,
    decode_command,
    format_expiry,
)
from tidings.protocol.messages import (
    Connected,
    ErrorReply,
    Pong,
    Refreshed,
    ServerMessage,
    Subscribed,
    Unsubscribed,
)
from tidings.recovery import Replay

__all__ = [
    "CheckGrants",
    "Close",
    "Effect",
    "Send",
    "SendEvents",
    "SendPing",
    "Session",
    "SessionState",
    "StartRefresh",
    "StartSubscribe",
    "StartUnsubscribe",
]


class SessionState(enum.Enum):
    """Where a connection stands; ``CLOSED`` is final."""

    OPEN = "open"
    #: A ping was sent and no frame came back since (the heartbeat timeout runs).
    AWAITING_PONG = "awaiting_pong"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Send:
    """Send one server message; the gateway stamps it with the wall clock."""

    message: ServerMessage

    @property
    def error(self) -> str | None:
        """The error code the message carries, if it is an ``error``."""
        return self.message.code if isinstance(self.message, ErrorReply) else None


@dataclass(frozen=True, slots=True)
class SendEvents:
    """Send stored events (encoded by the broker), in order: a recovery's replay."""

    payloads: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Close:
    code: CloseCode
    reason: str


@dataclass(frozen=True, slots=True)
class SendPing:
    """Send a WebSocket ping frame."""


@dataclass(frozen=True, slots=True)
class StartSubscribe:
    """Subscribe for the client. ``at_limit``: the session holds ``max_subscriptions``
    already, so unless the channel is one of them (an idempotent subscribe; the hub
    knows) the gateway answers with ``too_many`` instead."""

    command: Subscribe
    at_limit: bool = False


@dataclass(frozen=True, slots=True)
class StartUnsubscribe:
    command: Unsubscribe


@dataclass(frozen=True, slots=True)
class StartRefresh:
    command: Refresh


@dataclass(frozen=True, slots=True)
class CheckGrants:
    """After a refresh: ask the policy again about each channel the connection holds
    (but the personal one; the hub knows which), and ``revoke`` those it denies."""


Effect = (
    Send
    | SendEvents
    | Close
    | SendPing
    | StartSubscribe
    | StartUnsubscribe
    | StartRefresh
    | CheckGrants
)


def _command_id(raw: bytes | str | None) -> str | None:
    if raw is None:
        return None
    try:
        return decode_command(raw).id
    except BadCommand as exc:
        return exc.command_id


class Session:
    """Protocol state of one authenticated connection.

    ``now`` arguments are monotonic seconds; the token's wall-clock expiry is turned into
    a monotonic deadline once, at construction and on refresh.
    """

    # Slots: one Session lives as long as each (mostly idle) connection.
    __slots__ = (
        "_counted",
        "_deadline",
        "_interval",
        "_last_ping",
        "_last_seen",
        "_leeway",
        "_limits",
        "_refilled",
        "_strikes",
        "_timeout",
        "_tokens",
        "_unanswered_since",
        "conn_id",
        "identity",
        "personal",
        "state",
    )

    def __init__(
        self,
        identity: Identity,
        *,
        conn_id: str,
        limits: LimitsSettings,
        heartbeat_interval: float,
        heartbeat_timeout: float,
        leeway: float,
        now: float,
        wall: float,
    ) -> None:
        self.identity = identity
        self.conn_id = conn_id
        # Which channels are held is the hub's to know: the session keeps what its
        # limit needs, the count of confirmed subscriptions but the personal channel.
        self._counted = 0
        self.personal: str | None = None
        self._limits = limits
        self._interval = heartbeat_interval
        self._timeout = heartbeat_timeout
        self._leeway = leeway
        self._tokens = float(limits.command_burst)
        self._refilled = now
        self._strikes = 0
        self._last_seen = now
        self._last_ping = now
        self.state = SessionState.OPEN
        #: When the oldest ping still unanswered was sent (the timeout runs from it).
        self._unanswered_since = now
        self._deadline = self._expiry_deadline(identity, now, wall)

    @property
    def closed(self) -> bool:
        """Whether the session asked for its close (nothing more is handled)."""
        return self.state is SessionState.CLOSED

    def _expiry_deadline(self, identity: Identity, now: float, wall: float) -> float:
        return now + (identity.expires_at + self._leeway - wall)

    # -- inbound ---------------------------------------------------------------------

    def welcome(
        self, channels: list[str], positions: Mapping[str, tuple[int, str]] | None = None
    ) -> Send:
        """The ``connected`` message. ``positions`` maps automatic channels to the
        ``(offset, epoch)`` at which they went live: the client's baseline, as in a
        ``subscribed`` reply, so that it can recover even if this connection is lost
        before any reply (sent as ``positions`` only when there is one)."""
        return Send(
            Connected(
                self.conn_id,
                self.identity.user_id,
                format_expiry(self.identity.expires_at),
                self._interval,
                tuple(channels),
                dict(positions or {}),
            )
        )

    def _admit(self, now: float, raw: bytes | str | None = None) -> list[Effect] | None:
        """Count a data frame from the client: the effects to answer with instead of
        handling it (closed, rate-limited), or None to handle it."""
        if self.closed:
            return []
        self.saw_frame(now)
        return self._rate_limit(now, raw) or None

    def receive_text(self, raw: bytes | str, now: float) -> list[Effect]:
        """Handle one text frame from the client."""
        refused = self._admit(now, raw)
        if refused is not None:
            return refused
        try:
            command = decode_command(raw)
        except BadCommand as exc:
            return [
                Send(
                    ErrorReply(ErrorCode.INVALID_REQUEST, exc.message, exc.command_id, exc.channel)
                )
            ]
        if isinstance(command, Ping):
            return [Send(Pong(command.id))]
        if isinstance(command, Subscribe):
            return self._subscribe(command)
        if isinstance(command, Unsubscribe):
            return [StartUnsubscribe(command)]
        return [StartRefresh(command)]

    def receive_binary(self, now: float) -> list[Effect]:
        """Binary frames are not part of the protocol."""
        refused = self._admit(now)
        if refused is not None:
            return refused
        return [Send(ErrorReply(ErrorCode.INVALID_REQUEST, "binary frames are not accepted"))]

    def saw_frame(self, now: float) -> None:
        """Any frame (pong included) proves the peer is alive."""
        self._last_seen = now
        if self.state is SessionState.AWAITING_PONG:
            self.state = SessionState.OPEN

    def _rate_limit(self, now: float, raw: bytes | str | None) -> list[Effect]:
        """Token bucket: ``command_burst`` tokens, refilled at ``commands_per_second``.

        A frame that finds no token is dropped and answered with ``rate_limited``; the
        ``rate_limit_strikes``-th such frame in a row (no admitted frame in between) is
        answered the same way and then closes the connection with 4429.
        """
        limits = self._limits
        elapsed = max(0.0, now - self._refilled)
        self._refilled = now
        self._tokens = min(
            float(limits.command_burst), self._tokens + elapsed * limits.commands_per_second
        )
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self._strikes = 0
            return []
        self._strikes += 1
        # Name the dropped command, so a client can tell which one to send again. The
        # command that uses up the last strike gets its error too, then the close: every
        # command the server drops is answered, as docs/protocol.md promises.
        refused: list[Effect] = [
            Send(
                ErrorReply(ErrorCode.RATE_LIMITED, "too many commands; slow down", _command_id(raw))
            )
        ]
        if self._strikes >= limits.rate_limit_strikes:
            refused += self._close(CloseCode.TOO_MANY, "command rate limit exceeded")
        return refused

    def _subscribe(self, command: Subscribe) -> list[Effect]:
        # The personal channel never counts, whether automatic or subscribed again.
        at_limit = (
            self._counted >= self._limits.max_subscriptions
            and command.channel != f"user:{self.identity.user_id}"
        )
        return [StartSubscribe(command, at_limit)]

    def too_many(self, command: Subscribe) -> list[Effect]:
        """The answer to a subscribe of a new channel at the subscription limit."""
        return [
            Send(
                ErrorReply(
                    ErrorCode.SUBSCRIPTION_FAILED,
                    f"too many subscriptions (at most {self._limits.max_subscriptions})",
                    command.id,
                    command.channel,
                )
            )
        ]

    # -- outcomes of gateway work ---------------------------------------------------

    @property
    def subscription_count(self) -> int:
        """Confirmed subscriptions, the personal channel not counted."""
        return self._counted

    def subscribed(self, channel: str, *, personal: bool = False) -> None:
        """A subscription was confirmed (call once per confirmed subscription). The
        user's own personal channel never counts, however it was subscribed."""
        if personal:
            self.personal = channel
        elif channel != f"user:{self.identity.user_id}":
            self._counted += 1

    def unsubscribed(self, channel: str) -> None:
        """A confirmed subscription ended (call once, only for a confirmed one)."""
        if channel == self.personal:
            self.personal = None
        elif channel != f"user:{self.identity.user_id}":
            self._counted = max(0, self._counted - 1)

    def refreshed(
        self, identity: Identity, command_id: str | None, now: float, wall: float
    ) -> list[Effect]:
        """Accept a new token for the same user."""
        if identity.user_id != self.identity.user_id:
            return self.unauthorized("refresh token is for another user", command_id)
        self.identity = identity
        self._deadline = self._expiry_deadline(identity, now, wall)
        # The reply first, then the check of what the new token still allows: a
        # revocation always follows the ``refreshed`` that caused it.
        effects: list[Effect] = [Send(Refreshed(format_expiry(identity.expires_at), command_id))]
        if self._counted:
            effects.append(CheckGrants())
        return effects

    def subscribe_done(
        self, command: Subscribe, offset: int, epoch: str, replay: Replay | None, *, new: bool
    ) -> list[Effect]:
        """The gateway subscribed ``command.channel`` (``new``) or found it subscribed
        already, live from ``offset`` in ``epoch``; ``replay`` answers its ``recover``.
        The ``subscribed`` reply goes first, then the replayed events (also under
        ``recovered: false``: a new epoch's, from offset 1); live events follow."""
        channel = command.channel
        if new:
            self.subscribed(channel, personal=channel == f"user:{self.identity.user_id}")
        if replay is None:
            reply = Subscribed(channel, offset, epoch, command.id)
        else:
            since = replay.since if not replay.recovered else None
            reply = Subscribed(channel, offset, epoch, command.id, replay.recovered, since)
        effects: list[Effect] = [Send(reply)]
        if replay is not None and replay.events:
            effects.append(SendEvents(tuple(event.payload for event in replay.events)))
        return effects

    def unsubscribe_done(
        self, channel: str, command_id: str | None, *, subscribed: bool
    ) -> list[Effect]:
        """The client's unsubscribe was carried out; ``subscribed``: a confirmed
        subscription ended (otherwise there was nothing to end, and it is answered too)."""
        if subscribed:
            self.unsubscribed(channel)
        return [Send(Unsubscribed(channel, command_id))]

    def continuity_lost(self, channel: str, *, subscribed: bool) -> list[Effect]:
        """The broker lost ``channel``'s continuity: the client must resubscribe (also
        when the subscription was still being set up: it is gone)."""
        if subscribed:
            self.unsubscribed(channel)
        return [Send(Unsubscribed(channel, reason="insufficient_state", resubscribe=True))]

    def revoke(self, channel: str, *, subscribed: bool) -> list[Effect]:
        """The refreshed token no longer allows ``channel``; nothing unless the
        subscription is (still) confirmed."""
        if not subscribed:
            return []
        self.unsubscribed(channel)
        return [Send(Unsubscribed(channel, reason="revoked", resubscribe=False))]

    def fail(
        self, exc: TidingsError, command_id: str | None, channel: str | None = None
    ) -> list[Effect]:
        """An error reply for a command that failed; the connection stays open."""
        return [Send(ErrorReply(exc.wire_code, exc.message, command_id, channel or exc.channel))]

    def unauthorized(self, message: str, command_id: str | None = None) -> list[Effect]:
        """Send ``unauthorized`` and close 4401 (bad refresh or expired token)."""
        return [
            Send(ErrorReply(ErrorCode.UNAUTHORIZED, message, command_id)),
            *self._close(CloseCode.UNAUTHORIZED, "unauthorized"),
        ]

    # -- time ------------------------------------------------------------------------

    def tick(self, now: float) -> list[Effect]:
        """Heartbeats and token expiry; call at least a few times per heartbeat interval."""
        if self.closed:
            return []
        if now >= self._deadline:
            return self.unauthorized("token expired")
        awaiting = self.state is SessionState.AWAITING_PONG
        if awaiting and now - self._unanswered_since >= self._timeout:
            return self._close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
        if now - max(self._last_ping, self._last_seen) >= self._interval:
            if not awaiting:
                self._unanswered_since = now
            self._last_ping = now
            self.state = SessionState.AWAITING_PONG
            return [SendPing()]
        return []

    def _close(self, code: CloseCode, reason: str) -> list[Effect]:
        self.state = SessionState.CLOSED
        return [Close(code, reason)]
