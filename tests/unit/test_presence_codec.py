"""The Redis broker's pure parts besides continuity: presence sums and sync plans
(``brokers/presence.py``) and the pub/sub message formats (``brokers/redis/codec.py``)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tidings.brokers.presence import (
    PresenceSync,
    decode_entry,
    encode_entry,
    live_entries,
    sum_channels,
    sum_presence,
)
from tidings.brokers.redis.codec import (
    ControlMessage,
    EventMessage,
    decode_control,
    decode_event,
    encode_control,
    encode_event,
    split_payload,
)
from tidings.protocol.wire import encode_message

# -- pub/sub payloads ------------------------------------------------------------------


@given(
    offset=st.integers(1, 10**15),
    text=st.text(max_size=20),
    channel=st.sampled_from(["news:a", "chat:room-1", "user:ü-9", "a"]),
)
def test_split_payload_splices_any_offset_into_the_wire_message(
    offset: int, text: str, channel: str
) -> None:
    """Head + offset digits + tail is byte for byte the message encoded with that offset."""
    data: dict[str, Any] = {"message": text, "nested": {"offset": 0, "id": "x"}}
    head, tail = split_payload(
        encode_message("notification", data, id="evt_1", channel=channel, offset=0, timestamp=1.5)
    )
    expected = encode_message(
        "notification", data, id="evt_1", channel=channel, offset=offset, timestamp=1.5
    )
    assert head + str(offset).encode() + tail == expected


def test_split_payload_without_an_offset_is_an_error() -> None:
    """A payload that has no top-level offset 0 cannot be spliced."""
    for payload in (b'{"type":"x"}', encode_message("x", {}, id="e", offset=3, timestamp=0.0)):
        try:
            split_payload(payload)
        except ValueError:
            continue
        raise AssertionError(f"split {payload!r}")


def test_event_message_round_trip_keeps_colons_in_the_payload() -> None:
    """``<epoch>:<offset>:<payload>`` decodes to its parts; the payload may hold colons."""
    message = encode_event("ab12", 42, b'{"a":"b:c"}')
    assert message == b'ab12:42:{"a":"b:c"}'
    assert decode_event(message) == EventMessage("ab12", 42, b'{"a":"b:c"}')
    assert decode_event(b"e:1:") == EventMessage("e", 1, b"")


def test_malformed_event_messages_are_none() -> None:
    """Too few parts, a non-number offset or an epoch that is not UTF-8 is not an event."""
    for data in (b"", b"epoch", b"epoch:1", b"epoch:x:{}", b"epoch::{}", b"\xff:1:{}"):
        assert decode_event(data) is None, data


def test_control_message_round_trip() -> None:
    """A disconnect request names the sending node, the user and the reason."""
    encoded = encode_control("node-1", "user-9", "banned")
    assert decode_control(encoded.encode()) == ControlMessage("node-1", "user-9", "banned")


def test_control_message_fields_are_taken_as_text() -> None:
    """User and reason of other types are turned into text; the node is kept as sent."""
    assert decode_control(b'{"node": 7, "user": 12, "reason": null}') == ControlMessage(
        7, "12", "None"
    )


def test_malformed_control_messages_are_none() -> None:
    """Not JSON, not an object, or a missing field: not a control message."""
    for data in (b"", b"{", b"[1, 2]", b'"text"', b'{"node": "n", "user": "u"}', b"\xff"):
        assert decode_control(data) is None, data


# -- entries and sums ------------------------------------------------------------------


def test_entry_round_trip() -> None:
    """A node's counts are stored as JSON and read back unchanged."""
    counts = {"room:1": 2, "user:ü": 1}
    assert decode_entry(encode_entry(counts)) == counts
    assert decode_entry(encode_entry(counts).encode()) == counts


def test_live_entries_separates_the_dead() -> None:
    """Values of live nodes keep their order; nodes without a value are dead."""
    alive, dead = live_entries(["a", "b", "c", "d"], [b"1", None, b"3", None])
    assert (alive, dead) == ([b"1", b"3"], ["b", "d"])
    assert live_entries([], []) == ([], [])


def test_sum_channels_filters_by_prefix_and_ignores_empty_counts() -> None:
    """Counts add up across nodes for channels under the prefix; zero or negative
    counts of one node are ignored, not subtracted."""
    entries = [
        {"room:1": 2, "news:a": 1},
        {"room:1": 1, "room:2": 0},
        {"room:2": -3},
        {"room:3": 4},
    ]
    assert sum_channels(entries, "room:") == {"room:1": 3, "room:3": 4}
    assert sum_channels(entries, "") == {"room:1": 3, "news:a": 1, "room:3": 4}
    assert sum_channels([], "") == {}


def test_sum_presence_adds_connections_and_drops_users_with_none() -> None:
    """Connections add up per user across nodes; users whose total is not positive go."""
    entries = [{"u1": 2, "u2": 1}, {"u1": 1, "u3": 0}, {"u2": -1}]
    assert sum_presence(entries) == {"u1": 3}
    assert sum_presence([]) == {}


# -- presence sync plans ---------------------------------------------------------------


class _Local:
    """A node's local view, as its handler reports it; counts how often presence is read."""

    def __init__(self, channels: dict[str, int], users: dict[str, dict[str, int]]) -> None:
        self.channels = channels
        self.users = users
        self.reads: list[str] = []

    def presence(self, channel: str) -> dict[str, int]:
        self.reads.append(channel)
        return dict(self.users.get(channel, {}))


def test_first_sync_writes_counts_and_presence() -> None:
    """Nothing written yet: the node entry and every channel's presence are written,
    and channels with no subscribers are left out."""
    local = _Local({"room:1": 2, "room:2": 0}, {"room:1": {"u1": 2}})
    sync = PresenceSync()
    plan = sync.plan(local.channels, local.presence, force_node=False, recheck=False, rewrite=False)
    assert plan.write_node and not plan.empty
    assert plan.counts == {"room:1": 2}
    assert plan.presence == {"room:1": {"u1": 2}}
    sync.written(plan)
    assert (sync.counts, sync.presence) == ({"room:1": 2}, {"room:1": {"u1": 2}})


def test_unchanged_view_plans_nothing_unless_forced() -> None:
    """After a write, the same view needs no write; ``force_node`` rewrites the counts."""
    local = _Local({"room:1": 1}, {"room:1": {"u1": 1}})
    sync = PresenceSync()
    sync.written(
        sync.plan(local.channels, local.presence, force_node=False, recheck=False, rewrite=False)
    )
    local.reads.clear()
    plan = sync.plan(local.channels, local.presence, force_node=False, recheck=False, rewrite=False)
    assert plan.empty and local.reads == []
    forced = sync.plan(
        local.channels, local.presence, force_node=True, recheck=False, rewrite=False
    )
    assert forced.write_node and forced.presence == {} and not forced.empty


def test_changed_count_compares_only_that_channel() -> None:
    """A channel whose count changed has its presence compared and written."""
    local = _Local({"room:1": 1, "room:2": 1}, {"room:1": {"u1": 1}, "room:2": {"u2": 1}})
    sync = PresenceSync()
    sync.written(
        sync.plan(local.channels, local.presence, force_node=False, recheck=False, rewrite=False)
    )
    local.channels["room:2"] = 2
    local.users["room:2"] = {"u2": 1, "u3": 1}
    local.reads.clear()
    plan = sync.plan(local.channels, local.presence, force_node=False, recheck=False, rewrite=False)
    assert local.reads == ["room:2"]
    assert plan.write_node and plan.presence == {"room:2": {"u2": 1, "u3": 1}}


def test_recheck_finds_presence_changes_with_the_same_count() -> None:
    """Users can change while the count stays; ``recheck`` compares every channel and
    writes only what differs."""
    local = _Local({"room:1": 1, "room:2": 1}, {"room:1": {"u1": 1}, "room:2": {"u2": 1}})
    sync = PresenceSync()
    sync.written(
        sync.plan(local.channels, local.presence, force_node=False, recheck=False, rewrite=False)
    )
    local.users["room:1"] = {"u9": 1}
    quiet = sync.plan(
        local.channels, local.presence, force_node=False, recheck=False, rewrite=False
    )
    assert quiet.empty
    plan = sync.plan(local.channels, local.presence, force_node=False, recheck=True, rewrite=False)
    assert not plan.write_node and plan.presence == {"room:1": {"u9": 1}}


def test_rewrite_writes_every_entry_again() -> None:
    """``rewrite`` (Redis may have restarted empty) writes every channel's presence."""
    local = _Local({"room:1": 1, "room:2": 1}, {"room:1": {"u1": 1}, "room:2": {"u2": 1}})
    sync = PresenceSync()
    sync.written(
        sync.plan(local.channels, local.presence, force_node=False, recheck=False, rewrite=False)
    )
    plan = sync.plan(local.channels, local.presence, force_node=False, recheck=False, rewrite=True)
    assert plan.presence == {"room:1": {"u1": 1}, "room:2": {"u2": 1}}
    assert not plan.write_node


def test_channel_without_subscribers_removes_its_entry() -> None:
    """A channel this node no longer serves plans an empty entry (remove it), which is
    then forgotten."""
    local = _Local({"room:1": 1, "room:2": 1}, {"room:1": {"u1": 1}, "room:2": {"u2": 1}})
    sync = PresenceSync()
    sync.written(
        sync.plan(local.channels, local.presence, force_node=False, recheck=False, rewrite=False)
    )
    del local.channels["room:2"]
    plan = sync.plan(local.channels, local.presence, force_node=False, recheck=False, rewrite=False)
    assert plan.write_node and plan.counts == {"room:1": 1}
    assert plan.presence == {"room:2": {}}
    sync.written(plan)
    assert sync.presence == {"room:1": {"u1": 1}}
    assert sync.plan(
        local.channels, local.presence, force_node=False, recheck=True, rewrite=False
    ).empty


def test_unwritten_plan_is_planned_again() -> None:
    """A plan that failed to be written (not ``written``) is still due next time."""
    local = _Local({"room:1": 1}, {"room:1": {"u1": 1}})
    sync = PresenceSync()
    first = sync.plan(
        local.channels, local.presence, force_node=False, recheck=False, rewrite=False
    )
    again = sync.plan(
        local.channels, local.presence, force_node=False, recheck=False, rewrite=False
    )
    assert again == first and not again.empty
