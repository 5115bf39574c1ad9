"""The embedded in-memory broker: one node, history in process memory.

History is lost when the process stops; every stream then starts again under a new
epoch, so a client that recovers after a restart learns ``recovered: false``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tidings.brokers.base import (
    BrokerHandler,
    HistoryPage,
    PublishRequest,
    PublishResult,
    StoredEvent,
    StreamPosition,
)
from tidings.brokers.presence_table import PresenceChange, PresenceTable, presence_payload
from tidings.events import new_event_id
from tidings.protocol.wire import encode_message
from tidings.supervisor import Supervisor

__all__ = ["MemoryBroker"]

logger = logging.getLogger(__name__)

#: Idempotency records kept at most; the oldest are dropped first.
MAX_IDEMPOTENCY_KEYS = 100_000
#: Bounds of the history sweep's period (a quarter of the history TTL): often enough that
#: expired events do not linger long past their TTL, rarely enough that a tiny TTL (tests)
#: does not make the sweep a busy loop, and at least every 30 s for a long one.
SWEEP_MIN_INTERVAL = 0.5
SWEEP_MAX_INTERVAL = 30.0


@dataclass(slots=True)
class _Stream:
    epoch: str
    offset: int = 0
    #: Created with the first event: many streams (personal channels) never get one.
    events: deque[StoredEvent] | None = None
    touched: float = 0.0


class MemoryBroker:
    """``Broker`` for a single node; see ``tidings.brokers.base.Broker`` for guarantees.

    Delivery is synchronous: ``on_event`` runs inside ``publish`` before it returns, in
    offset order, with the request's ``trace`` when it has one. A stream is forgotten
    (its epoch with it) after ``history_ttl`` seconds without a publish, unless this node
    still has subscribers to it.
    """

    def __init__(
        self,
        *,
        history_size: int = 100,
        history_ttl: float = 300.0,
        idempotency_window: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sweep_interval: float | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self._history_size = history_size
        self._history_ttl = history_ttl
        self._idempotency_window = idempotency_window
        self._clock = clock
        self._wall_clock = wall_clock
        self._streams: dict[str, _Stream] = {}
        self._subscribed: set[str] = set()
        self._idempotency: OrderedDict[tuple[str, str], tuple[float, PublishResult]] = OrderedDict()
        self._handler: BrokerHandler | None = None
        # Epochs must differ between processes and streams, not be secret: seeded once
        # from the OS, then cheap (a stream is created on every new personal channel).
        self._epochs = random.Random(secrets.randbits(64))  # noqa: S311
        # A quarter of the ttl keeps expiry within 25 % of it, within bounds that keep
        # the sweep cheap (idle nodes) and timely (short ttls in development).
        if sweep_interval is None:
            sweep_interval = min(SWEEP_MAX_INTERVAL, max(SWEEP_MIN_INTERVAL, history_ttl / 4))
        self._sweep_interval = sweep_interval
        # Owns the sweep: a failed expire() is logged and the sweep restarted, so history
        # and idempotency records keep being bounded by time.
        self._supervisor = supervisor or Supervisor()
        self._presence = PresenceTable(f"{secrets.randbits(64):016x}")
        #: The one timer for the earliest pending leave (a handle, not a task).
        self._leave_timer: asyncio.TimerHandle | None = None

    async def start(self, handler: BrokerHandler) -> None:
        self._handler = handler
        self._supervisor.spawn("memory-broker-sweep", self._sweep_forever)

    async def close(self) -> None:
        await self._supervisor.close()
        if self._leave_timer is not None:
            self._leave_timer.cancel()
            self._leave_timer = None
        self._handler = None

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval)
            self.expire()

    def expire(self) -> None:
        """Forget idle streams and stale idempotency records (called periodically)."""
        now = self._clock()
        idle = [
            name
            for name, stream in self._streams.items()
            if now - stream.touched >= self._history_ttl and name not in self._subscribed
        ]
        for name in idle:
            del self._streams[name]
        while self._idempotency:
            _, (expires, _) = next(iter(self._idempotency.items()))
            if expires > now:
                break
            self._idempotency.popitem(last=False)

    def _stream(self, channel: str) -> _Stream:
        stream = self._streams.get(channel)
        if stream is None:
            stream = _Stream(epoch=f"{self._epochs.getrandbits(32):08x}", touched=self._clock())
            self._streams[channel] = stream
        return stream

    async def publish(self, requests: Sequence[PublishRequest]) -> list[PublishResult]:
        return [self._publish_one(request) for request in requests]

    def _publish_one(self, request: PublishRequest) -> PublishResult:
        now = self._clock()
        key = (request.idempotency_key, request.channel) if request.idempotency_key else None
        if key is not None:
            record = self._idempotency.get(key)
            if record is not None and record[0] > now:
                return record[1]._replace(duplicate=True)
        stream = self._stream(request.channel)
        stream.offset += 1
        stream.touched = now
        wall = self._wall_clock()
        event_id = new_event_id(wall)
        payload = encode_message(
            request.type,
            dict(request.data),
            id=event_id,
            channel=request.channel,
            offset=stream.offset,
            timestamp=wall,
        )
        if self._history_size:
            if stream.events is None:
                stream.events = deque()
            stream.events.append(StoredEvent(stream.offset, payload))
            if len(stream.events) > self._history_size:
                stream.events.popleft()
        result = PublishResult(request.channel, stream.offset, event_id, stream.epoch)
        if key is not None:
            self._idempotency[key] = (now + self._idempotency_window, result)
            self._idempotency.move_to_end(key)
            if len(self._idempotency) > MAX_IDEMPOTENCY_KEYS:
                self._idempotency.popitem(last=False)
        if self._handler is not None and request.channel in self._subscribed:
            try:
                if request.trace is None:
                    self._handler.on_event(request.channel, stream.offset, stream.epoch, payload)
                else:
                    self._handler.on_event(
                        request.channel, stream.offset, stream.epoch, payload, trace=request.trace
                    )
            except Exception:
                # The event is committed: the publish is acknowledged and the rest of the
                # batch delivered (BrokerHandler's failing-handler contract).
                logger.exception("on_event failed for a channel")
        return result

    async def subscribe(self, channel: str) -> None:
        self._subscribed.add(channel)
        self._stream(channel).touched = self._clock()

    async def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)
        stream = self._streams.get(channel)
        if stream is not None:
            stream.touched = self._clock()

    async def position(self, channel: str) -> StreamPosition:
        stream = self._stream(channel)
        return StreamPosition(stream.offset, stream.epoch)

    async def history(self, channel: str, since: int, limit: int) -> HistoryPage:
        stream = self._stream(channel)
        position = StreamPosition(stream.offset, stream.epoch)
        events = stream.events or deque()
        oldest = events[0].offset if events else stream.offset + 1
        complete = since + 1 >= oldest and since <= stream.offset
        start = max(0, since + 1 - oldest)
        selected = [events[i] for i in range(start, min(len(events), start + max(0, limit)))]
        return HistoryPage(position, selected, complete)

    async def channels(self, prefix: str) -> dict[str, int]:
        local = self._handler.local_channels() if self._handler is not None else {}
        return {name: count for name, count in local.items() if name.startswith(prefix)}

    async def presence(self, channel: str) -> dict[str, int]:
        return dict(self._handler.local_presence(channel)) if self._handler is not None else {}

    async def disconnect_user(self, user_id: str, reason: str) -> None:
        if self._handler is not None:
            try:
                self._handler.on_disconnect_user(user_id, reason)
            except Exception:
                # BrokerHandler's failing-handler contract: logged, the rest go on.
                logger.exception("on_disconnect_user failed")

    async def presence_arrive(self, channel: str, user_id: str, ttl: float) -> None:
        self._emit(self._presence.arrive(channel, user_id))

    async def presence_depart(self, channel: str, user_id: str, ttl: float) -> None:
        self._presence.depart(channel, user_id, self._clock() + ttl)
        self._arm_leaves()

    def expire_presence(self) -> None:
        """Report the pending leaves that are due (the timer calls it)."""
        self._leave_timer = None
        self._emit(self._presence.expire(self._clock()))
        self._arm_leaves()

    def _arm_leaves(self) -> None:
        deadline = self._presence.next_deadline()
        if self._leave_timer is not None:
            self._leave_timer.cancel()
            self._leave_timer = None
        if deadline is not None and self._handler is not None:
            # `clock` may be injected: the delay, not the deadline, goes to the loop.
            delay = max(0.0, deadline - self._clock())
            self._leave_timer = asyncio.get_running_loop().call_later(delay, self.expire_presence)

    def _emit(self, changes: list[PresenceChange]) -> None:
        handler = self._handler
        if handler is None:
            return
        for change in changes:
            # Each call guarded on its own (BrokerHandler's failing-handler contract).
            try:
                if change.channel in self._subscribed:
                    handler.on_presence(
                        change.channel, presence_payload(change, self._wall_clock())
                    )
            except Exception:
                logger.exception("on_presence failed for a channel")
            try:
                handler.on_presence_change(change)
            except Exception:
                logger.exception("on_presence_change failed for a channel")

    async def ready(self) -> bool:
        return True
