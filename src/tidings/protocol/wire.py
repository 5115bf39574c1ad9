"""Wire schema: decoding client commands and encoding server messages.

Pure and synchronous. Encoding leaves out every field without a value (never ``null``).
"""

from __future__ import annotations

import functools
import math
import re
import struct
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from tidings.errors import InvalidRequest
from tidings.protocol.names import parse_channel

__all__ = [
    "MAX_JSON_DEPTH",
    "BadCommand",
    "Command",
    "Ping",
    "Recover",
    "Refresh",
    "Subscribe",
    "Unsubscribe",
    "close_frame",
    "decode_command",
    "dumps",
    "encode_message",
    "format_expiry",
    "format_timestamp",
    "json_too_deep",
    "loads",
    "ping_frame",
    "text_frame",
]

MAX_ID_LENGTH = 64
#: Deepest nesting of arrays and objects accepted in any JSON a peer sends (commands,
#: API bodies, token segments): ``{"a": [1]}`` is 2 levels deep. msgspec and ``json``
#: recurse per level and raise RecursionError near 1,000, which no client may provoke.
MAX_JSON_DEPTH = 64

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()

# Keep only brackets, as one kind (the kind does not change the depth; a mismatch such
# as ``[}`` is msgspec's to report), and quotes, to tell which brackets are in strings.
_TO_SQUARE = bytes.maketrans(b"{}", b"[]")
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'[]{}"')))
#: Leaf pairs ``[]`` deleted by ``bytes.replace`` before the regular expression runs: the
#: bulk of a shallow document, removed faster than the matcher steps over it.
_LEAF_PASSES = 2


def _balanced_within(depth: int) -> re.Pattern[bytes]:
    """A pattern matching exactly the balanced bracket sequences at most ``depth`` deep.

    Bounded depth makes the language regular; possessive repeats never backtrack, so a
    match or a failure costs one linear scan.
    """
    pattern = b""
    for _ in range(depth):
        pattern = rb"(?:\[" + pattern + rb"\])*+"
    return re.compile(pattern)


_BALANCED = _balanced_within(MAX_JSON_DEPTH - _LEAF_PASSES)
_TOO_DEEP = f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
_NOT_JSON = "message is not valid JSON"


def dumps(value: Any) -> bytes:
    """Encode ``value`` as compact JSON bytes."""
    return _encoder.encode(value)


def json_too_deep(data: bytes | str) -> bool:
    """Whether ``data`` must not reach a recursive JSON decoder: it nests arrays and
    objects deeper than ``MAX_JSON_DEPTH``, or its brackets do not balance (then it is
    not JSON at all, and may be deep before its fault).

    False for every JSON document within the limit. Never recurses, and costs a few
    linear C-speed passes at most: short data costs a length check, data with fewer
    brackets than the limit two counts.
    """
    return _depth_fault(data) is not None


def _depth_fault(data: bytes | str) -> str | None:
    """``json_too_deep`` with the reason, for ``loads`` to report."""
    # Deeper than the limit takes an opening and a closing bracket per level; shorter
    # text that is not JSON cannot make a decoder recurse near its limit either.
    if len(data) < 2 * (MAX_JSON_DEPTH + 1):
        return None
    if isinstance(data, str):
        if data.count("[") + data.count("{") <= MAX_JSON_DEPTH:
            return None
        raw = data.encode("utf-8", "surrogatepass")
    else:
        if data.count(b"[") + data.count(b"{") <= MAX_JSON_DEPTH:
            return None
        raw = data
    if b"\\" in raw:
        # Escapes go first, read left to right as a JSON scanner reads them (escaped
        # backslashes, then escaped quotes): the quotes left delimit strings.
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    kept = raw.translate(_TO_SQUARE, _NOT_STRUCTURE)
    # Adjacent quotes enclose no bracket, whether they open and close one string or
    # close one and open the next: dropping them leaves the other quotes paired as
    # before. Only strings holding brackets are left, for the slower split.
    kept = kept.replace(b'""', b"")
    brackets = b"".join(kept.split(b'"')[::2]) if b'"' in kept else kept
    for _ in range(_LEAF_PASSES):
        shorter = brackets.replace(b"[]", b"")
        if not shorter:
            return None
        if len(shorter) == len(brackets):
            return _NOT_JSON  # no pair left to delete: unbalanced
        brackets = shorter
    if _BALANCED.fullmatch(brackets):
        return None
    # Where the top level stops: a closing bracket there closes nothing. An opening
    # one starts a group that did not close within the depth left: with as many
    # closing brackets as opening ones after it, that group is too deep.
    stop = _BALANCED.match(brackets)
    end = stop.end() if stop else 0
    if brackets[end : end + 1] == b"]" or 2 * brackets.count(b"[", end) != len(brackets) - end:
        return _NOT_JSON
    return _TOO_DEEP


def loads(data: bytes | str) -> Any:
    """Decode JSON; raise ``InvalidRequest`` when it is not JSON or nests deeper than
    ``MAX_JSON_DEPTH`` levels. Never raises anything else, whatever ``data`` holds."""
    fault = _depth_fault(data)
    if fault is not None:
        raise InvalidRequest(fault)
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, UnicodeError) as exc:  # ValidationError: numbers too big
        raise InvalidRequest(_NOT_JSON) from exc
    except RecursionError:  # the depth is bounded, but a caller may be deep in its stack
        raise InvalidRequest(_TOO_DEEP) from None


class BadCommand(InvalidRequest):
    """An invalid command; carries the command's ``id`` when it could be read."""

    def __init__(
        self, message: str, *, command_id: str | None = None, channel: str | None = None
    ) -> None:
        super().__init__(message, channel=channel)
        self.command_id = command_id


@dataclass(frozen=True, slots=True)
class Recover:
    """Where a client left off in a channel."""

    offset: int
    epoch: str


@dataclass(frozen=True, slots=True)
class Subscribe:
    id: str | None
    channel: str
    recover: Recover | None = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    id: str | None
    channel: str


@dataclass(frozen=True, slots=True)
class Ping:
    id: str | None


@dataclass(frozen=True, slots=True)
class Refresh:
    id: str | None
    token: str


Command = Subscribe | Unsubscribe | Ping | Refresh


def _channel(data: dict[str, Any], command_id: str | None) -> str:
    try:
        namespace, name = parse_channel(data.get("channel"))
    except InvalidRequest as exc:
        raise BadCommand(exc.message, command_id=command_id, channel=exc.channel) from None
    return f"{namespace}:{name}"


def _recover(value: Any, command_id: str | None, channel: str) -> Recover | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadCommand("recover must be an object", command_id=command_id, channel=channel)
    offset, epoch = value.get("offset"), value.get("epoch")
    if type(offset) is not int or offset < 0 or not isinstance(epoch, str) or len(epoch) > 128:
        raise BadCommand(
            "recover needs an integer offset >= 0 and a string epoch",
            command_id=command_id,
            channel=channel,
        )
    return Recover(offset=offset, epoch=epoch)


def decode_command(raw: bytes | str) -> Command:
    """Decode one text frame into a command; raise ``BadCommand`` for anything invalid."""
    try:
        message = loads(raw)
    except InvalidRequest as exc:
        raise BadCommand(exc.message) from None
    if not isinstance(message, dict):
        raise BadCommand("message must be a JSON object")
    command_id = message.get("id")
    if command_id is not None and (
        not isinstance(command_id, str) or len(command_id) > MAX_ID_LENGTH
    ):
        raise BadCommand(f"id must be a string of at most {MAX_ID_LENGTH} characters")
    kind = message.get("type")
    data = message.get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BadCommand("data must be an object", command_id=command_id)
    if kind == "subscribe":
        channel = _channel(data, command_id)
        return Subscribe(command_id, channel, _recover(data.get("recover"), command_id, channel))
    if kind == "unsubscribe":
        return Unsubscribe(command_id, _channel(data, command_id))
    if kind == "ping":
        return Ping(command_id)
    if kind == "refresh":
        token = data.get("token")
        if not isinstance(token, str) or not token:
            raise BadCommand("refresh needs a token string", command_id=command_id)
        return Refresh(command_id, token)
    if not isinstance(kind, str):
        raise BadCommand("type is required and must be a string", command_id=command_id)
    raise BadCommand(f"unknown command type '{kind[:64]}'", command_id=command_id)


def format_timestamp(epoch_seconds: float) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-27T16:45:46.123Z``."""
    if not math.isfinite(epoch_seconds):
        raise ValueError("timestamp must be finite")
    millis = int(epoch_seconds * 1000)
    seconds, ms = divmod(millis, 1000)
    return f"{_second(seconds)}.{ms:03d}Z"


def format_expiry(epoch_seconds: float) -> str:
    """RFC 3339 UTC to the second, as used for ``expires_at``."""
    return _second(int(epoch_seconds)) + "Z"


@functools.lru_cache(maxsize=8)
def _second(seconds: int) -> str:
    # Every message carries a timestamp and most fall in the same second: strftime once.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def encode_message(
    kind: str,
    data: dict[str, Any],
    *,
    id: str | None = None,
    channel: str | None = None,
    offset: int | None = None,
    timestamp: float,
) -> bytes:
    """Encode one server message as JSON bytes, leaving out fields without a value;
    ``timestamp`` is the wall clock (epoch seconds) of the caller, never read here."""
    message: dict[str, Any] = {"type": kind}
    if channel is not None:
        message["channel"] = channel
    if offset is not None:
        message["offset"] = offset
    if id is not None:
        message["id"] = id
    message["timestamp"] = format_timestamp(timestamp)
    message["data"] = data
    return _encoder.encode(message)


_LEN1 = struct.Struct("!BB").pack
_LEN2 = struct.Struct("!BBH").pack
_LEN3 = struct.Struct("!BBQ").pack


def _frame(opcode: int, payload: bytes) -> bytes:
    length = len(payload)
    first = 0x80 | opcode
    if length < 126:
        header = _LEN1(first, length)
    elif length < 65536:
        header = _LEN2(first, 126, length)
    else:
        header = _LEN3(first, 127, length)
    return header + payload


def text_frame(payload: bytes) -> bytes:
    """A complete, unmasked server-to-client text frame carrying ``payload``."""
    return _frame(0x1, payload)


def ping_frame() -> bytes:
    """An empty server ping frame."""
    return _frame(0x9, b"")


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut to fit the 123-byte limit of control frames."""
    # Never cut inside a UTF-8 sequence: a close reason must be valid UTF-8 (RFC 6455 8.1).
    encoded = reason.encode()[:123].decode("utf-8", "ignore").encode()
    return _frame(0x8, struct.pack("!H", code) + encoded)
