"""One exception tree for Tidings, split by blame.

``PeerError`` is the peer's fault: it becomes an ``error`` frame, a 4xxx close code
or an HTTP 4xx at the edge. ``ServerError`` is ours (or a dependency's): it becomes
``internal_error``, close 1011 or an HTTP 5xx. Messages are safe to show to the peer:
they never contain a token, a secret or a stack trace.

Every class carries what the edges need, so that no edge keeps a table of its own:
``code`` (the API's error code), ``wire_code`` (the code of an ``error`` frame, one of
protocol section 6) and ``http_status``. (``PeerError`` was called ``ClientError``; it was
renamed so as not to share a name with the Python SDK's ``tidings.client.ClientError``.)
"""

from __future__ import annotations

from tidings.codes import ErrorCode

__all__ = [
    "AuthorizerUnavailable",
    "BrokerUnavailable",
    "ConfigError",
    "Forbidden",
    "InvalidRequest",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "PeerError",
    "PersonalChannelUnavailable",
    "ServerError",
    "ServiceUnavailable",
    "SubscriptionFailed",
    "TidingsError",
    "TooManyConnections",
    "Unauthorized",
    "http_error_code",
]


class TidingsError(Exception):
    """Base of every error Tidings raises on purpose."""

    #: API error code (docs/server-api.md), also the ``tidings_errors_total`` label.
    code: ErrorCode = ErrorCode.INTERNAL_ERROR
    #: Code of the ``error`` frame it becomes on a connection (protocol section 6).
    wire_code: ErrorCode = ErrorCode.INTERNAL_ERROR
    #: HTTP status used by the server API.
    http_status: int = 500

    def __init__(self, message: str, *, channel: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.channel = channel


class PeerError(TidingsError):
    """The peer sent something wrong; the connection or request may continue."""

    code = wire_code = ErrorCode.INVALID_REQUEST
    http_status = 400


class InvalidRequest(PeerError):
    """Malformed input: not JSON, bad field types, bad channel or event names."""


class Unauthorized(PeerError):
    """Missing, invalid or expired credentials, or a channel the identity may not read."""

    code = wire_code = ErrorCode.UNAUTHORIZED
    http_status = 401


class Forbidden(PeerError):
    """Authenticated, but not allowed here (origin, another user's session)."""

    code = ErrorCode.FORBIDDEN
    wire_code = ErrorCode.UNAUTHORIZED
    http_status = 403


class NotFound(PeerError):
    """No such route or session."""

    code = ErrorCode.NOT_FOUND
    http_status = 404


class MethodNotAllowed(PeerError):
    """A known route asked with a method it does not serve."""

    code = ErrorCode.METHOD_NOT_ALLOWED
    http_status = 405


class PayloadTooLarge(PeerError):
    """A request body over its limit."""

    code = ErrorCode.PAYLOAD_TOO_LARGE
    http_status = 413


class SubscriptionFailed(PeerError):
    """A subscription cannot be made: unknown namespace, too many subscriptions."""

    code = wire_code = ErrorCode.SUBSCRIPTION_FAILED
    http_status = 400


class TooManyConnections(PeerError):
    """The user already has ``max_connections_per_user`` connections (close 4429)."""

    code = wire_code = ErrorCode.RATE_LIMITED
    http_status = 429


class ServerError(TidingsError):
    """Our fault or a dependency's; the peer may retry later."""


class BrokerUnavailable(ServerError):
    """The broker could not complete the operation (unreachable, timed out).

    On a connection it is ``subscription_failed``: the frame codes of protocol section 6
    have no broker code, and the client's answer (retry with backoff) is the same.
    """

    code = ErrorCode.BROKER_UNAVAILABLE
    wire_code = ErrorCode.SUBSCRIPTION_FAILED
    http_status = 503


class PersonalChannelUnavailable(ServerError):
    """The personal channel cannot be subscribed at connect, as the broker is away: the
    connection is refused with 1013 and the client retries later, rather than accepted
    without it, which would lose every event sent to the user meanwhile."""

    code = ErrorCode.BROKER_UNAVAILABLE
    wire_code = ErrorCode.SUBSCRIPTION_FAILED
    http_status = 503


class AuthorizerUnavailable(ServerError):
    """The webhook authorizer failed or timed out; the subscription may be retried."""

    code = wire_code = ErrorCode.SUBSCRIPTION_FAILED
    http_status = 503


class ServiceUnavailable(ServerError):
    """The server cannot take the request now (draining, a node out of reach)."""

    code = ErrorCode.UNAVAILABLE
    http_status = 503


#: The API code of each HTTP status an error class stands for, for HTTP errors raised by
#: aiohttp itself (a body over ``client_max_size`` is its 413); the first class wins.
_CODE_BY_STATUS: dict[int, ErrorCode] = {}
for _cls in (
    InvalidRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    TooManyConnections,
    ServiceUnavailable,
    ServerError,
):
    _CODE_BY_STATUS.setdefault(_cls.http_status, _cls.code)
del _cls


def http_error_code(status: int) -> ErrorCode:
    """The API error code for an HTTP error ``status`` that no ``TidingsError`` raised."""
    code = _CODE_BY_STATUS.get(status)
    if code is not None:
        return code
    return ErrorCode.INVALID_REQUEST if status < 500 else ErrorCode.INTERNAL_ERROR


class ConfigError(Exception):
    """Configuration that cannot start the server; names the offending key."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason
