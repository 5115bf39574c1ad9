"""Grammar of channel names and event type names (protocol sections 3 and 4)."""

from __future__ import annotations

import re

from tidings.errors import InvalidRequest

__all__ = [
    "RESERVED_TYPES",
    "is_valid_channel",
    "is_valid_namespace",
    "parse_channel",
    "personal_channel",
    "validate_event_type",
]

_NAMESPACE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_NAME = re.compile(r"[A-Za-z0-9_.@=+|:-]{1,128}")
_EVENT_TYPE = re.compile(r"[a-z][a-z0-9_]{0,63}")

#: Every command and reply name of the protocol: never usable as an event type.
RESERVED_TYPES = frozenset(
    {
        "connected",
        "subscribe",
        "subscribed",
        "unsubscribe",
        "unsubscribed",
        "ping",
        "pong",
        "refresh",
        "refreshed",
        "error",
        # Presence messages (no offset, not in history): see protocol "Presence events".
        "join",
        "leave",
    }
)


def is_valid_namespace(namespace: str) -> bool:
    """Whether ``namespace`` can begin a channel name (``^[a-z][a-z0-9_-]{0,31}$``)."""
    return _NAMESPACE.fullmatch(namespace) is not None


def parse_channel(channel: object) -> tuple[str, str]:
    """Split a channel into ``(namespace, name)``; raise ``InvalidRequest`` if malformed."""
    if not isinstance(channel, str):
        raise InvalidRequest("channel must be a string")
    namespace, sep, name = channel.partition(":")
    if not sep or not _NAMESPACE.fullmatch(namespace) or not _NAME.fullmatch(name):
        raise InvalidRequest("invalid channel name", channel=channel[:200])
    return namespace, name


def is_valid_channel(channel: object) -> bool:
    """True when ``channel`` fits the grammar."""
    try:
        parse_channel(channel)
    except InvalidRequest:
        return False
    return True


def personal_channel(user_id: str) -> str | None:
    """The personal channel ``user:<sub>``, or None when the sub does not fit the grammar."""
    # Every handshake asks. "user" fits _NAMESPACE, so the sub alone decides: one match.
    return f"user:{user_id}" if _NAME.fullmatch(user_id) else None


def validate_event_type(event_type: object) -> str:
    """Return ``event_type`` if it is a usable event name; raise ``InvalidRequest``."""
    if not isinstance(event_type, str) or not _EVENT_TYPE.fullmatch(event_type):
        raise InvalidRequest("event type must match ^[a-z][a-z0-9_]{0,63}$")
    if event_type in RESERVED_TYPES:
        raise InvalidRequest(f"event type '{event_type}' is reserved")
    return event_type
