"""One exception tree for Tidings, split by blame.

``ClientError`` is the peer's fault: it becomes an ``error`` frame, a 4xxx close code
or an HTTP 4xx at the edge. ``ServerError`` is ours (or a dependency's): it becomes
``internal_error``, close 1011 or an HTTP 5xx. Messages are safe to show to the peer:
they never contain a token, a secret or a stack trace.
"""

from __future__ import annotations

__all__ = [
    "AuthorizerUnavailable",
    "BrokerUnavailable",
    "ClientError",
    "ConfigError",
    "InvalidRequest",
    "ServerError",
    "SubscriptionFailed",
    "TidingsError",
    "Unauthorized",
]


class TidingsError(Exception):
    """Base of every error Tidings raises on purpose."""

    #: Wire error code (protocol section 6) or API error code.
    code: str = "internal_error"
    #: HTTP status used by the server API.
    http_status: int = 500

    def __init__(self, message: str, *, channel: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.channel = channel


class ClientError(TidingsError):
    """The peer sent something wrong; the connection or request may continue."""

    code = "invalid_request"
    http_status = 400


class InvalidRequest(ClientError):
    """Malformed input: not JSON, bad field types, bad channel or event names."""


class Unauthorized(ClientError):
    """Missing, invalid or expired credentials, or a channel the identity may not read."""

    code = "unauthorized"
    http_status = 401


class SubscriptionFailed(ClientError):
    """A subscription cannot be made: unknown namespace, too many subscriptions."""

    code = "subscription_failed"
    http_status = 400


class ServerError(TidingsError):
    """Our fault or a dependency's; the peer may retry later."""

    code = "internal_error"
    http_status = 500


class BrokerUnavailable(ServerError):
    """The broker could not complete the operation (unreachable, timed out)."""

    code = "broker_unavailable"
    http_status = 503


class AuthorizerUnavailable(ServerError):
    """The webhook authorizer failed or timed out; the subscription may be retried."""

    code = "subscription_failed"
    http_status = 503


class ConfigError(Exception):
    """Configuration that cannot start the server; names the offending key."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason
