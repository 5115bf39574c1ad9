"""Cluster-wide channel counts and presence: entries, sums and what to write. Pure.

Every node keeps, in Redis, one entry with its channel counts (``{channel: subscribers}``)
and, in each channel's presence hash, one entry with its users there (``{user:
connections}``), both JSON. Readers add their own node's live view to the entries of the
other nodes that are still alive (``live_entries``, ``sum_channels``, ``sum_presence``).
``PresenceSync`` remembers what this node last wrote and works out what the next write
must change; ``tidings.brokers.redis.views`` does the reading and writing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PresenceSync",
    "SyncPlan",
    "decode_entry",
    "encode_entry",
    "live_entries",
    "sum_channels",
    "sum_presence",
]


def encode_entry(counts: Mapping[str, int]) -> str:
    """One node's channel counts or one node's users in a channel, as stored."""
    return json.dumps(counts)


def decode_entry(value: bytes | str) -> Any:
    """A stored entry (raises ``ValueError`` when it is not JSON)."""
    return json.loads(value)


def live_entries(nodes: Sequence[str], values: Sequence[Any]) -> tuple[list[Any], list[str]]:
    """Split the entries read for ``nodes`` (None: the node is gone) into the values of
    live nodes, in order, and the names of dead nodes, whose leftovers can be removed."""
    alive = [value for value in values if value is not None]
    dead = [node for node, value in zip(nodes, values, strict=True) if value is None]
    return alive, dead


def sum_channels(entries: Iterable[Mapping[str, int]], prefix: str) -> dict[str, int]:
    """Subscribers per channel whose name starts with ``prefix``, over node entries
    (entries with no subscribers are ignored)."""
    totals: dict[str, int] = {}
    for counts in entries:
        for name, count in counts.items():
            if name.startswith(prefix) and count > 0:
                totals[name] = totals.get(name, 0) + int(count)
    return totals


def sum_presence(entries: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Connections per user over node entries; users left with none are omitted."""
    users: dict[str, int] = {}
    for entry in entries:
        for user, count in entry.items():
            users[user] = users.get(user, 0) + int(count)
    return {user: count for user, count in users.items() if count > 0}


@dataclass(frozen=True, slots=True)
class SyncPlan:
    """One write of this node's entries.

    ``counts``: the node's channel counts now; ``write_node``: whether to write them;
    ``presence``: per channel, the node's users to write (empty: remove its entry).
    """

    counts: dict[str, int]
    write_node: bool
    presence: dict[str, dict[str, int]]

    @property
    def empty(self) -> bool:
        """Nothing to write."""
        return not (self.write_node or self.presence)


class PresenceSync:
    """What this node last wrote to Redis, and what the next write must change."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.presence: dict[str, dict[str, int]] = {}

    def plan(
        self,
        local_channels: Mapping[str, int],
        local_presence: Callable[[str], Mapping[str, int]],
        *,
        force_node: bool,
        recheck: bool,
        rewrite: bool,
    ) -> SyncPlan:
        """The write that brings Redis up to date with the node's local view.

        Presence is compared for channels whose count changed, or for every channel with
        ``recheck`` (users may change without the count changing) or ``rewrite``, which
        also writes every entry again (Redis may have restarted empty). ``force_node``
        writes the channel counts even when unchanged (to refresh their expiry).
        """
        counts = {name: count for name, count in local_channels.items() if count > 0}
        check = [
            name
            for name in counts.keys() | self.counts.keys()
            if recheck or rewrite or counts.get(name) != self.counts.get(name)
        ]
        presence: dict[str, dict[str, int]] = {}
        for name in check:
            users = dict(local_presence(name)) if name in counts else {}
            if rewrite or users != self.presence.get(name, {}):
                presence[name] = users
        write_node = force_node or counts != self.counts
        return SyncPlan(counts, write_node, presence)

    def written(self, plan: SyncPlan) -> None:
        """``plan`` was written: remember it as the state in Redis."""
        self.counts = plan.counts
        for name, users in plan.presence.items():
            if users:
                self.presence[name] = users
            else:
                self.presence.pop(name, None)
