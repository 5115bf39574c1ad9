"""Publishing through Redis: the publishes of one loop tick as one pipeline per shard.

``Publisher.publish`` queues its events; once per loop tick everything queued goes out
together, one ``Router.run_many`` call per primary (its ``Link`` writes them as one
pipeline), so concurrent publishes cost one round trip per shard, not one each. Events
of one channel share a slot and stay in their order; one call's results come back in
its order.

**Acknowledgement by replicas** (``ack_replicas`` = N > 0): the events are appended
without being published, followed in each primary's pipeline by one ``WAIT N``; only
when N replicas have them are they committed (published live and made readable as
history) and acknowledged. So no client ever sees an event that a failover can take
back. When fewer replicas answer within the time limit the publish fails with
``BrokerUnavailable`` and nothing is shown; a retry with the same idempotency key
finds the appended event, waits for the replicas again and commits it. ``None`` (auto)
waits for one replica when the primary has replicas, else for none. The replicas are
counted when the link connects and again at every topology check; once a primary has
been seen with a replica, one is waited for until the node restarts (a replica that
dropped out may still be promoted by a failover: publishes fail rather than being
acknowledged without it). With N = 0 one script appends and publishes at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.exceptions import ResponseError

from tidings.brokers.base import PublishRequest, PublishResult
from tidings.brokers.redis.codec import split_payload
from tidings.brokers.redis.link import Command, unavailable
from tidings.brokers.redis.resp import Packed, bulk
from tidings.brokers.redis.router import Router
from tidings.brokers.redis.scripts import KeyLayout, key_slot
from tidings.errors import BrokerUnavailable
from tidings.events import new_event_id
from tidings.protocol.wire import encode_message

__all__ = ["Publisher", "Scripts"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: A channel's slot, (meta, stream) keys, their RESP bytes with the key count, its
#: pub/sub channel and that channel's RESP bytes.
_Channel = tuple[int, tuple[str, ...], bytes, bytes, bytes]
#: Channels whose keys are kept packed; past this the cache starts again.
_CHANNEL_CACHE = 10_000


@dataclass(frozen=True, slots=True)
class Scripts:
    """The SHA1 digests of the broker's scripts (their texts are in the router)."""

    publish: str
    append: str
    commit: str
    read: str


@dataclass(slots=True, eq=False)
class _Event:
    request: PublishRequest
    slot: int
    command: tuple[Any, ...]
    head: bytes
    tail: bytes
    packed: bytes = b""  # ``command`` as RESP bulk strings
    result: PublishResult | None = None
    error: BaseException | None = None
    duplicate: bool = False


@dataclass(slots=True, eq=False)
class _Publish:
    events: list[_Event]
    future: asyncio.Future[None]


class Publisher:
    """Offsets for events through Redis; see the module docstring."""

    def __init__(
        self,
        router: Router,
        keys: KeyLayout,
        scripts: Scripts,
        *,
        pubsub_command: str,
        history_size: int,
        ttl_ms: int,
        window_ms: int,
        ack_replicas: int | None,
        timeout: float,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._router = router
        self._keys = keys
        self._scripts = scripts
        self._pubsub_command = pubsub_command
        self._history_size = history_size
        self._ttl_ms = ttl_ms
        self._window_ms = window_ms
        self._ack_replicas = ack_replicas
        self._wait_ms = max(1, int(timeout * 500))  # half the budget: the commit follows
        self._wall_clock = wall_clock
        self._queue: list[_Publish] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        # Candidate epochs only need to be unique: a PRNG seeded from the OS, not a
        # getrandom call per publish.
        self._random = random.Random(secrets.randbits(128))  # noqa: S311
        self._channels: dict[str, _Channel] = {}
        self._packed_limits = b"".join(
            bulk(b"%d" % value) for value in (history_size, ttl_ms, window_ms)
        )

    async def publish(self, requests: Sequence[PublishRequest]) -> list[PublishResult]:
        """Publish in order; see ``Broker.publish``."""
        if not requests:
            return []
        loop = asyncio.get_running_loop()
        pending = _Publish([self._event(r) for r in requests], loop.create_future())
        self._queue.append(pending)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        await pending.future
        results = []
        for event in pending.events:
            if event.error is not None:
                raise event.error
            if event.result is None:  # every event gets a result or an error
                raise unavailable("no reply")
            results.append(event.result)
        return results

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    def _event(self, request: PublishRequest) -> _Event:
        channel = request.channel
        wall = self._wall_clock()
        event_id = new_event_id(wall)
        head, tail = split_payload(
            encode_message(
                request.type,
                dict(request.data),
                id=event_id,
                channel=channel,
                offset=0,
                timestamp=wall,
            )
        )
        known = self._channels.get(channel)
        if known is None:
            known = self._channel(channel)
        slot, keys, packed_keys, events, packed_events = known
        epoch = f"{self._random.getrandbits(64):016x}"
        if request.idempotency_key:
            key = self._keys.idempotency(channel, request.idempotency_key)
            keys = (*keys, key)
            packed_keys = b"$1\r\n3\r\n" + packed_keys[7:] + bulk(key.encode())
        # The sha is filled in when the batch knows which script it runs; the rest of the
        # command is packed once, here.
        command: tuple[Any, ...] = (
            len(keys),
            *keys,
            epoch,
            head,
            tail,
            self._history_size,
            self._ttl_ms,
            self._window_ms,
            events,
            event_id,
        )
        packed = b"".join(
            (
                packed_keys,
                bulk(epoch.encode()),
                bulk(head),
                bulk(tail),
                self._packed_limits,
                packed_events,
                bulk(event_id.encode()),
            )
        )
        if request.trace is not None:
            # The publish script puts it into the pub/sub message (the append script
            # ignores it: the commit script gets it again).
            command += (request.trace,)
            packed += bulk(request.trace.encode())
        return _Event(request, slot, command, head, tail, packed)

    def _channel(self, channel: str) -> _Channel:
        """A channel's slot, keys and their RESP bytes (cached, bounded)."""
        if len(self._channels) >= _CHANNEL_CACHE:
            self._channels.clear()  # a rare, cheap reset rather than LRU bookkeeping
        keys = (self._keys.meta(channel), self._keys.stream(channel))
        events = self._keys.events(channel)
        known = (
            key_slot(keys[0].encode()),
            keys,
            b"$1\r\n2\r\n" + b"".join(bulk(key.encode()) for key in keys),
            events,
            bulk(events),
        )
        self._channels[channel] = known
        return known

    def _packed(self, sha: str, event: _Event) -> Packed:
        """The event's ``EVALSHA sha ...`` command, packed."""
        command = ("EVALSHA", sha, *event.command)
        return Packed(
            command,
            b"*%d\r\n$7\r\nEVALSHA\r\n%s%s" % (len(command), bulk(sha.encode()), event.packed),
        )

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._queue = self._queue, []
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(self._run(batch), name="redis-publish")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Publish]) -> None:
        by_slot: dict[int, list[_Event]] = {}
        for pending in batch:
            for event in pending.events:
                by_slot.setdefault(event.slot, []).append(event)
        try:
            wanted = {slot: self._wanted_now(slot) for slot in by_slot}
            unknown = [slot for slot, count in wanted.items() if count is None]
            if unknown:
                # The first publishes to a primary: connect first, which counts its
                # replicas (ack_replicas auto).
                await asyncio.gather(*(self._connect(slot, by_slot[slot]) for slot in unknown))
                wanted = {slot: self._wanted_now(slot) for slot in by_slot}
            by_wanted: dict[int, dict[int, list[_Event]]] = {}
            for slot, events in by_slot.items():
                count = wanted[slot]
                if count is not None:
                    by_wanted.setdefault(count, {})[slot] = events
            calls = [
                self._publish_at_once(group) if count == 0 else self._publish_waited(group, count)
                for count, group in by_wanted.items()
            ]
            # Usually one kind of slot: awaited here, not in a task of gather's own.
            if len(calls) == 1:
                await calls[0]
            elif calls:
                await asyncio.gather(*calls)
        except BaseException as exc:
            for pending in batch:
                for event in pending.events:
                    if event.result is None and event.error is None:
                        event.error = unavailable(exc)
            raise
        finally:
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_result(None)

    async def _connect(self, slot: int, events: list[_Event]) -> None:
        """Connect the slot's link (its events fail if that fails)."""
        await self._guarded(events, self._router.run(slot, [("PING",)], retry=True))

    async def _publish_at_once(self, by_slot: dict[int, list[_Event]]) -> None:
        """Append and publish in one script per event, every slot in one pass."""
        slots = list(by_slot.items())
        sha = self._scripts.publish
        groups = [(slot, [self._packed(sha, e) for e in events]) for slot, events in slots]
        for (_, events), replies in zip(slots, await self._router.run_many(groups), strict=True):
            if isinstance(replies, BrokerUnavailable):
                for event in events:
                    event.error = replies
            else:
                self._results(events, replies)

    async def _publish_waited(self, by_slot: dict[int, list[_Event]], wanted: int) -> None:
        """Append every slot's events, ``WAIT`` once per primary for ``wanted`` replicas,
        then commit what they have."""
        slots = list(by_slot.items())
        sha = self._scripts.append
        groups = [(slot, [self._packed(sha, e) for e in events]) for slot, events in slots]
        results = await self._router.run_many(groups, suffix=("WAIT", wanted, self._wait_ms))
        appended: list[tuple[int, list[_Event]]] = []
        for (slot, events), replies in zip(slots, results, strict=True):
            if isinstance(replies, BrokerUnavailable):
                for event in events:
                    event.error = replies
                continue
            acknowledged = replies.pop()
            self._results(events, replies)
            if any(
                isinstance(count, ResponseError) or int(count) < wanted for count in acknowledged
            ):
                for event in events:
                    if event.error is None:
                        event.result = None
                        event.error = BrokerUnavailable(
                            "the broker is unavailable (too few replicas acknowledged)"
                        )
                continue
            kept = [e for e in events if e.error is None]
            if kept:
                appended.append((slot, kept))
        await self._commit(appended)

    async def _commit(self, appended: list[tuple[int, list[_Event]]]) -> None:
        """Publish and show the appended events of each slot: one commit script per
        channel, one call per primary; a failed call is retried (commits are idempotent)."""
        groups: list[tuple[int, list[Command]]] = []
        channels: list[list[list[_Event]]] = []
        for slot, events in appended:
            by_channel: dict[str, list[_Event]] = {}
            for event in events:
                by_channel.setdefault(event.request.channel, []).append(event)
            groups.append(
                (
                    slot,
                    [
                        self._commit_command(channel, members)
                        for channel, members in by_channel.items()
                    ],
                )
            )
            channels.append(list(by_channel.values()))
        if not groups:
            return
        results = await self._router.run_many(groups)
        failed = [
            index for index, replies in enumerate(results) if isinstance(replies, BrokerUnavailable)
        ]
        retried = await asyncio.gather(
            *(
                self._guarded(
                    appended[index][1],
                    self._router.run(groups[index][0], groups[index][1], retry=True),
                )
                for index in failed
            )
        )
        for index, again in zip(failed, retried, strict=True):
            if again is not None:  # else its events have the error
                results[index] = again
        for index, result in enumerate(results):
            if isinstance(result, BrokerUnavailable):
                continue
            for members, reply in zip(channels[index], result, strict=True):
                if isinstance(reply, ResponseError):
                    self._failed(members, reply)

    def _commit_command(self, channel: str, appended: list[_Event]) -> Command:
        results = [e.result for e in appended if e.result is not None]
        latest = max(results, key=lambda r: r.offset)
        triples: list[Any] = []
        for event in appended:
            # A duplicate's payload is not this call's: the script reads it from history.
            if event.result is not None and not event.duplicate:
                offset = event.result.offset
                triples += [
                    offset,
                    event.head + str(offset).encode() + event.tail,
                    event.request.trace or "",
                ]
        return (
            "EVALSHA",
            self._scripts.commit,
            2,
            self._keys.meta(channel),
            self._keys.stream(channel),
            latest.epoch,
            latest.offset,
            self._pubsub_command,
            self._keys.events(channel),
            *triples,
        )

    def _wanted_now(self, slot: int) -> int | None:
        """How many replicas must have the slot's events before they are shown (None:
        not known until the link has connected)."""
        if self._ack_replicas is not None:
            return self._ack_replicas
        link = self._router.link(self._router.topology.address(slot))
        if not link.connected:
            return None
        return 1 if link.replicas_seen > 0 else 0

    async def _guarded(self, events: list[_Event], call: Awaitable[T]) -> T | None:
        """``call``'s value; None after ``BrokerUnavailable``, which every event gets."""
        try:
            return await call
        except BrokerUnavailable as exc:
            for event in events:
                event.result = None
                event.error = exc
            return None

    def _results(self, events: list[_Event], replies: list[Any]) -> None:
        for event, reply in zip(events, replies, strict=True):
            if isinstance(reply, ResponseError):
                self._failed([event], reply)
                continue
            epoch, offset, event_id, duplicate = reply
            event.duplicate = bool(duplicate)
            event.result = PublishResult(
                event.request.channel,
                int(offset),
                event_id.decode(),
                epoch.decode(),
                event.duplicate,
            )

    @staticmethod
    def _failed(events: list[_Event], reply: ResponseError) -> None:
        logger.warning("redis refused a publish: %s", type(reply).__name__)
        for event in events:
            event.result = None
            event.error = unavailable(reply)
