"""Event types and their data schemas: the three built-in types and custom ones."""

from __future__ import annotations

import secrets
from collections.abc import Collection
from typing import Any

from tidings.errors import InvalidRequest
from tidings.protocol.names import validate_event_type

__all__ = ["BUILTIN_TYPES", "NOTIFICATION_LEVELS", "new_event_id", "validate_event"]

NOTIFICATION_LEVELS = frozenset({"info", "success", "warning", "error"})

#: Required string fields of each built-in type's ``data``.
BUILTIN_TYPES: dict[str, tuple[str, ...]] = {
    "notification": ("message", "level"),
    "chat_message": ("conversation_id", "sender_id", "content"),
    "status_update": ("entity_type", "entity_id", "status"),
}


def validate_event(
    event_type: object, data: object, allowed_types: Collection[str] = ()
) -> tuple[str, dict[str, Any]]:
    """Check an event's type and data; return them or raise ``InvalidRequest``.

    ``allowed_types`` empty means every well-formed, non-reserved type is accepted.
    Extra data fields are passed through untouched.
    """
    kind = validate_event_type(event_type)
    if allowed_types and kind not in allowed_types:
        raise InvalidRequest(f"event type '{kind}' is not accepted by this server")
    if not isinstance(data, dict):
        raise InvalidRequest("data must be an object")
    for field in BUILTIN_TYPES.get(kind, ()):
        if not isinstance(data.get(field), str):
            raise InvalidRequest(f"{kind} needs a string data.{field}")
    if kind == "notification":
        if not data["message"]:
            raise InvalidRequest("notification needs a non-empty data.message")
        if data["level"] not in NOTIFICATION_LEVELS:
            raise InvalidRequest("notification level must be info, success, warning or error")
    return kind, data


def new_event_id(now: float) -> str:
    """A unique, roughly time-ordered event id: ``evt_`` + 12 hex ms + 16 random hex."""
    return f"evt_{int(now * 1000):012x}{secrets.token_hex(8)}"
