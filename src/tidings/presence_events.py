"""The node side of presence events: which users this node holds in which channels.

The gateway reports every subscription that starts or ends in a channel whose namespace
has ``presence_events = true`` (``opened``/``closed``, synchronous). This node's count of
connections per (channel, user) is the truth; what the broker was last told (registered
or not) follows it through one supervised loop (``run``), so that:

* only the first local connection of a user registers them with the broker
  (``presence_arrive``) and only the last one's end unregisters them
  (``presence_depart``), where the broker debounces the leave by the namespace's
  ``presence_ttl`` and makes the cluster-wide join/leave;
* a user who drops and comes back on this node before the loop runs costs nothing;
* the pending work is a set of (channel, user) pairs, at most one per pair this node
  holds or held: bounded by connections times subscriptions, never a queue of calls;
* a broker call that fails is retried with backoff (the pair stays pending).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from tidings.brokers.base import Broker
from tidings.config import NamespaceSettings
from tidings.errors import TidingsError
from tidings.outages import OutageLog
from tidings.protocol import parse_channel

__all__ = ["PresenceEvents"]

logger = logging.getLogger(__name__)

_Key = tuple[str, str]


class PresenceEvents:
    """See the module docstring. ``retry_delays``: (first, largest) pause after a
    failed broker call."""

    def __init__(
        self,
        broker: Broker,
        namespaces: Mapping[str, NamespaceSettings],
        *,
        outages: OutageLog,
        retry_delays: tuple[float, float] = (0.1, 5.0),
    ) -> None:
        self._broker = broker
        self._namespaces = dict(namespaces)
        self._outages = outages
        self._retry_delays = retry_delays
        self._held: dict[_Key, int] = {}
        self._registered: set[_Key] = set()
        self._dirty: dict[_Key, None] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def ttl(self, channel: str) -> float | None:
        """The presence ttl of ``channel``'s namespace, or None without presence events."""
        try:
            namespace, _ = parse_channel(channel)
        except TidingsError:
            return None
        if namespace == "user":
            return None  # the personal channel has one user: nothing to announce
        settings = self._namespaces.get(namespace) or self._namespaces.get("default")
        if settings is None or not settings.presence_events:
            return None
        return settings.presence_ttl

    def opened(self, channel: str, user_id: str) -> None:
        """A connection of ``user_id`` is now subscribed to ``channel``."""
        if self.ttl(channel) is None:
            return
        key = (channel, user_id)
        self._held[key] = self._held.get(key, 0) + 1
        self._mark(key)

    def closed(self, channel: str, user_id: str) -> None:
        """A connection of ``user_id`` subscribed to ``channel`` is no longer."""
        key = (channel, user_id)
        count = self._held.get(key)
        if count is None:
            return
        if count > 1:
            self._held[key] = count - 1
            return
        del self._held[key]
        self._mark(key)

    def _mark(self, key: _Key) -> None:
        self._dirty[key] = None
        self._idle.clear()
        self._wake.set()

    async def settled(self) -> None:
        """Wait until the broker has been told everything so far (tests, shutdown)."""
        await self._idle.wait()

    async def run(self) -> None:
        """Tell the broker what changed, forever (a supervised loop)."""
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._dirty:
                key = next(iter(self._dirty))
                try:
                    await self._apply(key)
                except TidingsError as exc:
                    # Expected during a broker outage: one rate-limited line, then retry.
                    self._outages.warn("presence update failed; retrying", exc.message)
                    failures += 1
                    low, high = self._retry_delays
                    await asyncio.sleep(min(high, low * 2 ** min(failures - 1, 16)))
                    continue
                failures = 0
                # A change that came in during the call marked the key again: keep it.
                if key in self._dirty and self._wanted(key) == (key in self._registered):
                    del self._dirty[key]
            self._idle.set()

    def _wanted(self, key: _Key) -> bool:
        return key in self._held

    async def _apply(self, key: _Key) -> None:
        channel, user_id = key
        ttl = self.ttl(channel)
        if ttl is None:
            return
        if self._wanted(key) and key not in self._registered:
            await self._broker.presence_arrive(channel, user_id, ttl)
            self._registered.add(key)
        elif not self._wanted(key) and key in self._registered:
            await self._broker.presence_depart(channel, user_id, ttl)
            self._registered.discard(key)
