"""Unit tests for tidings.protocol: channel and event-type grammar, the wire codec, codes."""

from __future__ import annotations

import inspect
import json
import math
import re
import struct
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidings import errors
from tidings.errors import InvalidRequest
from tidings.protocol import (
    MAX_JSON_DEPTH,
    RESERVED_TYPES,
    BadCommand,
    CloseCode,
    ErrorCode,
    Ping,
    ReconnectAdvice,
    Recover,
    Refresh,
    Subscribe,
    Unsubscribe,
    decode_command,
    encode_message,
    format_expiry,
    format_timestamp,
    is_valid_channel,
    json_too_deep,
    loads,
    parse_channel,
    personal_channel,
    text_frame,
    validate_event_type,
)
from tidings.protocol.wire import MAX_ID_LENGTH, close_frame, ping_frame

TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
#: Every command and reply name of protocol sections 1, 5 and 6, and the presence
#: messages (docs/protocol.md "Presence events").
PROTOCOL_NAMES = {
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
    "join",
    "leave",
}


def cmd(message: Any) -> bytes:
    """Encode a command as a client would."""
    return json.dumps(message).encode()


def bad(raw: bytes | str) -> BadCommand:
    """Decode ``raw`` and return the ``BadCommand`` it must raise."""
    with pytest.raises(BadCommand) as info:
        decode_command(raw)
    return info.value


# -- channel grammar ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channel", "namespace", "name"),
    [
        ("news:daily", "news", "daily"),
        ("task:proj:7", "task", "proj:7"),
        ("user:auth0|abc", "user", "auth0|abc"),
        ("user:john.doe@example.com", "user", "john.doe@example.com"),
        ("a:b", "a", "b"),
        ("a-b_9:X=y+z", "a-b_9", "X=y+z"),
        ("conv:::", "conv", "::"),
        ("n" * 32 + ":x", "n" * 32, "x"),
        ("n:" + "x" * 128, "n", "x" * 128),
        ("n:" + "a:" * 64, "n", "a:" * 64),
    ],
)
def test_parse_channel_accepts_grammar(channel: str, namespace: str, name: str) -> None:
    """Valid channels split at the first colon into namespace and name."""
    assert parse_channel(channel) == (namespace, name)
    assert is_valid_channel(channel)


@pytest.mark.parametrize(
    "channel",
    [
        "",
        "news",
        ":daily",
        "news:",
        ":",
        "n" * 33 + ":x",
        "n:" + "x" * 129,
        "News:daily",
        "1news:daily",
        "_news:daily",
        "-news:daily",
        "ne.ws:daily",
        "ne ws:daily",
        "news:da ily",
        "news:daily/1",
        "news:daily#1",
        "news:daily*",
        "news:dai?ly",
        "news:caf\u00e9",
        "n\u00e9ws:daily",
        "news:\u0661",
        "news:daily\n",
        "news\n:daily",
        " news:daily",
        "news:daily ",
        "news:\x00",
    ],
)
def test_parse_channel_rejects_bad_names(channel: str) -> None:
    """Anything outside the channel grammar is an InvalidRequest."""
    with pytest.raises(InvalidRequest) as info:
        parse_channel(channel)
    assert info.value.code == "invalid_request"
    assert not is_valid_channel(channel)


@pytest.mark.parametrize("value", [None, 7, 1.5, b"news:daily", ["news:daily"], {"c": 1}])
def test_parse_channel_rejects_non_strings(value: object) -> None:
    """A channel that is not a string is an InvalidRequest, not a TypeError."""
    with pytest.raises(InvalidRequest):
        parse_channel(value)
    assert not is_valid_channel(value)


def test_parse_channel_error_carries_truncated_channel() -> None:
    """The error for a bad channel names the channel, cut to 200 characters."""
    with pytest.raises(InvalidRequest) as info:
        parse_channel("Bad:" + "x" * 500)
    assert info.value.channel == ("Bad:" + "x" * 500)[:200]


@given(
    st.from_regex(r"[a-z][a-z0-9_-]{0,31}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9_.@=+|:-]{1,128}", fullmatch=True),
)
def test_parse_channel_roundtrip_property(namespace: str, name: str) -> None:
    """Every namespace and name drawn from the grammar parses back to themselves."""
    assert parse_channel(f"{namespace}:{name}") == (namespace, name)


@pytest.mark.parametrize(
    ("sub", "expected"),
    [
        ("user-456", "user:user-456"),
        ("auth0|abc", "user:auth0|abc"),
        ("a:b", "user:a:b"),
        ("x" * 128, "user:" + "x" * 128),
        ("x" * 129, None),
        ("has space", None),
        ("caf\u00e9", None),
        ("", None),
    ],
)
def test_personal_channel(sub: str, expected: str | None) -> None:
    """The personal channel is user:<sub>, or None when the sub does not fit the grammar."""
    assert personal_channel(sub) == expected


@given(st.text(alphabet=st.sampled_from("aZ09_.@=+|:- \n/é*#"), max_size=140))
def test_personal_channel_agrees_with_the_channel_grammar(sub: str) -> None:
    """For any sub, the personal channel exists exactly when user:<sub> is a valid channel."""
    channel = f"user:{sub}"
    assert personal_channel(sub) == (channel if is_valid_channel(channel) else None)


# -- event type grammar -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["notification", "a", "order_shipped", "v2", "a" * 64, "x_1_y", "a" + "9" * 63]
)
def test_event_type_accepts_grammar(name: str) -> None:
    """Event type names matching ^[a-z][a-z0-9_]{0,63}$ are accepted as they are."""
    assert validate_event_type(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a" * 65,
        "Order",
        "1order",
        "_order",
        "order-shipped",
        "order.shipped",
        "order:x",
        "order shipped",
        "ord\u00e9r",
        "order\n",
        "ORDER",
    ],
)
def test_event_type_rejects_bad_names(name: str) -> None:
    """Event type names outside the grammar are an InvalidRequest."""
    with pytest.raises(InvalidRequest):
        validate_event_type(name)


@pytest.mark.parametrize("value", [None, 1, ["notification"], b"notification"])
def test_event_type_rejects_non_strings(value: object) -> None:
    """An event type that is not a string is an InvalidRequest."""
    with pytest.raises(InvalidRequest):
        validate_event_type(value)


def test_reserved_names_are_the_protocol_names() -> None:
    """The reserved set is exactly the command and reply names of the protocol."""
    assert set(RESERVED_TYPES) == PROTOCOL_NAMES


@pytest.mark.parametrize("name", sorted(PROTOCOL_NAMES))
def test_event_type_rejects_every_reserved_name(name: str) -> None:
    """Each command or reply name is refused as an event type, with a message saying so."""
    with pytest.raises(InvalidRequest, match="reserved"):
        validate_event_type(name)


# -- decode_command -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"{",
        b'{"type": "ping"',
        b"{'type': 'ping'}",
        b"\xff\xfe\x00",
        b'{"type": "ping", "id": "\xff"}',
        b"\x00\x01\x02",
        b"NaN",
    ],
)
def test_decode_rejects_non_json(raw: bytes | str) -> None:
    """Text that is not JSON (or not UTF-8) is a BadCommand without an id."""
    error = bad(raw)
    assert error.code == "invalid_request"
    assert error.command_id is None


@pytest.mark.parametrize(
    "raw", [b"[]", b'[{"type": "ping"}]', b'"ping"', b"42", b"null", b"true", b"1.5"]
)
def test_decode_rejects_non_objects(raw: bytes) -> None:
    """JSON that is not an object is a BadCommand saying so."""
    error = bad(raw)
    assert "object" in error.message
    assert error.command_id is None


def nested(depth: int, kinds: str = "[{") -> str:
    """JSON nesting arrays and objects ``depth`` levels deep, alternating ``kinds``."""
    opening = "".join(
        '{"k":' if kinds[level % len(kinds)] == "{" else "[" for level in range(depth)
    )
    closing = "".join(
        "}" if kinds[level % len(kinds)] == "{" else "]" for level in reversed(range(depth))
    )
    return opening + "1" + closing


def json_depth(value: Any) -> int:
    """Reference nesting depth of a decoded JSON value (scalars are 0)."""
    if isinstance(value, dict):
        return 1 + max(map(json_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(json_depth, value), default=0)
    return 0


@pytest.mark.parametrize("kinds", ["[", "{", "[{", "{["])
@pytest.mark.parametrize("as_text", [False, True])
def test_loads_accepts_the_depth_limit_and_refuses_one_more(kinds: str, as_text: bool) -> None:
    """MAX_JSON_DEPTH (64) levels decode; 65 are invalid_request naming the limit."""
    assert MAX_JSON_DEPTH == 64
    within, beyond = nested(MAX_JSON_DEPTH, kinds), nested(MAX_JSON_DEPTH + 1, kinds)
    assert json_depth(loads(within if as_text else within.encode())) == MAX_JSON_DEPTH
    with pytest.raises(InvalidRequest, match="deeper than 64 levels") as info:
        loads(beyond if as_text else beyond.encode())
    assert info.value.code == "invalid_request"


@pytest.mark.parametrize("depth", [1000, 5000, 100_000])
def test_loads_refuses_deep_documents_without_recursing(depth: int) -> None:
    """Nesting far past msgspec's recursion limit is invalid_request, never RecursionError."""
    for raw in (nested(depth).encode(), ("[" * depth).encode(), '{"a":' * depth):
        with pytest.raises(InvalidRequest):
            loads(raw)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param('"' + "[" * 200 + '"', id="in-a-string"),
        pytest.param('["\\\\", "' + "{" * 200 + '"]', id="after-an-escaped-backslash"),
        pytest.param('["\\"' + "[" * 200 + '"]', id="after-an-escaped-quote"),
        pytest.param('{"' + "]" * 100 + '":["' + "[" * 100 + '"]}', id="in-keys-and-values"),
        pytest.param("[" + '[[1,2],{"a":[3]}],' * 100 + "[]]", id="wide-and-shallow"),
    ],
)
def test_brackets_in_strings_and_wide_documents_are_not_depth(text: str) -> None:
    """Only structural brackets count: strings, escapes and width do not."""
    assert not json_too_deep(text)
    assert not json_too_deep(text.encode())
    assert loads(text) == json.loads(text)


@pytest.mark.parametrize(
    "raw", [b"]" * 70 + b"[" * 70, b"[" * 70 + b"]" * 69, b"[" * 130, b"[" * 65 + b'"' + b"]" * 65]
)
def test_unbalanced_brackets_are_not_json(raw: bytes) -> None:
    """Unbalanced structure is refused before any decoder sees it."""
    assert json_too_deep(raw)
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        loads(raw)


# Strings drawn from JSON's awkward characters: brackets, quotes, backslashes.
_awkward_strings = st.text(alphabet='[]{}"\\ab\n\u00e9\u2028', max_size=6)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | _awkward_strings,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(_awkward_strings, inner, max_size=3)
    ),
    max_leaves=40,
)


def _deepen(value: Any, levels: int) -> Any:
    for level in range(levels):
        value = [value, "]"] if level % 2 else {"[": value}
    return value


@settings(max_examples=300, deadline=None)
@given(value=_json_values, extra=st.integers(min_value=0, max_value=80), ascii_only=st.booleans())
def test_json_too_deep_agrees_with_the_decoded_depth(
    value: Any, extra: int, ascii_only: bool
) -> None:
    """For any JSON document, the byte scan says "too deep" exactly when it is."""
    document = _deepen(value, extra)
    text = json.dumps(document, ensure_ascii=ascii_only)
    expected = json_depth(document) > MAX_JSON_DEPTH
    assert json_too_deep(text) is expected
    assert json_too_deep(text.encode()) is expected


def test_decode_command_too_deep_is_bad_command() -> None:
    """A command nesting past the limit is a BadCommand (invalid_request), not a crash."""
    error = bad('{"type": "ping", "data": {"x": ' + "[" * 1000 + "]" * 1000 + "}}")
    assert error.code == "invalid_request"
    assert "deeper than 64 levels" in error.message


def test_decode_accepts_str_input() -> None:
    """A command given as str decodes the same as bytes."""
    assert decode_command('{"type": "ping", "id": "1"}') == Ping("1")


def test_decode_missing_type_echoes_id() -> None:
    """A command without type is a BadCommand that still carries its id."""
    error = bad(cmd({"id": "7", "data": {}}))
    assert error.command_id == "7"
    assert "type" in error.message


@pytest.mark.parametrize("kind", [None, 5, ["ping"], {"ping": 1}, True])
def test_decode_non_string_type(kind: object) -> None:
    """A type that is not a string is a BadCommand carrying the id."""
    error = bad(cmd({"type": kind, "id": "x"}))
    assert error.command_id == "x"
    assert "type" in error.message


@pytest.mark.parametrize("kind", ["publish", "PING", "", "subscribed", "pong", "x" * 500])
def test_decode_unknown_type(kind: str) -> None:
    """An unknown type is a BadCommand naming it (cut to 64 characters)."""
    error = bad(cmd({"type": kind, "id": "u1"}))
    assert error.command_id == "u1"
    assert "unknown command type" in error.message
    assert kind[:64] in error.message
    assert kind[:65] not in error.message or len(kind) <= 64


@pytest.mark.parametrize("command_id", [7, 1.5, True, ["a"], {"a": 1}])
def test_decode_non_string_id_has_no_id(command_id: object) -> None:
    """An id that is not a string is rejected and the error carries no id."""
    error = bad(cmd({"type": "ping", "id": command_id}))
    assert error.command_id is None
    assert "id" in error.message


def test_decode_id_length_boundary() -> None:
    """An id of 64 characters is accepted; 65 is rejected with no id echoed."""
    assert MAX_ID_LENGTH == 64
    assert decode_command(cmd({"type": "ping", "id": "i" * 64})) == Ping("i" * 64)
    error = bad(cmd({"type": "ping", "id": "i" * 65}))
    assert error.command_id is None


def test_decode_null_id_is_absent() -> None:
    """An explicit null id means no id."""
    assert decode_command(cmd({"type": "ping", "id": None})) == Ping(None)
    assert decode_command(cmd({"type": "ping"})) == Ping(None)


@pytest.mark.parametrize("data", [[], "x", 1, True, [1, 2]])
def test_decode_data_must_be_object(data: object) -> None:
    """A data field that is not an object is a BadCommand carrying the id."""
    error = bad(cmd({"type": "ping", "id": "d", "data": data}))
    assert error.command_id == "d"
    assert "data" in error.message


def test_decode_data_null_is_empty() -> None:
    """data: null is treated as {} (so ping works and subscribe reports the missing channel)."""
    assert decode_command(cmd({"type": "ping", "data": None})) == Ping(None)
    error = bad(cmd({"type": "subscribe", "id": "s", "data": None}))
    assert error.command_id == "s"


def test_decode_subscribe() -> None:
    """A subscribe command decodes into Subscribe with its id and channel."""
    command = decode_command(
        cmd({"type": "subscribe", "id": "s1", "data": {"channel": "task:proj:7"}})
    )
    assert command == Subscribe("s1", "task:proj:7", None)


@pytest.mark.parametrize("data", [{}, {"channel": None}, {"chan": "news:x"}])
def test_decode_subscribe_without_channel(data: dict[str, Any]) -> None:
    """A subscribe without a channel is a BadCommand carrying the id."""
    error = bad(cmd({"type": "subscribe", "id": "s2", "data": data}))
    assert error.command_id == "s2"
    assert error.channel is None


@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe"])
def test_decode_bad_channel_echoes_channel(kind: str) -> None:
    """A bad channel name is a BadCommand carrying both the id and the channel."""
    error = bad(cmd({"type": kind, "id": "b", "data": {"channel": "Bad Channel"}}))
    assert error.command_id == "b"
    assert error.channel == "Bad Channel"
    assert error.code == "invalid_request"


@pytest.mark.parametrize("channel", [7, ["news:x"], {"n": "x"}, True])
def test_decode_non_string_channel(channel: object) -> None:
    """A channel that is not a string is a BadCommand without a channel."""
    error = bad(cmd({"type": "subscribe", "id": "n", "data": {"channel": channel}}))
    assert error.command_id == "n"
    assert error.channel is None


def test_decode_unsubscribe() -> None:
    """An unsubscribe command decodes into Unsubscribe."""
    command = decode_command(cmd({"type": "unsubscribe", "data": {"channel": "news:x"}}))
    assert command == Unsubscribe(None, "news:x")
    error = bad(cmd({"type": "unsubscribe", "id": "u"}))
    assert error.command_id == "u"


@pytest.mark.parametrize(
    ("recover", "expected"),
    [
        ({"offset": 41, "epoch": "e1"}, Recover(41, "e1")),
        ({"offset": 0, "epoch": ""}, Recover(0, "")),
        ({"offset": 2**53, "epoch": "x" * 128}, Recover(2**53, "x" * 128)),
        ({"offset": 3, "epoch": "e", "extra": True}, Recover(3, "e")),
        (None, None),
    ],
)
def test_decode_subscribe_recover(recover: dict[str, Any] | None, expected: Recover | None) -> None:
    """Well-formed recover positions are decoded; null means no recovery."""
    command = decode_command(
        cmd({"type": "subscribe", "id": "r", "data": {"channel": "news:x", "recover": recover}})
    )
    assert command == Subscribe("r", "news:x", expected)


@pytest.mark.parametrize(
    "recover",
    [
        {"offset": True, "epoch": "e"},
        {"offset": False, "epoch": "e"},
        {"offset": -1, "epoch": "e"},
        {"offset": 1.0, "epoch": "e"},
        {"offset": 1.5, "epoch": "e"},
        {"offset": "1", "epoch": "e"},
        {"offset": None, "epoch": "e"},
        {"epoch": "e"},
        {"offset": 1},
        {"offset": 1, "epoch": 1},
        {"offset": 1, "epoch": None},
        {"offset": 1, "epoch": ["e"]},
        {"offset": 1, "epoch": "x" * 129},
        [1, "e"],
        "41",
        41,
    ],
)
def test_decode_subscribe_bad_recover(recover: object) -> None:
    """Malformed recover positions are a BadCommand carrying the id and channel."""
    error = bad(
        cmd({"type": "subscribe", "id": "r", "data": {"channel": "news:x", "recover": recover}})
    )
    assert error.command_id == "r"
    assert error.channel == "news:x"
    assert "recover" in error.message


def test_decode_refresh() -> None:
    """A refresh command decodes into Refresh with its token."""
    assert decode_command(cmd({"type": "refresh", "id": "f", "data": {"token": "abc"}})) == Refresh(
        "f", "abc"
    )


@pytest.mark.parametrize(
    "data", [{}, {"token": ""}, {"token": None}, {"token": 5}, {"token": ["a"]}]
)
def test_decode_refresh_without_token(data: dict[str, Any]) -> None:
    """A refresh without a non-empty token string is a BadCommand carrying the id."""
    error = bad(cmd({"type": "refresh", "id": "f", "data": data}))
    assert error.command_id == "f"
    assert "token" in error.message


def test_decode_ignores_unknown_fields() -> None:
    """Unknown extra fields, at the top level and inside data, are ignored."""
    assert decode_command(
        cmd({"type": "ping", "id": "1", "channel": "x", "v": 2, "data": {"foo": [1]}})
    ) == Ping("1")
    command = decode_command(
        cmd(
            {
                "type": "subscribe",
                "timestamp": "now",
                "data": {"channel": "news:x", "extra": {"a": 1}},
            }
        )
    )
    assert command == Subscribe(None, "news:x", None)


# -- encode_message and timestamps --------------------------------------------------------


def test_encode_pong_without_id_has_no_id_key() -> None:
    """A message without id, channel or offset has no such keys (never null)."""
    raw = encode_message("pong", {}, timestamp=0.0)
    assert b'"id"' not in raw
    assert b"null" not in raw
    assert json.loads(raw) == {"type": "pong", "timestamp": "1970-01-01T00:00:00.000Z", "data": {}}


def test_encode_pong_with_id() -> None:
    """An id given to encode_message is echoed."""
    message = json.loads(encode_message("pong", {}, id="p1", timestamp=1.5))
    assert message == {
        "type": "pong",
        "id": "p1",
        "timestamp": "1970-01-01T00:00:01.500Z",
        "data": {},
    }


def test_encode_event_fields() -> None:
    """An event carries channel, offset (even 0), id, timestamp and data."""
    raw = encode_message(
        "chat_message",
        {"content": "hi"},
        id="evt_1",
        channel="conversation:c-1",
        offset=0,
        timestamp=1_795_000_000.25,
    )
    message = json.loads(raw)
    assert message == {
        "type": "chat_message",
        "channel": "conversation:c-1",
        "offset": 0,
        "id": "evt_1",
        "timestamp": format_timestamp(1_795_000_000.25),
        "data": {"content": "hi"},
    }
    assert b" " not in raw.replace(b'"content":"hi"', b"")


def test_encode_stamps_the_wall_clock_it_is_given() -> None:
    """The encoder reads no clock: the message carries the caller's wall clock, well
    formed (the session's replies are stamped by the gateway's ``wall_clock``)."""
    wall = datetime(2027, 1, 15, 8, 0, 0, 250_000, tzinfo=UTC).timestamp()
    message = json.loads(encode_message("pong", {}, timestamp=wall))
    assert TIMESTAMP.fullmatch(message["timestamp"])
    assert message["timestamp"] == "2027-01-15T08:00:00.250Z"
    timestamp = inspect.signature(encode_message).parameters["timestamp"]
    assert timestamp.default is inspect.Parameter.empty  # required: no hidden time.time()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (0.999, "1970-01-01T00:00:00.999Z"),
        (1_795_000_000.123, "2026-11-18T11:06:40.123Z"),
        (951_782_400.5, "2000-02-29T00:00:00.500Z"),
    ],
)
def test_format_timestamp_examples(value: float, expected: str) -> None:
    """Timestamps are RFC 3339 UTC with exactly three fractional digits and a Z."""
    assert format_timestamp(value) == expected


@given(st.floats(min_value=0, max_value=253_402_300_799.0, allow_nan=False, allow_infinity=False))
def test_format_timestamp_property(value: float) -> None:
    """Any finite time formats as YYYY-MM-DDTHH:MM:SS.mmmZ and parses back to its millisecond."""
    text = format_timestamp(value)
    assert TIMESTAMP.fullmatch(text), text
    parsed = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    millis = (parsed - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    exact = math.floor(Fraction(value) * 1000)
    # Float multiplication may round a value a hair under a millisecond boundary up to it.
    assert exact <= millis <= exact + 1


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_format_timestamp_rejects_non_finite(value: float) -> None:
    """NaN and infinities are refused."""
    with pytest.raises(ValueError):
        format_timestamp(value)


def test_format_expiry() -> None:
    """Expiry times are RFC 3339 UTC to the second, fractional seconds dropped."""
    assert format_expiry(1_795_000_000.999) == "2026-11-18T11:06:40Z"
    assert format_expiry(0) == "1970-01-01T00:00:00Z"


# -- frames -------------------------------------------------------------------------------


def parse_frame(frame: bytes) -> tuple[bool, int, bytes]:
    """Parse one unmasked server frame into (fin, opcode, payload), checking the length."""
    first, second = frame[0], frame[1]
    assert first & 0x70 == 0, "RSV bits must be clear"
    assert second & 0x80 == 0, "server frames are not masked"
    length, offset = second & 0x7F, 2
    if length == 126:
        (length,) = struct.unpack("!H", frame[2:4])
        offset = 4
        assert length >= 126, "minimal length encoding"
    elif length == 127:
        (length,) = struct.unpack("!Q", frame[2:10])
        offset = 10
        assert length >= 65536, "minimal length encoding"
    payload = frame[offset:]
    assert len(payload) == length
    return bool(first & 0x80), first & 0x0F, payload


@pytest.mark.parametrize(
    ("length", "header_size"),
    [(0, 2), (1, 2), (125, 2), (126, 4), (127, 4), (65535, 4), (65536, 10), (70000, 10)],
)
def test_text_frame_lengths(length: int, header_size: int) -> None:
    """Text frames use the minimal length encoding and parse back to their payload."""
    payload = bytes(i % 251 for i in range(length))
    frame = text_frame(payload)
    assert len(frame) == header_size + length
    assert parse_frame(frame) == (True, 0x1, payload)


def test_ping_frame() -> None:
    """The ping frame is a final, empty, unmasked ping."""
    assert ping_frame() == b"\x89\x00"
    assert parse_frame(ping_frame()) == (True, 0x9, b"")


def test_close_frame_code_and_reason() -> None:
    """A close frame carries the code in network order followed by the reason."""
    fin, opcode, payload = parse_frame(close_frame(4401, "unauthorized"))
    assert (fin, opcode) == (True, 0x8)
    assert struct.unpack("!H", payload[:2]) == (4401,)
    assert payload[2:] == b"unauthorized"
    assert parse_frame(close_frame(1000))[2] == b"\x03\xe8"


def test_close_frame_truncates_reason() -> None:
    """A long reason is cut so the close payload fits the 125-byte control-frame limit."""
    _, _, payload = parse_frame(close_frame(4429, "r" * 500))
    assert len(payload) == 125
    assert payload[2:] == b"r" * 123


def test_close_frame_truncation_keeps_utf8_valid() -> None:
    """Cutting a multi-byte reason never leaves a partial UTF-8 character (RFC 6455 8.1)."""
    _, _, payload = parse_frame(close_frame(1011, "\u00e9" * 100))
    assert len(payload) <= 125
    reason = payload[2:].decode("utf-8")  # must not raise
    assert reason == "\u00e9" * 61


# -- codes --------------------------------------------------------------------------------

ADVICE = {
    1000: ReconnectAdvice.STOP,
    1001: ReconnectAdvice.RECONNECT,
    1009: ReconnectAdvice.RECONNECT,
    1011: ReconnectAdvice.RECONNECT,
    1013: ReconnectAdvice.RECONNECT,
    4401: ReconnectAdvice.NEW_TOKEN,
    4403: ReconnectAdvice.STOP,
    4408: ReconnectAdvice.RECONNECT,
    4429: ReconnectAdvice.RECONNECT_SLOWLY,
}


def test_close_codes_are_those_of_section_7() -> None:
    """CloseCode holds exactly the codes of protocol section 7."""
    assert {int(code) for code in CloseCode} == set(ADVICE)


@pytest.mark.parametrize(("code", "advice"), sorted(ADVICE.items()))
def test_close_code_advice(code: int, advice: ReconnectAdvice) -> None:
    """Each close code maps to the client behaviour protocol section 7 asks for."""
    assert CloseCode(code).advice is advice
    assert CloseCode.advice_for(code) is advice


@pytest.mark.parametrize("code", [None, 1002, 1005, 1006, 3000, 4000, 4999, 0, -1])
def test_unknown_close_codes_reconnect(code: int | None) -> None:
    """Unknown, abnormal and missing close codes advise reconnecting."""
    assert CloseCode.advice_for(code) is ReconnectAdvice.RECONNECT


def test_error_codes_are_those_of_section_6() -> None:
    """The frame codes of ErrorCode are exactly the wire error codes of protocol section
    6; the others are the server API's (docs/server-api.md), broker_unavailable among
    them."""
    assert {code.value for code in ErrorCode if code.in_frames} == {
        "invalid_request",
        "unauthorized",
        "subscription_failed",
        "rate_limited",
        "internal_error",
    }
    assert {code.value for code in ErrorCode if not code.in_frames} == {
        "broker_unavailable",
        "forbidden",
        "not_found",
        "method_not_allowed",
        "payload_too_large",
        "unavailable",
    }
    assert str(ErrorCode.RATE_LIMITED) == "rate_limited"


def _error_classes() -> list[type[errors.TidingsError]]:
    """Every concrete TidingsError class of tidings.errors."""
    return [
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, errors.TidingsError)
    ]


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda cls: cls.__name__)
def test_every_error_carries_its_codes_and_status(cls: type[errors.TidingsError]) -> None:
    """Each error class has a typed API code, a frame code of section 6 and a status
    matching its blame (4xx for the peer's fault, 5xx for ours)."""
    assert isinstance(cls.code, ErrorCode)
    assert isinstance(cls.wire_code, ErrorCode) and cls.wire_code.in_frames
    if issubclass(cls, errors.PeerError):
        assert 400 <= cls.http_status < 500
    else:
        assert 500 <= cls.http_status < 600


def test_a_broker_outage_is_subscription_failed_on_the_wire() -> None:
    """BrokerUnavailable answers 503 broker_unavailable over HTTP and
    subscription_failed in an error frame, as the docs promise."""
    exc = errors.BrokerUnavailable("down")
    assert (exc.code, exc.wire_code, exc.http_status) == (
        "broker_unavailable",
        "subscription_failed",
        503,
    )


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "invalid_request"),
        (401, "unauthorized"),
        (403, "forbidden"),
        (404, "not_found"),
        (405, "method_not_allowed"),
        (413, "payload_too_large"),
        (426, "invalid_request"),
        (429, "rate_limited"),
        (500, "internal_error"),
        (503, "unavailable"),
    ],
)
def test_http_errors_get_the_code_of_their_error_class(status: int, code: str) -> None:
    """An HTTP error aiohttp raises gets the API code of the error class of its status."""
    assert errors.http_error_code(status) == code
