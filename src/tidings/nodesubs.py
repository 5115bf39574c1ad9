"""One broker subscription per channel per node.

The first local subscriber of a channel makes the node subscribe to it in the broker; the
last one leaving releases it, in the background. A per-channel lock orders the two so a
channel that is left and joined again at once ends up subscribed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from tidings.brokers.base import Broker
from tidings.errors import TidingsError
from tidings.outages import OutageLog
from tidings.supervisor import Supervisor

__all__ = ["NodeSubscriptions"]

logger = logging.getLogger(__name__)


class _KeyedLocks:
    """One FIFO lock per key, forgotten when nobody holds or waits for it.

    Cheaper than an ``asyncio.Lock`` per key behind a context manager: taking a free key
    allocates one empty deque and never suspends (every handshake takes one, for its
    personal channel). A released key is handed to its oldest waiter.
    """

    def __init__(self) -> None:
        # key -> waiters of the holder; present while the key is held.
        self._held: dict[str, deque[asyncio.Future[None]]] = {}

    def try_acquire(self, key: str) -> bool:
        """Take ``key`` if it is free, without waiting."""
        if key in self._held:
            return False
        self._held[key] = deque()
        return True

    async def acquire(self, key: str) -> None:
        if self.try_acquire(key):
            return
        waiters = self._held[key]
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(key)  # handed over, then cancelled: pass it on
            else:
                waiters.remove(waiter)
            raise

    def release(self, key: str) -> None:
        waiters = self._held[key]
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        del self._held[key]

    def __len__(self) -> int:
        return len(self._held)


class NodeSubscriptions:
    """Which channels this node is subscribed to in the broker.

    ``has_local(channel)`` tells whether the channel still has a local subscriber; it is
    checked under the channel's lock, so decisions use the latest state.
    """

    def __init__(
        self, broker: Broker, has_local: Callable[[str], bool], *, outages: OutageLog | None = None
    ) -> None:
        self._broker = broker
        self._has_local = has_local
        self._outages = outages or OutageLog(logger)
        self._channels: set[str] = set()
        self._locks = _KeyedLocks()
        # Holds the releases in flight and logs one that fails.
        self._supervisor = Supervisor()

    async def ensure(self, channel: str) -> None:
        """Subscribe the node to ``channel`` unless it is already; raises broker errors."""
        if channel in self._channels:
            return
        if not self._locks.try_acquire(channel):  # no coroutine in the common case
            await self._locks.acquire(channel)
        try:
            if channel not in self._channels and self._has_local(channel):
                await self._broker.subscribe(channel)
                self._channels.add(channel)
        finally:
            self._locks.release(channel)

    def release_soon(self, channel: str) -> None:
        """Unsubscribe the node from ``channel`` in the background if nobody came back."""
        self._supervisor.start(f"release:{channel}", self._release(channel))

    async def _release(self, channel: str) -> None:
        await self._locks.acquire(channel)
        try:
            if channel in self._channels and not self._has_local(channel):
                self._channels.discard(channel)
                try:
                    await self._broker.unsubscribe(channel)
                except TidingsError as exc:
                    self._outages.warn("broker unsubscribe failed for a channel", exc.message)
        finally:
            self._locks.release(channel)

    async def settle(self) -> None:
        """Wait for the releases in flight (at shutdown, and in tests)."""
        tasks = self._supervisor.tasks
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
