"""Which primary owns which hash slot: one primary, a Sentinel service, or a cluster.

One primary is, as far as the broker's code goes, a cluster of one shard that owns every
slot. ``Topology.address(slot)`` names the primary to send a slot's commands to;
``refresh`` reads the topology again (``CLUSTER SLOTS`` from a known node; the Sentinel
service's primary from the sentinels). Refreshes are coalesced: callers that saw the
same ``version`` share one refresh, and a caller whose version is already out of date
returns at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from tidings.brokers.redis.link import Address
from tidings.brokers.redis.scripts import SLOTS
from tidings.brokers.redis.urls import Target

__all__ = ["ClusterTopology", "SentinelTopology", "SingleTopology", "Topology", "make_topology"]

logger = logging.getLogger(__name__)

#: ``opener(address)`` returns a connected redis-py connection (for ``CLUSTER SLOTS``).
Opener = Callable[[Address], Awaitable[Any]]


class Topology:
    """The slot map; subclasses fill it in ``_read``."""

    sharded = False

    def __init__(self, first: Address) -> None:
        self.version = 0
        self._slots: list[Address] = [first] * SLOTS
        self._primaries: list[Address] = [first]
        self._refreshing: asyncio.Task[bool] | None = None

    def address(self, slot: int) -> Address:
        return self._slots[slot]

    def primaries(self) -> list[Address]:
        """Every primary that owns slots."""
        return list(self._primaries)

    def moved(self, slot: int, address: Address) -> None:
        """A MOVED reply named the new owner of ``slot``."""
        if self._slots[slot] != address:
            self._slots[slot] = address
            if address not in self._primaries:
                self._primaries.append(address)
            self.version += 1

    async def refresh(self, seen: int | None = None) -> bool:
        """Read the topology again unless it changed since ``seen``; True when it changed.

        Raises ``RedisError``/``OSError``/``TimeoutError`` when no source answered.
        """
        if seen is not None and seen != self.version:
            return True
        if self._refreshing is None:
            self._refreshing = asyncio.create_task(self._refresh(), name="redis-topology")
            self._refreshing.add_done_callback(self._refreshed)
        return await asyncio.shield(self._refreshing)

    def _refreshed(self, task: asyncio.Task[bool]) -> None:
        self._refreshing = None
        if not task.cancelled():
            task.exception()  # retrieved here; the callers that await it see it

    async def _refresh(self) -> bool:
        slots = await self._read()
        if slots == self._slots:
            return False
        self._slots = slots
        self._primaries = list(dict.fromkeys(slots))
        self.version += 1
        return True

    async def _read(self) -> list[Address]:
        return self._slots

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()


class SingleTopology(Topology):
    """One primary at a fixed address."""


class SentinelTopology(Topology):
    """The primary of a Sentinel service, asked from the sentinels."""

    def __init__(self, target: Target, timeout: float) -> None:
        super().__init__(("", 0))
        kwargs: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "username": target.username,
            "password": target.password,
            "protocol": 2,
        }
        self._sentinel = Sentinel(list(target.hosts), sentinel_kwargs=kwargs)
        self._service = target.service or ""

    async def _read(self) -> list[Address]:
        host, port = await self._sentinel.discover_master(self._service)
        host = host.decode() if isinstance(host, bytes) else str(host)
        return [(host, int(port))] * SLOTS

    async def close(self) -> None:
        await super().close()
        for client in self._sentinel.sentinels:
            await client.aclose()


class ClusterTopology(Topology):
    """A Redis Cluster's slot map, read with ``CLUSTER SLOTS`` from a known node."""

    sharded = True

    def __init__(self, target: Target, opener: Opener) -> None:
        super().__init__(target.hosts[0])
        self._seeds: list[Address] = list(target.hosts)
        self._opener = opener

    async def _read(self) -> list[Address]:
        error: BaseException | None = None
        for address in dict.fromkeys([*self._primaries, *self._seeds]):
            try:
                conn = await self._opener(address)
            except (RedisError, OSError, TimeoutError) as exc:
                error = exc
                continue
            try:
                await conn.send_command("CLUSTER", "SLOTS", check_health=False)
                reply = await conn.read_response()
            except (RedisError, OSError, TimeoutError) as exc:
                error = exc
                continue
            finally:
                await conn.disconnect(nowait=True)
            slots = parse_cluster_slots(reply, address)
            if slots is not None:
                return slots
        raise error if error is not None else OSError("no cluster node answered")


def parse_cluster_slots(reply: Any, asked: Address) -> list[Address] | None:
    """The slot map of a ``CLUSTER SLOTS`` reply, or None for an empty reply (a node
    that knows no slots). A primary announced with an empty host is the node asked.
    """
    if not isinstance(reply, list) or not reply:
        return None
    slots: list[Address | None] = [None] * SLOTS
    for entry in reply:
        start, end, primary = int(entry[0]), int(entry[1]), entry[2]
        host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
        if not host or host == "?":
            host = asked[0] if isinstance(asked, tuple) else host
        address: Address = (host, int(primary[1]))
        for slot in range(max(0, start), min(SLOTS - 1, end) + 1):
            slots[slot] = address
    if any(owner is None for owner in slots):
        # Uncovered slots keep pointing somewhere: their commands get CLUSTERDOWN and are
        # retried, instead of this refresh failing as a whole.
        fallback = next(owner for owner in slots if owner is not None)
        return [owner if owner is not None else fallback for owner in slots]
    return [owner for owner in slots if owner is not None]


def make_topology(target: Target, opener: Opener, timeout: float) -> Topology:
    """The topology of ``target``."""
    if target.mode == "cluster":
        return ClusterTopology(target, opener)
    if target.mode == "sentinel":
        return SentinelTopology(target, timeout)
    address: Address = target.path if target.path is not None else target.hosts[0]
    return SingleTopology(address)
