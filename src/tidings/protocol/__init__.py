"""The Tidings wire protocol: pure, synchronous, shared by the server and the clients."""

from __future__ import annotations

from tidings.protocol.codes import CloseCode, ErrorCode, ReconnectAdvice
from tidings.protocol.names import (
    RESERVED_TYPES,
    is_valid_channel,
    parse_channel,
    personal_channel,
    validate_event_type,
)
from tidings.protocol.wire import (
    MAX_JSON_DEPTH,
    BadCommand,
    Command,
    Ping,
    Recover,
    Refresh,
    Subscribe,
    Unsubscribe,
    decode_command,
    dumps,
    encode_message,
    format_expiry,
    format_timestamp,
    json_too_deep,
    loads,
    text_frame,
)

__all__ = [
    "MAX_JSON_DEPTH",
    "RESERVED_TYPES",
    "BadCommand",
    "CloseCode",
    "Command",
    "ErrorCode",
    "Ping",
    "ReconnectAdvice",
    "Recover",
    "Refresh",
    "Subscribe",
    "Unsubscribe",
    "decode_command",
    "dumps",
    "encode_message",
    "format_expiry",
    "format_timestamp",
    "is_valid_channel",
    "json_too_deep",
    "loads",
    "parse_channel",
    "personal_channel",
    "text_frame",
    "validate_event_type",
]
