"""A subscription as the application sees it: a bounded, ordered stream of items.

Items are ``Event`` objects and ``Gap`` markers (see ``tidings.client.models``). Read them
with ``async for item in subscription`` or register callbacks (``on_event`` and the
mandatory ``on_gap``), never both. A successful recovery is not an item: it is kept as
``last_recovery`` and told to ``on_recovered``.

Overflow: the queue holds at most ``maxsize`` items. When it is full, newly arriving
events are dropped and the subscription remembers the range; as soon as the application
reads again it gets one ``Gap(reason="overflow")`` covering the dropped offsets, then the
events that arrived after room was made. Nothing is silently lost and memory stays bounded.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from tidings.client.effects import ChannelState
from tidings.client.errors import SubscriptionError
from tidings.client.models import Event, Gap, Item, Presence, Recovery

__all__ = [
    "ErrorCallback",
    "EventCallback",
    "GapCallback",
    "PresenceCallback",
    "RecoveryCallback",
    "Subscription",
    "Unsubscriber",
]

logger = logging.getLogger("tidings.client")

_T = TypeVar("_T")

EventCallback = Callable[[Event], Awaitable[None] | None]
GapCallback = Callable[[Gap], Awaitable[None] | None]
ErrorCallback = Callable[[BaseException], Awaitable[None] | None]
#: Called in the client's own task when the server's answer arrives, before the replayed
#: events are delivered: a plain function that must not block.
RecoveryCallback = Callable[[Recovery], None]
#: Called in the client's own task for each ``join``/``leave``: a plain function that
#: must not block.
PresenceCallback = Callable[[Presence], None]


class Unsubscriber(Protocol):
    """What a subscription needs of its client (``tidings.client.connection.Client``).

    Declared here so that this module does not import the client's (which imports this
    one): the subscription only ever asks to be unsubscribed.
    """

    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving ``channel``; its subscription ends after the queued items."""
        ...


class Subscription:
    """One channel's stream of events and gaps; created by ``Client.subscribe``."""

    def __init__(
        self,
        client: Unsubscriber,
        channel: str,
        *,
        maxsize: int,
        channel_state: ChannelState | None = None,
    ) -> None:
        if maxsize < 1:
            raise ValueError("queue size must be at least 1")
        self.channel = channel
        #: The client session's bookkeeping of this channel (offsets, commands in flight).
        self.channel_state = ChannelState(channel) if channel_state is None else channel_state
        self.tracker = self.channel_state.tracker
        self._client = client
        self._maxsize = maxsize
        self._items: deque[Item] = deque()
        self._overflow: Gap | None = None
        self._last_queued = 0
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._error: BaseException | None = None
        self._confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._dispatcher: asyncio.Task[None] | None = None
        #: The latest successful recovery of this subscription, None before the first.
        self.last_recovery: Recovery | None = None
        #: Told of each successful recovery (``Client.subscribe(on_recovered=...)``).
        self.on_recovered: RecoveryCallback | None = None
        #: Told of each join and leave (``Client.subscribe(on_presence=...)``).
        self.on_presence: PresenceCallback | None = None

    # -- application side ------------------------------------------------------------

    @property
    def offset(self) -> int:
        """The last offset received for this channel (in ``epoch``)."""
        return self.tracker.offset

    @property
    def epoch(self) -> str | None:
        return self.tracker.epoch

    @property
    def active(self) -> bool:
        """Subscribed on the current connection and not recovering."""
        return not self._ended and not self.tracker.awaiting

    @property
    def closed(self) -> bool:
        return self._ended

    @property
    def automatic(self) -> bool:
        """The server subscribed this channel automatically (the personal channel)."""
        return self.channel_state.automatic

    # Client-owned bookkeeping, kept readable here (see ``ChannelState``).

    @property
    def sent_on(self) -> int:
        return self.channel_state.sent_on

    @property
    def retries(self) -> int:
        return self.channel_state.retries

    @property
    def pending_id(self) -> str | None:
        return self.channel_state.pending_id

    @property
    def fallback_on(self) -> int:
        return self.channel_state.fallback_on

    @property
    def confirmed(self) -> bool:
        """The server confirmed the subscription at least once."""
        return self._confirmed.done() and not self._confirmed.exception()

    def qsize(self) -> int:
        return len(self._items) + (self._overflow is not None)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Item:
        """The next event or gap. Ends (StopAsyncIteration) after ``unsubscribe`` or
        ``close``; raises ``SubscriptionError``/``ConnectionClosed`` when the server ended
        it."""
        while True:
            if self._items:
                return self._items.popleft()
            if self._overflow is not None:
                gap, self._overflow = self._overflow, None
                self._last_queued = gap.offset
                return gap
            if self._ended:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def unsubscribe(self) -> None:
        """Same as ``client.unsubscribe(self.channel)``."""
        await self._client.unsubscribe(self.channel)

    # -- client side -----------------------------------------------------------------

    def push(self, items: list[Item]) -> None:
        """Queue items from the tracker, applying the overflow rule."""
        if self._ended or not items:
            return
        for item in items:
            if isinstance(item, Event):
                self._push_event(item)
            else:
                self._flush_overflow(force=True)
                self._items.append(item)
                self._last_queued = item.offset
        self._wake()

    def _push_event(self, event: Event) -> None:
        self._flush_overflow(force=False)
        if self._overflow is None and len(self._items) < self._maxsize:
            self._items.append(event)
            self._last_queued = event.offset
            return
        if self._overflow is None:
            logger.warning(
                "subscription %s: queue full (%d); dropping events", self.channel, self._maxsize
            )
            self._overflow = Gap(
                self.channel,
                "overflow",
                self._last_queued,
                self.tracker.epoch,
                event.offset,
                self.tracker.epoch,
            )
        else:
            self._overflow = Gap(
                self.channel,
                "overflow",
                self._overflow.last_offset,
                self._overflow.last_epoch,
                event.offset,
                self.tracker.epoch,
            )

    def _flush_overflow(self, *, force: bool) -> None:
        if self._overflow is not None and (force or len(self._items) < self._maxsize):
            self._items.append(self._overflow)
            self._last_queued = self._overflow.offset
            self._overflow = None

    def recovered(self, recovery: Recovery) -> None:
        """The server recovered this subscription (see ``Recovery``)."""
        self.last_recovery = recovery
        if self.on_recovered is not None:
            try:
                self.on_recovered(recovery)
            except Exception:
                logger.exception("a recovery callback failed")

    def presence(self, presence: Presence) -> None:
        """A user joined or left the channel (see ``Presence``)."""
        if self.on_presence is not None:
            try:
                self.on_presence(presence)
            except Exception:
                logger.exception("a presence callback failed")

    def confirm(self) -> None:
        if not self._confirmed.done():
            self._confirmed.set_result(None)

    def finish(self, error: BaseException | None = None) -> None:
        """End the stream after the queued items; ``error`` is raised to the reader."""
        if self._ended:
            return
        self._ended = True
        self._error = error
        if not self._confirmed.done():
            self._confirmed.set_exception(
                error
                or SubscriptionError(
                    self.channel, "closed", "the subscription ended before the server confirmed it"
                )
            )
            self._confirmed.exception()  # retrieved: subscribe() may not be waiting
        self._wake()

    async def wait_confirmed(self) -> None:
        await asyncio.shield(self._confirmed)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- callback form ---------------------------------------------------------------

    def start_callbacks(
        self, on_event: EventCallback, on_gap: GapCallback, on_error: ErrorCallback | None = None
    ) -> None:
        """Deliver items to callbacks from a task of their own (one at a time, in order).

        A callback that raises is logged and the next item is delivered. When the server
        ends the subscription (revoked, client stopped) ``on_error`` gets the exception.
        """
        if self._dispatcher is not None:
            raise RuntimeError(f"{self.channel}: callbacks are already registered")
        self._dispatcher = asyncio.create_task(
            self._dispatch(on_event, on_gap, on_error), name=f"tidings-dispatch:{self.channel}"
        )

    async def _dispatch(
        self, on_event: EventCallback, on_gap: GapCallback, on_error: ErrorCallback | None
    ) -> None:
        try:
            async for item in self:
                if isinstance(item, Event):
                    await _call(on_event, item)
                else:
                    await _call(on_gap, item)
        except Exception as exc:  # the subscription ended with an error
            logger.info("subscription %s ended: %s", self.channel, exc)
            if on_error is not None:
                await _call(on_error, exc)

    async def stop_callbacks(self) -> None:
        task, self._dispatcher = self._dispatcher, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _call(callback: Callable[[_T], Awaitable[None] | None], value: _T) -> None:
    try:
        result = callback(value)
        if inspect.isawaitable(result):
            await result
    except Exception:
        logger.exception("a subscription callback failed")
