"""The server's replies as typed messages: frozen dataclasses the server's session returns
and the Python client decodes server frames into.

Events and presence messages are not here: they are encoded once by the broker and sent
as they are (the fan-out hot path never builds a message object). ``encode`` takes the
wall clock (epoch seconds) of the ``timestamp`` field: nothing here reads a clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tidings.codes import ErrorCode
from tidings.protocol.wire import encode_message

__all__ = [
    "Connected",
    "ErrorReply",
    "MalformedMessage",
    "Pong",
    "Refreshed",
    "ServerMessage",
    "Subscribed",
    "Unsubscribed",
    "decode_reply",
    "encode",
]


class MalformedMessage(ValueError):
    """A reply whose fields break the protocol (wrong types, impossible offsets)."""


@dataclass(frozen=True, slots=True)
class Connected:
    """``connected``: the first message on every connection. ``positions`` maps
    automatic channels to the ``(offset, epoch)`` at which they went live. The fields a
    client may find missing from a server decode as None."""

    connection_id: str | None
    user_id: str | None
    expires_at: str | None
    heartbeat_interval: float | None
    channels: tuple[str, ...] = ()
    positions: Mapping[str, tuple[int, str]] = field(default_factory=dict)

    def data(self) -> dict[str, Any]:
        interval = self.heartbeat_interval
        data: dict[str, Any] = {
            "connection_id": self.connection_id,
            "user_id": self.user_id,
            "expires_at": self.expires_at,
            "heartbeat_interval": (
                int(interval) if interval is not None and interval == int(interval) else interval
            ),
            "channels": list(self.channels),
        }
        if self.positions:
            data["positions"] = {
                channel: {"offset": offset, "epoch": epoch}
                for channel, (offset, epoch) in self.positions.items()
            }
        return data


@dataclass(frozen=True, slots=True)
class Subscribed:
    """``subscribed``: the subscription's live point; ``recovered`` (and ``since`` after a
    ``recovered: false`` followed by events) only in answer to a recover."""

    channel: str
    offset: int
    epoch: str
    id: str | None = None
    recovered: bool | None = None
    since: int | None = None

    def data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"channel": self.channel, "offset": self.offset, "epoch": self.epoch}
        if self.recovered is not None:
            data["recovered"] = self.recovered
        if self.since is not None:
            data["since"] = self.since
        return data


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    """``unsubscribed``: the answer to an unsubscribe (with its ``id``), or the server
    ending a subscription (``reason``, and whether to ``resubscribe``)."""

    channel: str
    id: str | None = None
    reason: str | None = None
    resubscribe: bool | None = None

    def data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"channel": self.channel}
        if self.reason is not None:
            data["reason"] = self.reason
        if self.resubscribe is not None:
            data["resubscribe"] = self.resubscribe
        return data


@dataclass(frozen=True, slots=True)
class Refreshed:
    """``refreshed``: the new token was accepted."""

    expires_at: str | None
    id: str | None = None

    def data(self) -> dict[str, Any]:
        return {"expires_at": self.expires_at} if self.expires_at is not None else {}


@dataclass(frozen=True, slots=True)
class Pong:
    """``pong``: the answer to a ping command."""

    id: str | None = None

    def data(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """``error``: a command failed (``id``), or the connection is about to close."""

    code: str
    message: str
    id: str | None = None
    channel: str | None = None

    def data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.channel is not None:
            data["channel"] = self.channel
        return data


ServerMessage = Connected | Subscribed | Unsubscribed | Refreshed | Pong | ErrorReply

_KINDS: dict[type[Any], str] = {
    Connected: "connected",
    Subscribed: "subscribed",
    Unsubscribed: "unsubscribed",
    Refreshed: "refreshed",
    Pong: "pong",
    ErrorReply: "error",
}


def encode(message: ServerMessage, wall: float) -> bytes:
    """The JSON of ``message``, stamped ``wall`` (epoch seconds)."""
    reply_id = None if isinstance(message, Connected) else message.id
    return encode_message(_KINDS[type(message)], message.data(), id=reply_id, timestamp=wall)


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _position(value: object) -> tuple[int, str] | None:
    """``(offset, epoch)`` from one entry of ``positions``; None unless well formed."""
    if not isinstance(value, dict):
        return None
    offset, epoch = value.get("offset"), value.get("epoch")
    if type(offset) is not int or offset < 0 or not isinstance(epoch, str) or not epoch:
        return None
    return offset, epoch


def _connected(data: dict[str, Any]) -> Connected:
    interval = data.get("heartbeat_interval")
    channels = data.get("channels")
    positions = data.get("positions")
    found: dict[str, tuple[int, str]] = {}
    if isinstance(positions, dict):
        for channel, value in positions.items():
            position = _position(value)
            if isinstance(channel, str) and position is not None:
                found[channel] = position
    return Connected(
        _str(data.get("connection_id")),
        _str(data.get("user_id")),
        _str(data.get("expires_at")),
        float(interval) if isinstance(interval, int | float) else None,
        tuple(c for c in channels if isinstance(c, str)) if isinstance(channels, list) else (),
        found,
    )


def _subscribed(data: dict[str, Any], reply_id: str | None) -> Subscribed:
    offset, epoch, recovered = data.get("offset"), data.get("epoch"), data.get("recovered")
    since = data.get("since")
    if (
        type(offset) is not int
        or not isinstance(epoch, str)
        or not (recovered is None or isinstance(recovered, bool))
        or not (since is None or (type(since) is int and 0 <= since <= offset))
    ):
        raise MalformedMessage("malformed 'subscribed' reply")
    return Subscribed(_str(data.get("channel")) or "", offset, epoch, reply_id, recovered, since)


def decode_reply(message: Mapping[str, Any]) -> ServerMessage | None:
    """The reply a decoded server frame holds; None for anything else (events, presence,
    unknown types). Lenient where clients must be (a missing field reads as None);
    raises ``MalformedMessage`` for a ``subscribed`` whose position cannot be trusted."""
    kind = message.get("type")
    raw = message.get("data")
    data: dict[str, Any] = raw if isinstance(raw, dict) else {}
    reply_id = _str(message.get("id"))
    if kind == "connected":
        return _connected(data)
    if kind == "subscribed":
        return _subscribed(data, reply_id)
    if kind == "unsubscribed":
        resubscribe = data.get("resubscribe")
        return Unsubscribed(
            _str(data.get("channel")) or "",
            reply_id,
            _str(data.get("reason")),
            resubscribe if isinstance(resubscribe, bool) else None,
        )
    if kind == "refreshed":
        return Refreshed(_str(data.get("expires_at")), reply_id)
    if kind == "pong":
        return Pong(reply_id)
    if kind == "error":
        code, text = data.get("code"), data.get("message")
        return ErrorReply(
            code if isinstance(code, str) else ErrorCode.INTERNAL_ERROR,
            text if isinstance(text, str) else "",
            reply_id,
            _str(data.get("channel")),
        )
    return None
