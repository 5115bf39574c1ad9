"""What the Redis broker puts on pub/sub, encoded and decoded. Pure (no Redis import).

The layout is described in ``tidings.brokers.redis.scripts``:

* an event message on a channel's pub/sub channel is ``<epoch>:<offset>:<payload>``,
  where the payload is the event's wire message (JSON) as the publish script stored it;
  a traced publish (``PublishRequest.trace``) sends ``<epoch>:<offset>;<trace>:<payload>``
  instead, with its W3C ``traceparent`` after the offset. Untraced messages are as they
  always were, so nodes that send no trace and nodes that read none interoperate. A node
  of an earlier version ignores a traced message as malformed (a gap, filled from history
  once an untraced message reveals it): turn tracing on once every node reads them;
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
    return payload[:index], payload[index + 1 :]


@dataclass(frozen=True, slots=True)
class EventMessage:
    """One event as it arrives on pub/sub."""

    epoch: str
    offset: int
    payload: bytes
    #: The publish's ``traceparent``, when it was traced.
    trace: str | None = None


def encode_event(epoch: str, offset: int, payload: bytes, trace: str | None = None) -> bytes:
    """The pub/sub message of one event (what the publish and commit scripts send)."""
    mark = f"{offset};{trace}" if trace else str(offset)
    return f"{epoch}:{mark}:".encode() + payload


def decode_event(data: bytes) -> EventMessage | None:
    """An event message, or None when ``data`` is not one."""
    try:
        epoch, offset, payload = data.split(b":", 2)
        return EventMessage(epoch.decode(), int(offset), payload)
    except ValueError:  # also UnicodeDecodeError
        # Only a traced message (or a malformed one) pays for the second look.
        return _decode_traced(data)


def _decode_traced(data: bytes) -> EventMessage | None:
    """``<epoch>:<offset>;<trace>:<payload>``, or None when ``data`` is not that either."""
    try:
        epoch, mark, payload = data.split(b":", 2)
        offset, trace = mark.split(b";", 1)
        return EventMessage(epoch.decode(), int(offset), payload, trace.decode("ascii") or None)
    except ValueError:
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
