"""What the Redis broker puts on pub/sub, encoded and decoded. Pure (no Redis import).

The layout is described in ``tidings.brokers.redis.scripts``:

* an event message on a channel's pub/sub channel is ``<epoch>:<offset>:<payload>``,
  where the payload is the event's wire message (JSON) as the publish script stored it;
* a control message is JSON ``{"node": ..., "user": ..., "reason": ...}``.

The publish script splices the offset it assigns into a payload encoded with offset 0;
``split_payload`` cuts that payload around the offset's digits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = [
    "ControlMessage",
    "EventMessage",
    "decode_control",
    "decode_event",
    "encode_control",
    "encode_event",
    "split_payload",
]

_OFFSET_MARK = b'"offset":0,"id":"'


def split_payload(payload: bytes) -> tuple[bytes, bytes]:
    """Head and tail of an event encoded with offset 0, around the offset's digits.

    Event types and channel names cannot contain a quote, so the first match is the
    top-level ``offset`` field. Raises ``ValueError`` when there is none.
    """
    index = payload.index(_OFFSET_MARK) + len(b'"offset":')
    return payload[:index], payload[index + 1:]


@dataclass(frozen=True, slots=True)
class EventMessage:
    """One event as it arrives on pub/sub."""

    epoch: str
    offset: int
    payload: bytes


def encode_event(epoch: str, offset: int, payload: bytes) -> bytes:
    """The pub/sub message of one event (what the publish script sends)."""
    return f"{epoch}:{offset}:".encode() + payload


def decode_event(data: bytes) -> EventMessage | None:
    """An event message, or None when ``data`` is not one."""
    try:
        epoch, offset, payload = data.split(b":", 2)
        return EventMessage(epoch.decode(), int(offset), payload)
    except ValueError:  # also UnicodeDecodeError
        return None


@dataclass(frozen=True, slots=True)
class ControlMessage:
    """``disconnect_user`` sent by ``node`` to every node."""

    node: object
    user: str
    reason: str


def encode_control(node: str, user: str, reason: str) -> str:
    """The control message asking every node to close ``user``'s connections."""
    return json.dumps({"node": node, "user": user, "reason": reason})


def decode_control(data: bytes) -> ControlMessage | None:
    """A control message, or None when ``data`` is not one."""
    try:
        message = json.loads(data)
        node, user, reason = message["node"], message["user"], message["reason"]
    except (ValueError, KeyError, TypeError):
        return None
    return ControlMessage(node, str(user), str(reason))
