"""The heartbeat and expiry sweep: every session of the node ticked a few times per
heartbeat interval, what it asks for (pings, closes) carried out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from tidings.hub import Hub
from tidings.ports import Peer
from tidings.protocol import CloseCode
from tidings.session import Effect

__all__ = ["Sweeper", "sweep_period"]

logger = logging.getLogger("tidings.gateway")


def sweep_period(heartbeat_interval: float, heartbeat_timeout: float) -> float:
    """Seconds between sweeps: a quarter of the shorter heartbeat setting, within
    [0.01, 1]."""
    return max(0.01, min(1.0, heartbeat_interval / 4, heartbeat_timeout / 4))


class Sweeper:
    """See the module docstring; ``apply`` carries out a session's effects."""

    def __init__(
        self,
        hub: Hub[Peer],
        apply: Callable[[Peer, list[Effect]], None],
        clock: Callable[[], float],
    ) -> None:
        self._hub = hub
        self._apply = apply
        self._clock = clock

    async def run(self, period: float) -> None:
        """Sweep every ``period`` seconds, for ever.

        This loop must outlive any fault of ours: if it ended, no connection on the node
        would be pinged, timed out or closed at token expiry again. One session whose
        tick (or what it asks for) raises is closed with 1011 and the others go on; a
        fault of the sweep itself is logged and the next sweep runs.
        """
        while True:
            await asyncio.sleep(period)
            try:
                self.sweep(self._clock())
            except Exception:
                logger.exception("connection sweep failed; sweeping again in %ss", period)

    def sweep(self, now: float) -> None:
        """One sweep at ``now``; see ``run``."""
        for peer in self._hub.connections():
            try:
                effects = peer.session.tick(now)
                if effects:
                    self._apply(peer, effects)
            except Exception:
                logger.exception("a connection's heartbeat or expiry check failed; closing it")
                peer.close(CloseCode.INTERNAL_ERROR, "internal error")
