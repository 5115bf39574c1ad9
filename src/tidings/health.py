"""The broker's health as this node sees it: one check (``/readyz``, a scrape of
``/metrics`` and ``tidings_broker_up`` use it) and the supervised loop that repeats it
and copies a worker's periodic metrics."""

from __future__ import annotations

import asyncio
import logging

from tidings.brokers.base import Broker
from tidings.errors import TidingsError
from tidings.metrics import Metrics

__all__ = ["HEALTH_INTERVAL", "BrokerHealth"]

# The gateway's logger, as before this class moved out of gateway.py: operators filter on it.
logger = logging.getLogger("tidings.gateway")

#: Seconds between two checks of the broker for ``tidings_broker_up`` (a scrape also
#: checks), which is also how often a worker copies its periodic metrics.
HEALTH_INTERVAL = 5.0


class BrokerHealth:
    """See the module docstring; ``timeout`` is ``broker.timeout`` (seconds)."""

    def __init__(self, broker: Broker, metrics: Metrics, timeout: float) -> None:
        self._broker = broker
        self._metrics = metrics
        self._timeout = timeout

    async def check(self) -> bool:
        """Whether the broker answers now (within ``broker.timeout``); sets
        ``tidings_broker_up``."""
        try:
            async with asyncio.timeout(self._timeout + 1):
                up = await self._broker.ready()
        except (TidingsError, TimeoutError):
            up = False
        self._metrics.broker_up.set(1 if up else 0)
        return up

    async def run(self) -> None:
        """Check every ``HEALTH_INTERVAL`` seconds, for ever."""
        while True:
            await asyncio.sleep(HEALTH_INTERVAL)
            try:
                await self.check()
                self._metrics.sync()
            except Exception:
                # A fault of ours: the gauges keep their last values, the checks go on.
                logger.exception("periodic health check failed")
