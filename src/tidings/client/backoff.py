"""Reconnection delays: exponential backoff with full jitter (pure, injectable)."""

from __future__ import annotations

import random as _random
from collections.abc import Callable

__all__ = ["Backoff"]


class Backoff:
    """Delays between reconnection attempts.

    Attempt ``n`` (0-based) waits ``random() * min(cap, initial * multiplier**n)`` seconds
    ("full jitter"). A "slow" delay (close 4429) adds that to a floor:
    ``slow_floor + random() * ceiling``, so it stays jittered. The attempt counter
    goes back to zero once a connection has stayed up for ``reset_after`` seconds.

    Pure: ``random`` is injected and the caller passes clock readings.
    """

    def __init__(
        self,
        *,
        initial: float = 0.5,
        cap: float = 20.0,
        multiplier: float = 2.0,
        reset_after: float = 10.0,
        slow_floor: float = 5.0,
        random: Callable[[], float] = _random.random,
    ) -> None:
        if initial < 0 or cap < 0 or multiplier < 1 or slow_floor < 0 or reset_after < 0:
            raise ValueError("backoff parameters must be >= 0 (multiplier >= 1)")
        self.initial = initial
        self.cap = cap
        self.multiplier = multiplier
        self.reset_after = reset_after
        self.slow_floor = slow_floor
        self.random = random
        self.attempt = 0
        self._up_since: float | None = None

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        return min(self.cap, self.initial * self.multiplier ** min(self.attempt, 64))

    def next_delay(self, *, slow: bool = False) -> float:
        """The delay before the next attempt; counts the attempt."""
        delay = self.random() * self.ceiling()
        self.attempt += 1
        return self.slow_floor + delay if slow else delay

    def connected(self, now: float) -> None:
        """A connection was established at ``now``."""
        self._up_since = now

    def disconnected(self, now: float) -> None:
        """The connection ended at ``now``; reset if it had stayed up long enough."""
        if self._up_since is not None and now - self._up_since >= self.reset_after:
            self.attempt = 0
        self._up_since = None

    def reset(self) -> None:
        self.attempt = 0
        self._up_since = None
