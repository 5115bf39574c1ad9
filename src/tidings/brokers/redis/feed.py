"""One served channel of the Redis fan-out, and its continuity decisions carried out.

``ServedChannel`` is what ``tidings.brokers.redis.fanout`` keeps per channel this node serves:
its pure ``tidings.brokers.continuity`` tracker and the I/O around it. ``Feed`` carries
out what a tracker decides: events and presence messages go to the ``BrokerHandler``
(whose failures are logged, never raised into the pub/sub reader), a loss reaches
``on_continuity_lost``, and a gap is repaired from history by a task of its own, a
bounded number at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from tidings.brokers.base import BrokerHandler, HistoryPage
from tidings.brokers.continuity import Continuity, Deliver, Lost, Output, Status
from tidings.brokers.redis.codec import EventMessage
from tidings.brokers.redis.pubsub import Subscriber
from tidings.errors import BrokerUnavailable
from tidings.outages import OutageLog

__all__ = ["Feed", "ServedChannel", "backoff"]

# The fan-out's logger, as before this moved out of fanout.py: operators filter on it.
logger = logging.getLogger("tidings.brokers.redis.fanout")

#: Repairs running at once after a reconnect.
_REPAIR_CONCURRENCY = 16


def backoff(delay: tuple[float, float], attempt: int) -> float:
    """Seconds to wait before ``attempt`` (1 for the first: no wait), with jitter within
    ``delay`` (low, high)."""
    low, high = delay
    if attempt <= 1:
        return 0.0
    return random.uniform(low, min(high, low * 2 ** min(attempt, 20)))  # noqa: S311


@dataclass(slots=True, eq=False)
class ServedChannel:
    """One subscribed channel: its continuity tracker and the I/O around it.

    ``tracker.status``: ``init`` until the subscription is confirmed and the starting
    position read; ``live``; ``repair`` while ``repair`` (a task) fills a gap from
    history; ``stale`` while it is not subscribed anywhere.
    """

    name: str
    pubsub: bytes
    tracker: Continuity
    subscriber: Subscriber | None = None
    confirmed: asyncio.Future[None] | None = None
    repair: asyncio.Task[None] | None = None
    closed: bool = False

    @property
    def status(self) -> Status:
        return self.tracker.status


class Feed:
    """See the module docstring. ``read_history(channel, since, limit)`` pages history
    for repairs; ``handler`` is set when the broker starts."""

    def __init__(
        self,
        *,
        read_history: Callable[[str, int, int], Awaitable[HistoryPage]],
        spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]],
        reconnect_delay: tuple[float, float],
        history_chunk: int,
    ) -> None:
        self._read_history = read_history
        self._spawn = spawn
        self._reconnect_delay = reconnect_delay
        self._history_chunk = history_chunk
        self.handler: BrokerHandler | None = None
        # Redis restarted empty loses every channel at once: one line, not one per channel.
        self._lost_log = OutageLog(logger, level=logging.INFO)
        self._repair_slots = asyncio.Semaphore(_REPAIR_CONCURRENCY)

    def presence(self, state: ServedChannel, payload: bytes) -> None:
        """A presence message: no offset, outside continuity tracking (protocol:
        ephemeral)."""
        if self.handler is not None:
            try:
                self.handler.on_presence(state.name, payload)
            except Exception:
                logger.exception("on_presence failed for a channel")

    def carry_out(
        self, state: ServedChannel, outputs: list[Output], traced: EventMessage | None = None
    ) -> None:
        """Carry out the tracker's decisions, in order; the delivery of ``traced`` (the
        message just received, when it carries a trace) gets its trace."""
        for output in outputs:
            if isinstance(output, Deliver):
                if (
                    traced is not None
                    and output.offset == traced.offset
                    and output.epoch == traced.epoch
                ):
                    self._deliver(state, output, traced.trace)
                else:
                    self._deliver(state, output)
            elif isinstance(output, Lost):
                self._lost(state)
            elif state.repair is None:
                state.repair = self._spawn(self._repair(state), "redis-repair")

    def _deliver(self, state: ServedChannel, event: Deliver, trace: str | None = None) -> None:
        if self.handler is None:
            return
        try:
            if trace is None:
                self.handler.on_event(state.name, event.offset, event.epoch, event.payload)
            else:
                self.handler.on_event(
                    state.name, event.offset, event.epoch, event.payload, trace=trace
                )
        except Exception:
            logger.exception("on_event failed for a channel")

    def _lost(self, state: ServedChannel) -> None:
        self._lost_log.warn(
            "continuity lost for a channel", "telling its subscribers to resubscribe"
        )
        if self.handler is None:
            return
        try:
            self.handler.on_continuity_lost(state.name)
        except Exception:
            logger.exception("on_continuity_lost failed for a channel")

    async def _repair(self, state: ServedChannel) -> None:
        """Fill the gap after the tracker's ``since`` from history, then resume."""
        attempt = 0
        try:
            async with self._repair_slots:
                while True:
                    try:
                        page = await self._read_history(
                            state.name, state.tracker.since, self._history_chunk
                        )
                    except BrokerUnavailable:
                        attempt += 1
                        await asyncio.sleep(backoff(self._reconnect_delay, attempt + 1))
                        continue
                    if state.closed or state.repair is not asyncio.current_task():
                        return
                    step = state.tracker.repaired(page)
                    self.carry_out(state, step.outputs)
                    if step.done:
                        break
        finally:
            if state.repair is asyncio.current_task():
                state.repair = None
        if not state.closed:
            self.carry_out(state, state.tracker.resume())
