"""One connection's protocol state, without I/O.

The transport feeds it frames and clock readings; it answers with effects: messages to
send, a close, or work for the gateway (subscribe, unsubscribe, refresh) whose outcome
comes back through ``subscribed``/``unsubscribed``/``refreshed``/``fail``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
    encode_message,
    format_expiry,
)

__all__ = [
    "Close",
    "Effect",
    "Send",
    "SendPing",
    "Session",
    "StartRefresh",
    "StartSubscribe",
    "StartUnsubscribe",
    "error_message",
]


@dataclass(frozen=True, slots=True)
class Send:
    """Send one JSON message (unframed); ``error`` names the error code it carries."""

    data: bytes
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Close:
    code: CloseCode
    reason: str


@dataclass(frozen=True, slots=True)
class SendPing:
    """Send a WebSocket ping frame."""


@dataclass(frozen=True, slots=True)
class StartSubscribe:
    command: Subscribe


@dataclass(frozen=True, slots=True)
class StartUnsubscribe:
    command: Unsubscribe


@dataclass(frozen=True, slots=True)
class StartRefresh:
    command: Refresh


Effect = Send | Close | SendPing | StartSubscribe | StartUnsubscribe | StartRefresh


def error_message(
    code: str, message: str, *, command_id: str | None = None, channel: str | None = None
) -> bytes:
    """An ``error`` message; ``code`` is a wire error code."""
    data: dict[str, Any] = {"code": code, "message": message}
    if channel is not None:
        data["channel"] = channel
    return encode_message("error", data, id=command_id)


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
        "_channels",
        "_deadline",
        "_interval",
        "_last_ping",
        "_last_seen",
        "_leeway",
        "_limits",
        "_ping_outstanding",
        "_refilled",
        "_strikes",
        "_timeout",
        "_tokens",
        "_unanswered_since",
        "closed",
        "conn_id",
        "identity",
        "personal",
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
        # A tuple, not a set: most connections hold one channel (their personal one),
        # and an empty-ish set costs about 200 bytes more per idle connection.
        self._channels: tuple[str, ...] = ()
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
        self._ping_outstanding = False
        #: When the oldest ping still unanswered was sent (the timeout runs from it).
        self._unanswered_since = now
        self._deadline = self._expiry_deadline(identity, now, wall)
        self.closed = False

    def _expiry_deadline(self, identity: Identity, now: float, wall: float) -> float:
        return now + (identity.expires_at + self._leeway - wall)

    # -- inbound ---------------------------------------------------------------------

    def welcome(self, channels: list[str], now: float,
                positions: Mapping[str, tuple[int, str]] | None = None) -> bytes:
        """The ``connected`` message. ``positions`` maps automatic channels to the
        ``(offset, epoch)`` at which they went live: the client's baseline, as in a
        ``subscribed`` reply, so that it can recover even if this connection is lost
        before any reply (sent as ``positions`` only when there is one)."""
        interval = self._interval
        data: dict[str, Any] = {
            "connection_id": self.conn_id,
            "user_id": self.identity.user_id,
            "expires_at": format_expiry(self.identity.expires_at),
            "heartbeat_interval": int(interval) if interval == int(interval) else interval,
            "channels": channels,
        }
        if positions:
            data["positions"] = {channel: {"offset": offset, "epoch": epoch}
                                 for channel, (offset, epoch) in positions.items()}
        return encode_message("connected", data)

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
            return [Send(error_message(ErrorCode.INVALID_REQUEST, exc.message,
                                      command_id=exc.command_id, channel=exc.channel),
                         ErrorCode.INVALID_REQUEST)]
        if isinstance(command, Ping):
            return [Send(encode_message("pong", {}, id=command.id))]
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
        return [Send(error_message(ErrorCode.INVALID_REQUEST, "binary frames are not accepted"),
                     ErrorCode.INVALID_REQUEST)]

    def saw_frame(self, now: float) -> None:
        """Any frame (pong included) proves the peer is alive."""
        self._last_seen = now
        self._ping_outstanding = False

    def _rate_limit(self, now: float, raw: bytes | str | None) -> list[Effect]:
        """Token bucket: ``command_burst`` tokens, refilled at ``commands_per_second``.

        A frame that finds no token is dropped and answered with ``rate_limited``; the
        ``rate_limit_strikes``-th such frame in a row (no admitted frame in between) is
        answered the same way and then closes the connection with 4429.
        """
        limits = self._limits
        elapsed = max(0.0, now - self._refilled)
        self._refilled = now
        self._tokens = min(float(limits.command_burst),
                           self._tokens + elapsed * limits.commands_per_second)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self._strikes = 0
            return []
        self._strikes += 1
        # Name the dropped command, so a client can tell which one to send again. The
        # command that uses up the last strike gets its error too, then the close: every
        # command the server drops is answered, as docs/protocol.md promises.
        message = error_message(ErrorCode.RATE_LIMITED, "too many commands; slow down",
                                command_id=_command_id(raw))
        refused: list[Effect] = [Send(message, ErrorCode.RATE_LIMITED)]
        if self._strikes >= limits.rate_limit_strikes:
            refused += self._close(CloseCode.TOO_MANY, "command rate limit exceeded")
        return refused

    def _subscribe(self, command: Subscribe) -> list[Effect]:
        channel = command.channel
        # The personal channel never counts, whether automatic or subscribed again.
        personal = f"user:{self.identity.user_id}"
        counted = sum(1 for held in self._channels if held != personal)
        if channel not in self._channels and counted >= self._limits.max_subscriptions:
            return [Send(error_message(
                ErrorCode.SUBSCRIPTION_FAILED,
                f"too many subscriptions (at most {self._limits.max_subscriptions})",
                command_id=command.id, channel=channel), ErrorCode.SUBSCRIPTION_FAILED)]
        return [StartSubscribe(command)]

    # -- outcomes of gateway work ---------------------------------------------------

    @property
    def subscriptions(self) -> frozenset[str]:
        """The channels this connection is subscribed to."""
        return frozenset(self._channels)

    def is_subscribed(self, channel: str) -> bool:
        return channel in self._channels

    def subscribed(self, channel: str, *, personal: bool = False) -> None:
        if channel not in self._channels:
            self._channels += (channel,)
        if personal:
            self.personal = channel

    def unsubscribed(self, channel: str) -> None:
        self._channels = tuple(held for held in self._channels if held != channel)
        if channel == self.personal:
            self.personal = None

    def refreshed(self, identity: Identity, command_id: str | None, now: float,
                  wall: float) -> list[Effect]:
        """Accept a new token for the same user."""
        if identity.user_id != self.identity.user_id:
            return self.unauthorized("refresh token is for another user", command_id)
        self.identity = identity
        self._deadline = self._expiry_deadline(identity, now, wall)
        data = {"expires_at": format_expiry(identity.expires_at)}
        return [Send(encode_message("refreshed", data, id=command_id))]

    def fail(self, exc: TidingsError, command_id: str | None,
             channel: str | None = None) -> list[Effect]:
        """An error reply for a command that failed; the connection stays open."""
        code = exc.wire_code
        message = error_message(code, exc.message, command_id=command_id,
                                channel=channel or exc.channel)
        return [Send(message, code)]

    def unauthorized(self, message: str, command_id: str | None = None) -> list[Effect]:
        """Send ``unauthorized`` and close 4401 (bad refresh or expired token)."""
        return [Send(error_message(ErrorCode.UNAUTHORIZED, message, command_id=command_id),
                     ErrorCode.UNAUTHORIZED),
                *self._close(CloseCode.UNAUTHORIZED, "unauthorized")]

    # -- time ------------------------------------------------------------------------

    def tick(self, now: float) -> list[Effect]:
        """Heartbeats and token expiry; call at least a few times per heartbeat interval."""
        if self.closed:
            return []
        if now >= self._deadline:
            return self.unauthorized("token expired")
        if self._ping_outstanding and now - self._unanswered_since >= self._timeout:
            return self._close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
        if now - max(self._last_ping, self._last_seen) >= self._interval:
            if not self._ping_outstanding:
                self._unanswered_since = now
            self._last_ping = now
            self._ping_outstanding = True
            return [SendPing()]
        return []

    def _close(self, code: CloseCode, reason: str) -> list[Effect]:
        self.closed = True
        return [Close(code, reason)]
