"""Server-Sent Events encoding, sans-I/O: resume tokens and the SSE form of server frames.

The gateway and hub write pre-built WebSocket text frames to every peer. An SSE peer
turns those frames back into their JSON payloads (a frame header is 2, 4 or 10 bytes: no
JSON is decoded or encoded for an event) and writes each as one SSE event whose
``data:`` line is exactly that payload, with an ``id:`` line carrying a resume token.

The resume token encodes, for every channel of the connection, the epoch and the offset
up to which the client has been sent its events: base64url (no padding) of the compact
JSON ``[[channel, offset, epoch], ...]``. It is opaque to clients; ``decode_token`` is
strict, as the token comes back from the client (``Last-Event-ID``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from tidings.errors import InvalidRequest
from tidings.protocol import is_valid_channel, loads

__all__ = [
    "MAX_TOKEN_CHARS",
    "BadResumeToken",
    "ParseCache",
    "SseEncoder",
    "close_event",
    "decode_token",
    "encode_token",
    "frame_payloads",
]

#: Longest resume token accepted: aiohttp's limit on one header line (8190 bytes), so
#: that any token the server hands out can come back in ``Last-Event-ID``.
MAX_TOKEN_CHARS = 8190

#: Longest epoch in a token (as in a ``recover`` command).
MAX_EPOCH_CHARS = 128

#: The control messages that move a channel's position; decoded as JSON (rare).
_POSITION_TYPES = (b'{"type":"connected"', b'{"type":"subscribed"', b'{"type":"unsubscribed"')

#: The head of every event payload (protocol.wire.encode_message key order): type,
#: channel, offset. Channel names cannot contain a quote (protocol.names).
_EVENT_HEAD = re.compile(rb'\{"type":"[^"]*","channel":"([^"]*)","offset":(\d+)')


class BadResumeToken(ValueError):
    """A ``Last-Event-ID`` that is not a resume token this server could have issued."""


def encode_token(positions: Mapping[str, tuple[int, str]]) -> str:
    """The resume token for ``positions`` (channel -> (offset, epoch))."""
    entries = [[channel, offset, epoch] for channel, (offset, epoch) in positions.items()]
    raw = json.dumps(entries, separators=(",", ":"), ensure_ascii=True).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_token(token: str, max_channels: int) -> dict[str, tuple[int, str]]:
    """The positions in ``token``; raises ``BadResumeToken`` for anything else (too
    long, not base64url, not the JSON shape, invalid channel or epoch, a duplicate
    channel, more than ``max_channels`` channels)."""
    if not token:
        return {}
    if len(token) > MAX_TOKEN_CHARS or not token.isascii():
        raise BadResumeToken("resume token too long or not ASCII")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        # protocol.loads, not json.loads: the token comes from the client, and nesting
        # past MAX_JSON_DEPTH would make json.loads raise RecursionError.
        entries: Any = loads(raw)
    except (binascii.Error, ValueError, InvalidRequest):
        raise BadResumeToken("resume token is not base64url JSON") from None
    if not isinstance(entries, list) or len(entries) > max_channels:
        raise BadResumeToken(f"resume token must list at most {max_channels} channels")
    positions: dict[str, tuple[int, str]] = {}
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 3):
            raise BadResumeToken("resume token entries are [channel, offset, epoch]")
        channel, offset, epoch = entry
        if (
            not is_valid_channel(channel)
            or type(offset) is not int
            or offset < 0
            or not isinstance(epoch, str)
            or len(epoch) > MAX_EPOCH_CHARS
            or channel in positions
        ):
            raise BadResumeToken("resume token has an invalid channel, offset or epoch")
        positions[channel] = (offset, epoch)
    return positions


def frame_payloads(data: bytes) -> list[bytes]:
    """The payloads of the concatenated unmasked server frames in ``data``
    (``protocol.wire``: 7-bit length, or 126/127 then a 16/64-bit one)."""
    payloads = []
    index, end = 0, len(data)
    while index + 2 <= end:
        length = data[index + 1] & 0x7F
        if length == 126:
            length, index = int.from_bytes(data[index + 2 : index + 4]), index + 4
        elif length == 127:
            length, index = int.from_bytes(data[index + 2 : index + 10]), index + 10
        else:
            index += 2
        payloads.append(data[index : index + length])
        index += length
    return payloads


def close_event(code: int, reason: str) -> bytes:
    """The last event of a stream the server ends: SSE's form of a WebSocket close."""
    body = json.dumps({"code": code, "reason": reason}, separators=(",", ":"))
    return b"event: close\ndata: " + body.encode() + b"\n\n"


class _Message(NamedTuple):
    payload: bytes
    #: For an event: its channel and offset; None otherwise.
    channel: str | None
    offset: int
    #: For a control message that moves positions: the decoded message.
    control: dict[str, Any] | None


class ParseCache:
    """The parse of the last frames encoded, shared by the SSE connections of one
    server (one entry: fan-out hands the same joined bytes object to every subscriber
    of a channel in one flush). Holding the object keeps its id from being reused
    while the entry stands."""

    __slots__ = ("entry",)

    def __init__(self) -> None:
        self.entry: tuple[bytes, list[_Message]] | None = None


class SseEncoder:
    """One connection's positions, and its frames as SSE events.

    ``encode`` is called with whatever the gateway or hub would write to a WebSocket.
    The parse of those frames is looked up in ``cache`` by the bytes object's identity,
    so each further connection of a fan-out only updates its positions and writes its
    own ``id:`` lines.
    """

    __slots__ = ("_cache", "_positions", "_token")

    def __init__(self, cache: ParseCache | None = None) -> None:
        self._cache = cache or ParseCache()
        self._positions: dict[str, tuple[int, str]] = {}
        self._token: str | None = None

    @property
    def positions(self) -> Mapping[str, tuple[int, str]]:
        return self._positions

    def token(self) -> str:
        """The resume token of the positions as they stand."""
        if self._token is None:
            self._token = encode_token(self._positions)
        return self._token

    def seed(self, channel: str, offset: int, epoch: str) -> None:
        """The client asked to recover ``channel`` from here: its position until the
        ``subscribed`` reply and the replay move it."""
        if channel not in self._positions:
            self._positions[channel] = (offset, epoch)
            self._token = None

    def encode(self, data: bytes) -> bytes:
        """The SSE events for the frames in ``data``."""
        cached = self._cache.entry
        if cached is not None and cached[0] is data:
            messages = cached[1]
        else:
            messages = [_parse(payload) for payload in frame_payloads(data)]
            self._cache.entry = (data, messages)
        parts: list[bytes] = []
        for message in messages:
            if message.channel is not None:
                self._advance(message.channel, message.offset)
            elif message.control is not None:
                self._apply(message.control)
            parts.append(b"id: %s\ndata: %s\n\n" % (self.token().encode(), message.payload))
        return b"".join(parts)

    def _advance(self, channel: str, offset: int) -> None:
        known = self._positions.get(channel)
        if known is not None and offset > known[0]:
            self._positions[channel] = (offset, known[1])
            self._token = None

    def _apply(self, message: dict[str, Any]) -> None:
        kind, data = message.get("type"), message.get("data")
        if not isinstance(data, dict):
            return
        if kind == "connected":
            for channel, position in _items(data.get("positions")):
                if isinstance(position, dict):
                    self._set(channel, position.get("offset"), position.get("epoch"))
        elif kind == "unsubscribed":
            if self._positions.pop(str(data.get("channel")), None) is not None:
                self._token = None
        elif kind == "subscribed":
            self._subscribed(data)

    def _subscribed(self, data: dict[str, Any]) -> None:
        channel, offset, epoch = data.get("channel"), data.get("offset"), data.get("epoch")
        if not isinstance(channel, str):
            return
        recovered = data.get("recovered")
        known = self._positions.get(channel)
        if recovered is True and known is not None and known[1] == epoch:
            return  # the replay that follows moves the position on from the client's
        if recovered is False and isinstance(data.get("since"), int):
            offset = data["since"]  # a new epoch's events follow from since + 1
        self._set(channel, offset, epoch)

    def _set(self, channel: str, offset: object, epoch: object) -> None:
        if type(offset) is int and isinstance(epoch, str):
            self._positions[channel] = (offset, epoch)
            self._token = None


def _items(value: object) -> Iterable[tuple[str, object]]:
    return value.items() if isinstance(value, dict) else ()


def _parse(payload: bytes) -> _Message:
    if payload.startswith(_POSITION_TYPES):
        try:
            decoded = json.loads(payload)
        except ValueError:
            decoded = None
        return _Message(payload, None, 0, decoded if isinstance(decoded, dict) else None)
    head = _EVENT_HEAD.match(payload)
    if head is not None:
        return _Message(payload, head.group(1).decode(), int(head.group(2)), None)
    return _Message(payload, None, 0, None)
