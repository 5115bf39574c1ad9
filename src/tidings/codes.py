"""Error codes and close codes of the wire protocol, with what a client should do.

This module imports nothing from tidings: ``tidings.errors`` types its codes with it, and
the ``tidings.protocol`` package (whose ``wire`` subclasses those errors) re-exports it as
``tidings.protocol.codes``.
"""

from __future__ import annotations

import enum

__all__ = ["CloseCode", "ErrorCode", "ReconnectAdvice"]


class ReconnectAdvice(enum.Enum):
    """What a well-behaved client does after a close code."""

    STOP = "stop"
    RECONNECT = "reconnect"
    RECONNECT_SLOWLY = "reconnect_slowly"
    NEW_TOKEN = "new_token"


class ErrorCode(enum.StrEnum):
    """Every error code Tidings sends: in ``error`` frames (protocol section 6, the
    ``in_frames`` ones) and in the server API's and SSE endpoints' error bodies
    (docs/server-api.md). The strings are the wire's and never change."""

    INVALID_REQUEST = "invalid_request"
    UNAUTHORIZED = "unauthorized"
    SUBSCRIPTION_FAILED = "subscription_failed"
    RATE_LIMITED = "rate_limited"
    INTERNAL_ERROR = "internal_error"
    # HTTP only: in an error frame a broker outage is ``subscription_failed``.
    BROKER_UNAVAILABLE = "broker_unavailable"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNAVAILABLE = "unavailable"

    @property
    def in_frames(self) -> bool:
        """Whether the code can appear in a WebSocket/SSE ``error`` frame."""
        return self in _FRAME_CODES


class CloseCode(enum.IntEnum):
    """WebSocket close codes (protocol section 7)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    UNAUTHORIZED = 4401
    FORBIDDEN = 4403
    HEARTBEAT_TIMEOUT = 4408
    TOO_MANY = 4429

    @property
    def advice(self) -> ReconnectAdvice:
        """The client behaviour this code asks for."""
        return _ADVICE.get(self, ReconnectAdvice.RECONNECT)

    @classmethod
    def advice_for(cls, code: int | None) -> ReconnectAdvice:
        """Advice for any received code; unknown and abnormal closes reconnect."""
        try:
            return cls(code).advice if code is not None else ReconnectAdvice.RECONNECT
        except ValueError:
            return ReconnectAdvice.RECONNECT


_FRAME_CODES = frozenset(
    {
        ErrorCode.INVALID_REQUEST,
        ErrorCode.UNAUTHORIZED,
        ErrorCode.SUBSCRIPTION_FAILED,
        ErrorCode.RATE_LIMITED,
        ErrorCode.INTERNAL_ERROR,
    }
)

_ADVICE = {
    CloseCode.NORMAL: ReconnectAdvice.STOP,
    CloseCode.FORBIDDEN: ReconnectAdvice.STOP,
    CloseCode.UNAUTHORIZED: ReconnectAdvice.NEW_TOKEN,
    CloseCode.TOO_MANY: ReconnectAdvice.RECONNECT_SLOWLY,
}
