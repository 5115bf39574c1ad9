"""The Redis broker: offsets, history and fan-out shared by many nodes.

The only module of Tidings that imports ``redis``. Key layout and scripts are in
``tidings.brokers.redis_scripts``.

* **Publish** runs one Lua script per event: idempotency check, epoch creation, offset
  increment, ``XADD`` to the channel's history stream, key expiry and ``PUBLISH``. It
  answers only after the script returned, so an acknowledged event is in history.
* **Fan-out**: one pub/sub connection per node. A channel is subscribed when its first
  local subscriber arrives and unsubscribed after the last; the (un)subscribe commands of
  one loop tick go out as one command.
* **Continuity**: pub/sub is at-most-once, so every node tracks ``(epoch, last offset)``
  per channel. A duplicate is dropped, a gap is filled from the history stream before
  later events are delivered, and a gap history cannot fill or a changed epoch is
  reported with ``on_continuity_lost``. After the pub/sub connection comes back every
  served channel is repaired the same way. The decisions are made by the pure
  ``tidings.brokers.continuity.Continuity``; this module feeds it and carries them out.
* **Cluster-wide views**: each node keeps a key with its channel counts and one field per
  channel in that channel's presence hash; the node key expires when the node stops
  refreshing it, and readers ignore (and remove) entries of nodes whose key is gone.
  ``disconnect_user`` goes to every node over a control pub/sub channel. Sums and what to
  write are worked out by the pure ``tidings.brokers.presence``; message formats are in
  ``tidings.brokers.redis_codec``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tidings.brokers.base import (
    BrokerHandler,
    HistoryPage,
    PublishRequest,
    PublishResult,
    StoredEvent,
    StreamPosition,
)
from tidings.brokers.continuity import Continuity, Deliver, Lost, Output, Status
from tidings.brokers.presence import (
    PresenceSync,
    decode_entry,
    encode_entry,
    live_entries,
    sum_channels,
    sum_presence,
)
from tidings.brokers.redis_codec import (
    decode_control,
    decode_event,
    encode_control,
    split_payload,
)
from tidings.brokers.redis_scripts import PUBLISH_SCRIPT, READ_SCRIPT, KeyLayout
from tidings.config import Settings
from tidings.errors import BrokerUnavailable
from tidings.events import new_event_id
from tidings.protocol.wire import encode_message

__all__ = ["RedisBroker", "redact_url"]

logger = logging.getLogger(__name__)

#: Highest ``since`` passed to Redis (stream ids are 64-bit).
_MAX_SINCE = 2**62
#: Channels per SUBSCRIBE command sent after a reconnect.
_RESUBSCRIBE_CHUNK = 1000
#: Repairs running at once after a reconnect.
_REPAIR_CONCURRENCY = 16


def redact_url(url: str) -> str:
    """``url`` without its password, for log lines."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _unavailable(exc: BaseException) -> BrokerUnavailable:
    """A ``BrokerUnavailable`` with a message that never carries the URL or a secret."""
    return BrokerUnavailable(f"the broker is unavailable ({type(exc).__name__})")


T = TypeVar("T")


async def _bounded(call: Awaitable[T], limit: float) -> T:
    """``call`` with a time limit in seconds; raises ``TimeoutError`` when it runs out.

    Unlike ``asyncio.timeout`` on Python 3.11, this never turns a cancellation of the
    caller that coincides with the deadline into a ``TimeoutError`` (which would keep a
    cancelled loop running).
    """
    task = asyncio.ensure_future(call)
    try:
        done, _ = await asyncio.wait([task], timeout=limit)
    except BaseException:
        task.cancel()
        raise
    if not done:
        task.cancel()
        await asyncio.wait([task])
        raise TimeoutError
    return task.result()


class _Wakeup:
    """A level-triggered signal with a timed wait (see ``_bounded`` for why not Event)."""

    def __init__(self) -> None:
        self._flag = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._flag = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self, limit: float) -> None:
        """Return when set (and clear it) or after ``limit`` seconds."""
        if not self._flag:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait([self._waiter], timeout=limit)
            finally:
                self._waiter = None
        self._flag = False


@dataclass(slots=True, eq=False)
class _Channel:
    """One subscribed channel: its continuity tracker and the I/O around it.

    ``tracker.status`` (see ``tidings.brokers.continuity``): ``init`` until the SUBSCRIBE
    is confirmed and the starting position read; ``live``; ``repair`` while ``repair``
    (a task) fills a gap from history; ``stale`` while the pub/sub connection is down.
    """

    name: str
    pubsub: bytes
    tracker: Continuity
    generation: int = 0
    confirmed: asyncio.Future[None] | None = None
    repair: asyncio.Task[None] | None = None
    closed: bool = False

    @property
    def status(self) -> Status:
        return self.tracker.status


class RedisBroker:
    """``Broker`` backed by Redis; see ``tidings.brokers.base.Broker`` for guarantees.

    ``node_ttl``: how long this node's presence and channel counts outlive it.
    ``sync_interval``: how often local presence changes are written to Redis.
    ``ping_interval``: how often the pub/sub connection is checked (PING).
    ``reconnect_delay``: (first, largest) delay between reconnection attempts.
    ``buffer_limit``: events held per channel while a gap is being filled.
    ``max_connections``: commands in flight at once; more wait up to ``timeout``.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "tidings",
        timeout: float = 2.0,
        history_size: int = 100,
        history_ttl: float = 300.0,
        idempotency_window: float = 300.0,
        node_ttl: float = 15.0,
        sync_interval: float = 1.0,
        ping_interval: float = 5.0,
        reconnect_delay: tuple[float, float] = (0.1, 5.0),
        buffer_limit: int = 10_000,
        max_connections: int = 64,
        node_id: str | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._url = url
        self._safe_url = redact_url(url)
        self._keys = KeyLayout(prefix)
        self._timeout = timeout
        self._history_size = history_size
        self._ttl_ms = max(1, int(history_ttl * 1000))
        self._window_ms = max(1, int(idempotency_window * 1000))
        self._node_ttl_ms = max(1, int(node_ttl * 1000))
        #: Presence hashes outlive their last write by this much (rewritten before).
        self._presence_keep_ms = max(self._ttl_ms, self._node_ttl_ms * 20)
        self._sync_interval = sync_interval
        self._ping_interval = ping_interval
        self._reconnect_delay = reconnect_delay
        self._buffer_limit = buffer_limit
        self._wall_clock = wall_clock
        self.node_id = node_id or secrets.token_hex(6)
        self._pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            # RESP2: works with every Redis >= 5, and pub/sub messages are plain replies.
            protocol=2,
        )
        self._redis = aioredis.Redis(connection_pool=self._pool)
        self._publish_script = self._redis.register_script(PUBLISH_SCRIPT)
        self._read_script = self._redis.register_script(READ_SCRIPT)
        self._handler: BrokerHandler | None = None
        self._channels: dict[str, _Channel] = {}
        self._by_pubsub: dict[bytes, _Channel] = {}
        # Pub/sub connection state.
        self._conn: AbstractConnection | None = None
        self._generation = 0
        self._broken: asyncio.Event | None = None
        self._pong: asyncio.Event | None = None
        self._commands: list[tuple[str, bytes]] = []
        self._flush_scheduled = False
        self._repair_slots = asyncio.Semaphore(_REPAIR_CONCURRENCY)
        # Cluster-wide views.
        self._synced = PresenceSync()
        self._sync_wakeup = _Wakeup()
        self._rewrite_presence = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._pubsub_task: asyncio.Task[None] | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._started = False
        self._closing = False

    @classmethod
    def from_settings(cls, settings: Settings, **tuning: Any) -> RedisBroker:
        """A broker configured from ``settings`` (``tuning`` overrides the defaults)."""
        return cls(
            settings.broker.url,
            prefix=settings.broker.prefix,
            timeout=settings.broker.timeout,
            history_size=settings.history.size,
            history_ttl=settings.history.ttl,
            idempotency_window=settings.api.idempotency_window,
            **tuning,
        )

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, handler: BrokerHandler) -> None:
        """Connect the pub/sub connection (or keep trying in the background)."""
        self._handler = handler
        self._started = True
        first = asyncio.get_running_loop().create_future()
        self._pubsub_task = asyncio.create_task(self._pubsub_forever(first), name="redis-pubsub")
        self._sync_task = asyncio.create_task(self._sync_forever(), name="redis-sync")
        # Wait for the first attempt so that a node starting next to a healthy Redis
        # serves subscriptions at once; when Redis is down the node starts anyway,
        # not ready, and keeps trying.
        await asyncio.wait([first, self._pubsub_task], return_when=asyncio.FIRST_COMPLETED)

    async def close(self, *, clean: bool = True) -> None:
        """Stop everything. ``clean`` also removes this node's presence and channel
        counts from Redis (``False`` leaves them to expire, as a crash would)."""
        if self._closing:
            return
        self._closing = True
        tasks = [t for t in (self._pubsub_task, self._sync_task) if t is not None]
        tasks += [ch.repair for ch in self._channels.values() if ch.repair is not None]
        tasks += list(self._tasks)
        pending = set(tasks)
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=1.0)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                logger.error("redis broker task %s failed", task.get_name(),
                             exc_info=task.exception())
        for channel in self._channels.values():
            self._fail_confirmation(channel)
        if clean and self._started:
            try:
                await _bounded(self._remove_node_entries(), self._timeout)
            except (RedisError, OSError, TimeoutError) as exc:
                logger.warning("could not remove this node's entries from Redis: %s",
                               type(exc).__name__)
        self._channels.clear()
        self._by_pubsub.clear()
        self._handler = None
        await self._redis.aclose()
        await self._pool.disconnect()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("redis broker task %s failed", task.get_name(),
                         exc_info=task.exception())

    # -- commands --------------------------------------------------------------------

    async def _call(self, call: Awaitable[T]) -> T:
        """Run one Redis call; every failure to complete it is ``BrokerUnavailable``."""
        try:
            return await call
        except (RedisError, OSError, TimeoutError) as exc:
            if not isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError,
                                    TimeoutError)):
                logger.warning("redis command failed: %s", exc)
            raise _unavailable(exc) from None

    async def publish(self, requests: Sequence[PublishRequest]) -> list[PublishResult]:
        if not requests:
            return []
        calls = [self._publish_call(request) for request in requests]
        if len(calls) == 1:
            keys, args = calls[0]
            replies = [await self._call(self._publish_script(keys=keys, args=args))]
        else:
            replies = await self._call(self._publish_many(calls))
        results = []
        for request, reply in zip(requests, replies, strict=True):
            epoch, offset, event_id, _ = reply
            results.append(PublishResult(request.channel, int(offset), event_id.decode(),
                                         epoch.decode()))
        return results

    async def _publish_many(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.scripts.add(self._publish_script)  # type: ignore[arg-type]
            for keys, args in calls:
                pipe.evalsha(self._publish_script.sha, len(keys), *keys, *args)
            return await pipe.execute()

    def _publish_call(self, request: PublishRequest) -> tuple[list[str], list[Any]]:
        channel = request.channel
        wall = self._wall_clock()
        event_id = new_event_id(wall)
        head, tail = split_payload(encode_message(
            request.type, dict(request.data), id=event_id, channel=channel, offset=0,
            timestamp=wall,
        ))
        keys = [self._keys.meta(channel), self._keys.stream(channel)]
        if request.idempotency_key:
            keys.append(self._keys.idempotency(channel, request.idempotency_key))
        args: list[Any] = [self._new_epoch(), head, tail, self._history_size, self._ttl_ms,
                           self._window_ms, self._keys.events(channel), event_id]
        return keys, args

    @staticmethod
    def _new_epoch() -> str:
        return secrets.token_hex(8)

    async def _read(self, channel: str, since: int, limit: int,
                    touch: bool = False) -> tuple[StreamPosition, int, list[StoredEvent]]:
        first = f"{min(max(since, 0), _MAX_SINCE) + 1}-0"
        reply = await self._call(self._read_script(
            keys=[self._keys.meta(channel), self._keys.stream(channel)],
            args=[self._new_epoch(), first, max(0, limit), self._ttl_ms, int(touch)],
        ))
        position = StreamPosition(int(reply[1]), reply[0].decode())
        events = [StoredEvent(int(reply[i].split(b"-", 1)[0]), bytes(reply[i + 1]))
                  for i in range(3, len(reply), 2)]
        return position, int(reply[2]), events

    async def position(self, channel: str) -> StreamPosition:
        position, _, _ = await self._read(channel, 0, 0)
        return position

    async def history(self, channel: str, since: int, limit: int) -> HistoryPage:
        position, oldest, events = await self._read(channel, since, limit)
        complete = since + 1 >= oldest and since <= position.offset
        return HistoryPage(position, events, complete)

    async def ready(self) -> bool:
        if self._conn is None:
            return False
        try:
            await self._call(self._redis.ping())
        except BrokerUnavailable:
            return False
        return True

    # -- subscriptions ---------------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        existing = self._channels.get(channel)
        if existing is not None and existing.status != "init":
            return
        if existing is not None or self._conn is None or self._closing:
            raise BrokerUnavailable("the broker is unavailable (not connected)")
        loop = asyncio.get_running_loop()
        state = _Channel(channel, self._keys.events(channel), Continuity(self._buffer_limit),
                         generation=self._generation, confirmed=loop.create_future())
        self._channels[channel] = state
        self._by_pubsub[state.pubsub] = state
        self._queue("SUBSCRIBE", state.pubsub)
        try:
            confirmed = cast(asyncio.Future[None], state.confirmed)
            done, _ = await asyncio.wait([confirmed], timeout=self._timeout)
            if not done:
                raise BrokerUnavailable("the broker is unavailable (TimeoutError)")
            confirmed.result()
            # Read the start AFTER the subscription is confirmed: every event past it is
            # published after the SUBSCRIBE, so it comes through pub/sub.
            position, _, _ = await self._read(channel, 0, 0, touch=True)
            if state.closed or state.status != "init" or state.generation != self._generation:
                raise BrokerUnavailable("the broker is unavailable (connection lost)")
        except BaseException:
            if self._channels.get(channel) is state:
                self._forget(state)
            raise
        self._carry_out(state, state.tracker.start(position))
        self._sync_wakeup.set()

    async def unsubscribe(self, channel: str) -> None:
        state = self._channels.get(channel)
        if state is not None:
            self._forget(state)
        self._sync_wakeup.set()

    def _forget(self, state: _Channel) -> None:
        state.closed = True
        self._channels.pop(state.name, None)
        self._by_pubsub.pop(state.pubsub, None)
        self._fail_confirmation(state)
        if state.repair is not None:
            state.repair.cancel()
        if self._conn is not None:
            self._queue("UNSUBSCRIBE", state.pubsub)

    def _fail_confirmation(self, state: _Channel) -> None:
        if state.confirmed is not None and not state.confirmed.done():
            state.confirmed.set_exception(
                BrokerUnavailable("the broker is unavailable (connection lost)"))
            # Retrieved here so that an abandoned future logs nothing.
            state.confirmed.exception()

    def _queue(self, command: str, channel: bytes) -> None:
        """Queue a (UN)SUBSCRIBE; the commands of one loop tick go out together."""
        self._commands.append((command, channel))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_commands)

    def _flush_commands(self) -> None:
        self._flush_scheduled = False
        commands, self._commands = self._commands, []
        conn = self._conn
        if conn is None or not commands:
            return
        batches: list[tuple[str, list[bytes]]] = []
        for command, channel in commands:
            if batches and batches[-1][0] == command:
                batches[-1][1].append(channel)
            else:
                batches.append((command, [channel]))
        self._spawn(self._send(conn, batches), "redis-pubsub-send")

    async def _send(self, conn: AbstractConnection, batches: list[tuple[str, list[bytes]]]
                    ) -> None:
        try:
            for command, channels in batches:
                await conn.send_command(command, *channels, check_health=False)
        except (RedisError, OSError, TimeoutError) as exc:
            logger.warning("pub/sub command failed: %s", type(exc).__name__)
            if self._conn is conn and self._broken is not None:
                self._broken.set()

    # -- the pub/sub connection ------------------------------------------------------

    async def _connect(self) -> AbstractConnection:
        kwargs = dict(self._pool.connection_kwargs)
        kwargs["socket_timeout"] = None  # reads wait for messages; PING checks liveness
        kwargs["client_name"] = f"tidings:{self.node_id}:pubsub"
        conn: AbstractConnection = self._pool.connection_class(**kwargs)
        try:
            await _bounded(conn.connect(), self._timeout)  # type: ignore[no-untyped-call]
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        return conn

    async def _pubsub_forever(self, first: asyncio.Future[None]) -> None:
        attempt = failures = 0
        while not self._closing:
            try:
                conn = await self._connect()
            except (RedisError, OSError, TimeoutError) as exc:
                if not first.done():
                    first.set_result(None)
                failures += 1
                log = logger.warning if failures == 1 else logger.debug
                log("cannot reach Redis at %s (%s); retrying", self._safe_url,
                    type(exc).__name__)
                attempt += 1
                await asyncio.sleep(self._backoff(attempt))
                continue
            if failures:
                logger.info("pub/sub connection to Redis is back after %d attempts", failures)
            attempt = failures = 0
            try:
                await self._serve_connection(conn, first)
            except (RedisError, OSError, TimeoutError) as exc:
                logger.warning("pub/sub connection to Redis lost (%s); reconnecting",
                               type(exc).__name__)
            finally:
                self._connection_lost()
                await conn.disconnect(nowait=True)
            attempt = 1
            await asyncio.sleep(self._backoff(attempt))

    def _backoff(self, attempt: int) -> float:
        low, high = self._reconnect_delay
        return random.uniform(low, min(high, low * 2 ** min(attempt, 20)))  # noqa: S311

    async def _serve_connection(self, conn: AbstractConnection,
                                first: asyncio.Future[None]) -> None:
        self._generation += 1
        self._broken = asyncio.Event()
        self._pong = asyncio.Event()
        names = [self._keys.control]
        for state in self._channels.values():
            if state.status != "init":
                state.tracker.disconnected()
                names.append(state.pubsub)
        for start in range(0, len(names), _RESUBSCRIBE_CHUNK):
            await conn.send_command("SUBSCRIBE", *names[start:start + _RESUBSCRIBE_CHUNK],
                                    check_health=False)
        self._conn = conn
        if not first.done():
            first.set_result(None)
        if self._generation > 1:
            # Redis may have restarted empty: write presence and counts again now.
            self._rewrite_presence = True
            self._sync_wakeup.set()
        reader = asyncio.create_task(self._read_forever(conn), name="redis-pubsub-read")
        pinger = asyncio.create_task(self._ping_forever(conn), name="redis-pubsub-ping")
        broken = asyncio.create_task(self._broken.wait(), name="redis-pubsub-broken")
        tasks = {reader, pinger, broken}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if task is not broken:
                task.result()  # re-raise what ended the connection
        raise ConnectionError("pub/sub connection broken")

    def _connection_lost(self) -> None:
        self._conn = None
        self._commands.clear()
        for state in list(self._channels.values()):
            if state.status == "init":
                # A subscribe() still setting up must fail: the new connection will
                # not carry its SUBSCRIBE.
                state.generation = -1
                self._fail_confirmation(state)
                continue
            state.tracker.disconnected()
            if state.repair is not None:
                state.repair.cancel()
                state.repair = None

    async def _ping_forever(self, conn: AbstractConnection) -> None:
        pong = cast(asyncio.Event, self._pong)
        while True:
            await asyncio.sleep(self._ping_interval)
            pong.clear()
            await conn.send_command("PING", check_health=False)
            try:
                await _bounded(pong.wait(), self._timeout)
            except TimeoutError:
                raise TimeoutError("no answer to PING on the pub/sub connection") from None

    async def _read_forever(self, conn: AbstractConnection) -> None:
        while True:
            reply = await conn.read_response()
            if not isinstance(reply, list) or not reply:
                continue
            kind = reply[0]
            if kind == b"message":
                self._on_message(reply[1], reply[2])
            elif kind == b"subscribe":
                self._on_subscribed(reply[1])
            elif kind == b"pong" and self._pong is not None:
                self._pong.set()

    def _on_subscribed(self, name: bytes) -> None:
        state = self._by_pubsub.get(name)
        if state is None:
            if name != self._keys.control and self._conn is not None:
                # Subscribed while being forgotten (during a reconnect): undo it.
                self._queue("UNSUBSCRIBE", name)
            return
        if state.status == "init":
            if state.confirmed is not None and not state.confirmed.done():
                state.confirmed.set_result(None)
        else:
            self._carry_out(state, state.tracker.resubscribed())

    def _on_message(self, name: bytes, data: bytes) -> None:
        if name == self._keys.control:
            self._on_control(data)
            return
        state = self._by_pubsub.get(name)
        if state is None:
            return
        message = decode_event(data)
        if message is None:
            logger.warning("ignored a malformed event message")
            return
        self._carry_out(state, state.tracker.receive(message.epoch, message.offset,
                                                     message.payload))

    def _on_control(self, data: bytes) -> None:
        message = decode_control(data)
        if message is None:
            logger.warning("ignored a malformed control message")
            return
        if message.node != self.node_id and self._handler is not None:
            self._handler.on_disconnect_user(message.user, message.reason)

    # -- continuity ------------------------------------------------------------------

    def _carry_out(self, state: _Channel, outputs: list[Output]) -> None:
        """Carry out the tracker's decisions, in order."""
        for output in outputs:
            if isinstance(output, Deliver):
                self._deliver(state, output)
            elif isinstance(output, Lost):
                self._lost(state)
            elif state.repair is None:
                state.repair = self._spawn(self._repair(state), "redis-repair")

    def _deliver(self, state: _Channel, event: Deliver) -> None:
        if self._handler is None:
            return
        try:
            self._handler.on_event(state.name, event.offset, event.epoch, event.payload)
        except Exception:
            logger.exception("on_event failed for a channel")

    def _lost(self, state: _Channel) -> None:
        logger.info("continuity lost for a channel; telling its subscribers to resubscribe")
        if self._handler is None:
            return
        try:
            self._handler.on_continuity_lost(state.name)
        except Exception:
            logger.exception("on_continuity_lost failed for a channel")

    async def _repair(self, state: _Channel) -> None:
        """Fill the gap after the tracker's ``since`` from history, then resume."""
        attempt = 0
        chunk = max(100, self._history_size)
        try:
            async with self._repair_slots:
                while True:
                    try:
                        page = await self.history(state.name, state.tracker.since, chunk)
                    except BrokerUnavailable:
                        attempt += 1
                        await asyncio.sleep(self._backoff(attempt))
                        continue
                    if state.closed or state.repair is not asyncio.current_task():
                        return
                    step = state.tracker.repaired(page)
                    self._carry_out(state, step.outputs)
                    if step.done:
                        break
        finally:
            if state.repair is asyncio.current_task():
                state.repair = None
        if not state.closed:
            self._carry_out(state, state.tracker.resume())

    # -- cluster-wide views ----------------------------------------------------------

    async def disconnect_user(self, user_id: str, reason: str) -> None:
        if self._handler is not None:
            self._handler.on_disconnect_user(user_id, reason)
        message = encode_control(self.node_id, user_id, reason)
        await self._call(self._redis.publish(self._keys.control, message))

    async def channels(self, prefix: str) -> dict[str, int]:
        members = await self._call(self._redis.smembers(self._keys.nodes))
        others = sorted(n for n in map(_text, members) if n != self.node_id)
        values = await self._call(self._get_many([self._keys.node(n) for n in others]))
        alive, dead = live_entries(others, values)
        if dead:
            with contextlib.suppress(BrokerUnavailable):
                await self._call(self._redis.srem(self._keys.nodes, *dead))
        local = self._handler.local_channels() if self._handler is not None else {}
        return sum_channels([local, *map(decode_entry, alive)], prefix)

    async def _get_many(self, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.get(key)
            return cast(list[bytes | None], await pipe.execute())

    async def presence(self, channel: str) -> dict[str, int]:
        key = self._keys.presence(channel)
        fields = await self._call(self._redis.hgetall(key))
        others = {_text(n): v for n, v in fields.items() if _text(n) != self.node_id}
        names = sorted(others)
        exists = await self._call(self._exists_many([self._keys.node(n) for n in names]))
        alive, dead = live_entries(names, [others[n] if ok else None
                                           for n, ok in zip(names, exists, strict=True)])
        if dead:
            with contextlib.suppress(BrokerUnavailable):
                await self._call(self._redis.hdel(key, *dead))
        local = self._handler.local_presence(channel) if self._handler is not None else {}
        return sum_presence([local, *map(decode_entry, alive)])

    async def _exists_many(self, keys: list[str]) -> list[bool]:
        if not keys:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.exists(key)
            return [bool(n) for n in await pipe.execute()]

    async def _sync_forever(self) -> None:
        """Keep this node's channel counts, presence and served streams fresh in Redis.

        Every round writes what changed (channels whose subscriber count changed); every
        tenth round compares the presence of every channel; the node key is rewritten
        before it expires, every presence field before its hash expires, and the keys of
        served streams before their history ttl runs out.
        """
        loop = asyncio.get_running_loop()
        due = {"node": -float("inf"), "presence": loop.time(), "touch": -float("inf")}
        every = {"node": self._node_ttl_ms / 3000, "presence": self._presence_keep_ms / 3000,
                 "touch": self._ttl_ms / 3000}
        rounds = 0
        while not self._closing:
            await self._sync_wakeup.wait(self._sync_interval)
            now = loop.time()
            rounds += 1
            needed = {name for name, last in due.items() if now - last >= every[name]}
            forced, self._rewrite_presence = self._rewrite_presence, False
            if forced:
                needed |= {"node", "presence", "touch"}
            try:
                # Every command is bounded by the socket timeout.
                await self._sync_once(
                    force_node="node" in needed,
                    recheck=rounds % 10 == 0,
                    rewrite="presence" in needed,
                    touch="touch" in needed,
                )
            except (RedisError, OSError, TimeoutError) as exc:
                logger.debug("presence sync failed: %s", type(exc).__name__)
                self._rewrite_presence = self._rewrite_presence or forced
                continue
            for name in needed:
                due[name] = now
            # Debounce: a burst of (un)subscriptions makes one write, not one each.
            await asyncio.sleep(min(0.05, self._sync_interval))

    async def _sync_once(self, *, force_node: bool, recheck: bool, rewrite: bool,
                         touch: bool) -> None:
        if self._handler is None:
            return
        plan = self._synced.plan(self._handler.local_channels(), self._handler.local_presence,
                                 force_node=force_node, recheck=recheck, rewrite=rewrite)
        if plan.empty and not touch:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            if plan.write_node:
                pipe.set(self._keys.node(self.node_id), encode_entry(plan.counts),
                         px=self._node_ttl_ms)
                pipe.sadd(self._keys.nodes, self.node_id)
            for name, users in plan.presence.items():
                key = self._keys.presence(name)
                if users:
                    pipe.hset(key, self.node_id, encode_entry(users))
                    pipe.pexpire(key, self._presence_keep_ms)
                else:
                    pipe.hdel(key, self.node_id)
            if touch:
                # Served streams keep their epoch while any node has subscribers.
                for name, state in self._channels.items():
                    if state.status != "init":
                        pipe.pexpire(self._keys.meta(name), self._ttl_ms)
                        pipe.pexpire(self._keys.stream(name), self._ttl_ms)
            await pipe.execute()
        self._synced.written(plan)

    async def _remove_node_entries(self) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.delete(self._keys.node(self.node_id))
            pipe.srem(self._keys.nodes, self.node_id)
            for name in self._synced.presence:
                pipe.hdel(self._keys.presence(name), self.node_id)
            await pipe.execute()

    def served_channels(self) -> Iterable[str]:
        """Channels this node is subscribed to (for tests and diagnostics)."""
        return list(self._channels)

    def is_connected(self) -> bool:
        """True while the pub/sub connection is up."""
        return self._conn is not None

    def status(self, channel: str) -> Mapping[str, Any] | None:
        """The continuity tracker of ``channel`` (for tests and diagnostics)."""
        state = self._channels.get(channel)
        if state is None:
            return None
        tracker = state.tracker
        return {"status": tracker.status, "epoch": tracker.epoch, "last": tracker.last}
