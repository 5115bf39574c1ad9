"""Unit tests for tidings.events: built-in data schemas, custom types and event ids."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tidings.errors import InvalidRequest
from tidings.events import BUILTIN_TYPES, NOTIFICATION_LEVELS, new_event_id, validate_event
from tidings.protocol import RESERVED_TYPES

NOTE = {"message": "Your export is ready", "level": "info"}
CHAT = {"conversation_id": "conv-123", "sender_id": "user-456", "content": "Hello there!"}
STATUS = {"entity_type": "order", "entity_id": "o-1", "status": "shipped"}
VALID = {"notification": NOTE, "chat_message": CHAT, "status_update": STATUS}


def test_builtin_types_match_the_protocol() -> None:
    """The built-in types and their required fields are those of protocol section 3."""
    assert BUILTIN_TYPES == {
        "notification": ("message", "level"),
        "chat_message": ("conversation_id", "sender_id", "content"),
        "status_update": ("entity_type", "entity_id", "status"),
    }
    assert frozenset({"info", "success", "warning", "error"}) == NOTIFICATION_LEVELS


@pytest.mark.parametrize("kind", sorted(VALID))
def test_valid_builtin_events(kind: str) -> None:
    """Each built-in type with its required fields is accepted and returned as given."""
    data = dict(VALID[kind])
    assert validate_event(kind, data) == (kind, data)


@pytest.mark.parametrize("level", ["info", "success", "warning", "error"])
def test_notification_levels(level: str) -> None:
    """Every documented notification level is accepted."""
    assert validate_event("notification", {"message": "m", "level": level})[1]["level"] == level


@pytest.mark.parametrize("level", ["debug", "INFO", "Info", "", "critical", " info", None, 1])
def test_notification_bad_level(level: object) -> None:
    """Any other level (or a non-string one) is an InvalidRequest."""
    with pytest.raises(InvalidRequest):
        validate_event("notification", {"message": "m", "level": level})


@pytest.mark.parametrize("message", ["", None, 5, ["m"], {"m": 1}])
def test_notification_bad_message(message: object) -> None:
    """The notification message must be a non-empty string."""
    with pytest.raises(InvalidRequest, match="message"):
        validate_event("notification", {"message": message, "level": "info"})


@pytest.mark.parametrize(
    ("kind", "field"),
    [(kind, field) for kind, fields in BUILTIN_TYPES.items() for field in fields],
)
def test_builtin_missing_field(kind: str, field: str) -> None:
    """Leaving out any required field of a built-in type is an InvalidRequest naming it."""
    data = {key: value for key, value in VALID[kind].items() if key != field}
    with pytest.raises(InvalidRequest, match=field):
        validate_event(kind, data)


@pytest.mark.parametrize(
    ("kind", "field"),
    [(kind, field) for kind, fields in BUILTIN_TYPES.items() for field in fields],
)
@pytest.mark.parametrize("value", [None, 42, 1.5, True, ["x"], {"x": 1}])
def test_builtin_non_string_field(kind: str, field: str, value: object) -> None:
    """A required field of a built-in type that is not a string is an InvalidRequest."""
    data = {**VALID[kind], field: value}
    with pytest.raises(InvalidRequest, match=field):
        validate_event(kind, data)


@pytest.mark.parametrize("kind", sorted(VALID))
def test_builtin_extra_fields_pass_through(kind: str) -> None:
    """Fields beyond the required ones are kept untouched."""
    data: dict[str, Any] = {**VALID[kind], "url": "/exports/7", "meta": {"n": [1, None]}}
    _, out = validate_event(kind, data)
    assert out == data
    assert out["meta"] == {"n": [1, None]}


def test_chat_message_allows_empty_content() -> None:
    """Only the notification message must be non-empty; other string fields may be empty."""
    data = {**CHAT, "content": ""}
    assert validate_event("chat_message", data) == ("chat_message", data)


@pytest.mark.parametrize("data", [None, [], "text", 1, ["message", "level"]])
@pytest.mark.parametrize("kind", ["notification", "order_shipped"])
def test_data_must_be_an_object(kind: str, data: object) -> None:
    """Event data that is not an object is an InvalidRequest, for built-in and custom types."""
    with pytest.raises(InvalidRequest, match="data"):
        validate_event(kind, data)


@pytest.mark.parametrize("data", [{}, {"anything": [1, 2]}, {"message": 5}])
def test_custom_type_accepts_any_object(data: dict[str, Any]) -> None:
    """A custom type has no schema: any object is accepted."""
    assert validate_event("order_shipped", data) == ("order_shipped", data)


@pytest.mark.parametrize("kind", ["Order", "1x", "a" * 65, "order-shipped", "", None, 3])
def test_bad_type_names(kind: object) -> None:
    """Types outside the event type grammar are an InvalidRequest."""
    with pytest.raises(InvalidRequest):
        validate_event(kind, {})


@pytest.mark.parametrize("kind", sorted(RESERVED_TYPES))
def test_reserved_types_rejected(kind: str) -> None:
    """No reserved protocol name is usable as an event type, even when allowed in config."""
    with pytest.raises(InvalidRequest, match="reserved"):
        validate_event(kind, {})
    with pytest.raises(InvalidRequest, match="reserved"):
        validate_event(kind, {}, allowed_types=(kind,))


def test_allowed_types_restrict() -> None:
    """With allowed_types set, only those types are accepted; others are refused by name."""
    allowed = ("notification", "order_shipped")
    assert validate_event("notification", NOTE, allowed)[0] == "notification"
    assert validate_event("order_shipped", {}, allowed)[0] == "order_shipped"
    with pytest.raises(InvalidRequest, match="chat_message"):
        validate_event("chat_message", CHAT, allowed)
    with pytest.raises(InvalidRequest, match="order_cancelled"):
        validate_event("order_cancelled", {}, frozenset(allowed))


def test_allowed_types_still_validate_schema() -> None:
    """An allowed built-in type still needs its data schema."""
    with pytest.raises(InvalidRequest):
        validate_event("notification", {"message": "m"}, ("notification",))


def test_empty_allowed_types_accept_everything() -> None:
    """An empty allowed_types list means every well-formed, non-reserved type."""
    assert validate_event("anything_goes", {}, ())[0] == "anything_goes"
    assert validate_event("anything_goes", {}, [])[0] == "anything_goes"


def test_new_event_id_format() -> None:
    """Event ids are evt_ + 12 hex digits of milliseconds + 16 random hex digits."""
    event_id = new_event_id(1_795_000_000.123)
    assert re.fullmatch(r"evt_[0-9a-f]{28}", event_id)
    assert event_id[4:16] == f"{1_795_000_000_123:012x}"


def test_new_event_ids_are_unique_and_time_ordered() -> None:
    """Ids are unique for the same instant and sort by time across instants."""
    same = {new_event_id(1000.0) for _ in range(2000)}
    assert len(same) == 2000
    ordered = [new_event_id(1000.0 + step / 1000) for step in range(0, 5000, 7)]
    assert ordered == sorted(ordered)
    assert new_event_id(0.0).startswith("evt_000000000000")
