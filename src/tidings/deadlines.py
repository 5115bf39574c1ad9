"""Entries that expire a fixed delay after they were added, with one timer for all.

Every handshake starts a short hold on its personal channel; a ``TimerHandle`` each would
cost an allocation, a heap push and a cancel per connection. With one constant delay,
insertion order is expiry order, so one timer for the oldest entry is enough.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["Deadlines"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Deadlines(Generic[K, V]):
    """``key -> value`` entries that call ``on_expire(value)`` ``delay`` seconds after
    ``add``, unless ``pop`` took them first.

    Guarantees: each entry is expired or popped at most once; entries expire in the
    order they were added, never before their delay (loop time). ``on_expire`` runs in a
    loop callback; an exception it raises is reported to the loop's exception handler
    and does not stop the other entries from expiring. ``close`` forgets everything.
    """

    def __init__(self, delay: float, on_expire: Callable[[V], None]) -> None:
        self._delay = delay
        self._on_expire = on_expire
        self._entries: dict[K, tuple[float, V]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, key: K, value: V) -> None:
        """Start ``key``'s delay (a key already present is restarted at the end)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._delay
        self._entries.pop(key, None)
        self._entries[key] = (deadline, value)
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._fire)

    def pop(self, key: K) -> V | None:
        """Take ``key`` out before it expires: its value, or None if it is not here."""
        entry = self._entries.pop(key, None)
        return entry[1] if entry is not None else None

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._entries.clear()

    def _fire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        entries = self._entries
        try:
            while entries:
                key = next(iter(entries))
                deadline, value = entries[key]
                if deadline > now:
                    break
                del entries[key]
                self._on_expire(value)
        finally:
            if entries and self._timer is None:
                deadline = next(iter(entries.values()))[0]
                self._timer = loop.call_at(deadline, self._fire)
