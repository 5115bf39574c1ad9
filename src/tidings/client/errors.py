"""Exceptions raised by the Python client."""

from __future__ import annotations

__all__ = [
    "AuthenticationFailed",
    "ClientError",
    "CommandError",
    "ConnectionClosed",
    "NotConnected",
    "SubscriptionError",
]


class ClientError(Exception):
    """Base of every error the Tidings client raises on purpose."""


class ConnectionClosed(ClientError):
    """The client stopped for good: the server closed with a code that forbids
    reconnecting (1000, 4403), or authentication could not be recovered.

    ``code`` is the WebSocket close code (None when the connection never got one) and
    ``reason`` the server's reason or error message.
    """

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(
            f"connection closed ({code}): {reason}"
            if code is not None
            else f"connection closed: {reason}"
        )
        self.code = code
        self.reason = reason


class AuthenticationFailed(ConnectionClosed):
    """The server rejected the token (close 4401) and no working token provider could
    supply a new one."""


class NotConnected(ClientError):
    """A command that needs a live connection (``ping``) was called while there is none,
    or the connection was lost before its reply arrived."""


class CommandError(ClientError):
    """The server answered a command with an ``error`` message; ``code`` is the wire
    error code (``unauthorized``, ``subscription_failed``, ``invalid_request``, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class SubscriptionError(CommandError):
    """The server refused or ended a subscription.

    ``code`` is the wire error code of the refusal, ``revoked`` (or the server's other
    reason) for a server-initiated unsubscribe without ``resubscribe``, or ``closed`` when
    the subscription ended before the server confirmed it.
    """

    def __init__(self, channel: str, code: str, message: str) -> None:
        super().__init__(code, message)
        self.args = (f"{channel}: {code}: {message}",)
        self.channel = channel
