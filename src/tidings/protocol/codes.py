"""Error codes and close codes of the wire protocol, with what a client should do."""

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
    """Codes carried in ``error`` frames (protocol section 6)."""

    INVALID_REQUEST = "invalid_request"
    UNAUTHORIZED = "unauthorized"
    SUBSCRIPTION_FAILED = "subscription_failed"
    RATE_LIMITED = "rate_limited"
    INTERNAL_ERROR = "internal_error"


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


_ADVICE = {
    CloseCode.NORMAL: ReconnectAdvice.STOP,
    CloseCode.FORBIDDEN: ReconnectAdvice.STOP,
    CloseCode.UNAUTHORIZED: ReconnectAdvice.NEW_TOKEN,
    CloseCode.TOO_MANY: ReconnectAdvice.RECONNECT_SLOWLY,
}
