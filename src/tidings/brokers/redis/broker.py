"""The Redis broker: offsets, history and fan-out shared by many nodes.

One primary, a Sentinel service or a Redis Cluster (``tidings.brokers.redis.urls``); as
far as this code goes, one primary is a cluster of one shard. The parts:

* ``topology``: which primary owns which slot; ``router``: commands to that primary
  over a pipelined ``link``, with cluster redirections and failovers followed;
* ``publisher``: publishes of one loop tick as one pipeline per shard, optionally
  acknowledged by replicas before anything is shown;
* ``fanout``: one pub/sub connection per primary that owns served channels, and the
  continuity of every served channel (gaps filled from history, loss reported);
* ``views``: cluster-wide presence, channel counts and node-to-node commands;
* ``scripts`` and ``codec``: key layout, Lua scripts and message formats (pure).

This package is the only part of Tidings that imports ``redis``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from hashlib import sha1
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError, ResponseError

from tidings.brokers.base import (
    BrokerHandler,
    HistoryPage,
    PublishRequest,
    PublishResult,
    StoredEvent,
    StreamPosition,
)
from tidings.brokers.redis.codec import decode_control
from tidings.brokers.redis.fanout import Fanout
from tidings.brokers.redis.link import Address, open_connection, unavailable
from tidings.brokers.redis.presence import SCRIPTS as PRESENCE_SCRIPTS
from tidings.brokers.redis.presence import PresenceLedger
from tidings.brokers.redis.publisher import Publisher, Scripts
from tidings.brokers.redis.relay import Relay, is_relay
from tidings.brokers.redis.router import Router
from tidings.brokers.redis.scripts import (
    APPEND_SCRIPT,
    COMMIT_SCRIPT,
    READ_SCRIPT,
    KeyLayout,
    key_slot,
    publish_script,
)
from tidings.brokers.redis.topology import make_topology
from tidings.brokers.redis.urls import parse_url
from tidings.brokers.redis.views import Views
from tidings.config import Settings
from tidings.errors import BrokerUnavailable
from tidings.supervisor import Supervisor

__all__ = ["RedisBroker"]

logger = logging.getLogger(__name__)

#: Highest ``since`` passed to Redis (stream ids are 64-bit).
_MAX_SINCE = 2**62


def _sha(text: str) -> str:
    return sha1(text.encode(), usedforsecurity=False).hexdigest()


class RedisBroker:
    """``Broker`` backed by Redis; see ``tidings.brokers.base.Broker`` for guarantees.

    ``ack_replicas``: replicas that must have an event before it is acknowledged and
    shown (None: one where the primary has replicas, else none).
    ``node_ttl``: how long this node's presence and channel counts outlive it.
    ``sync_interval``: how often local presence changes are written to Redis.
    ``ping_interval``: how often pub/sub connections and the topology are checked.
    ``reconnect_delay``: (first, largest) delay between reconnection attempts.
    ``buffer_limit``: events held per channel while a gap is being filled.
    ``presence_interval``: the longest pause between two sweeps of due presence leaves
    (``tidings.brokers.redis.presence``).
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
        ack_replicas: int | None = None,
        node_ttl: float = 15.0,
        sync_interval: float = 1.0,
        ping_interval: float = 5.0,
        reconnect_delay: tuple[float, float] = (0.1, 5.0),
        buffer_limit: int = 10_000,
        node_id: str | None = None,
        presence_interval: float = 1.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._target = parse_url(url)
        self._safe_url = self._target.safe
        self._keys = KeyLayout(prefix)
        self._timeout = timeout
        self._ttl_ms = max(1, int(history_ttl * 1000))
        self._ping_interval = ping_interval
        self.node_id = node_id or secrets.token_hex(6)
        self._handler: BrokerHandler | None = None
        self._topology = make_topology(self._target, self._open_probe, timeout)
        sharded = self._topology.sharded
        pubsub_command = "SPUBLISH" if sharded else "PUBLISH"
        texts = {
            "publish": publish_script(pubsub_command),
            "append": APPEND_SCRIPT,
            "commit": COMMIT_SCRIPT,
            "read": READ_SCRIPT,
        }
        self._scripts = Scripts(**{name: _sha(text) for name, text in texts.items()})
        self._router = Router(
            self._topology,
            self._open_command,
            timeout=timeout,
            scripts={**{_sha(text): text for text in texts.values()}, **PRESENCE_SCRIPTS},
        )
        self._publisher = Publisher(
            self._router,
            self._keys,
            self._scripts,
            pubsub_command=pubsub_command,
            history_size=history_size,
            ttl_ms=self._ttl_ms,
            window_ms=max(1, int(idempotency_window * 1000)),
            ack_replicas=ack_replicas,
            timeout=timeout,
            wall_clock=wall_clock,
        )
        self._history_chunk = max(100, history_size)
        self._fanout = Fanout(
            self._keys,
            self._topology,
            self._open_pubsub,
            read_position=lambda channel: self._position(channel, touch=True),
            read_history=self.history,
            on_control=self._on_control,
            spawn=self._spawn,
            timeout=timeout,
            ping_interval=ping_interval,
            reconnect_delay=reconnect_delay,
            buffer_limit=buffer_limit,
            history_chunk=self._history_chunk,
        )
        node_ttl_ms = max(1, int(node_ttl * 1000))
        self._views = Views(
            self._router,
            self._keys,
            self.node_id,
            handler=lambda: self._handler,
            served=self._fanout.served,
            pubsub_command=pubsub_command,
            node_ttl_ms=node_ttl_ms,
            # Presence hashes outlive their last write by this much (rewritten before).
            presence_keep_ms=max(self._ttl_ms, node_ttl_ms * 20),
            ttl_ms=self._ttl_ms,
            sync_interval=sync_interval,
        )
        self._presence = PresenceLedger(
            self._router,
            self._keys,
            self.node_id,
            pubsub_command=pubsub_command,
            handler=lambda: self._handler,
            new_generation=lambda: secrets.token_hex(8),
            interval=presence_interval,
            wall_clock=wall_clock,
        )
        #: Node-to-node requests with answers (``NodeRelay``), over the control channel.
        self.relay = Relay(
            self.node_id, self._views.publish_control, self._spawn, timeout=max(5.0, 2 * timeout)
        )
        self._fanout.on_reconnected = self._views.rewrite_all
        self._fanout.on_control_up = self._link_up
        self._fanout.on_control_down = self._link_down
        # Owns the sync and watch loops (restarted with backoff after a failure) and the
        # one-shot tasks (repairs, re-homing, closing pub/sub connections).
        self._supervisor = Supervisor()
        self._started = False
        self._closing = False
        #: Whether the pub/sub link is up, and since when it is down (None: not down, or
        #: never connected yet), so that a loss is logged once and not per retry.
        self._link_is_up = False
        self._down_since: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **tuning: Any) -> RedisBroker:
        """A broker configured from ``settings`` (``tuning`` overrides the defaults)."""
        ack = settings.broker.ack_replicas
        return cls(
            settings.broker.url,
            prefix=settings.broker.prefix,
            timeout=settings.broker.timeout,
            history_size=settings.history.size,
            history_ttl=settings.history.ttl,
            idempotency_window=settings.api.idempotency_window,
            ack_replicas=None if ack == "auto" else int(ack),
            **tuning,
        )

    # -- connections -----------------------------------------------------------------

    async def _open(
        self, address: Address, role: str, reads_block: bool = False
    ) -> AbstractConnection:
        if address == ("", 0):
            raise OSError("the primary is not known yet")
        return await open_connection(
            self._target,
            address,
            timeout=self._timeout,
            client_name=f"tidings:{self.node_id}:{role}",
            reads_block=reads_block,
        )

    async def _open_command(self, address: Address) -> AbstractConnection:
        return await self._open(address, "cmd")

    async def _open_pubsub(self, address: Address) -> AbstractConnection:
        return await self._open(address, "pubsub", reads_block=True)

    async def _open_probe(self, address: Address) -> AbstractConnection:
        return await self._open(address, "topology")

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, handler: BrokerHandler) -> None:
        """Connect (or keep trying in the background); returns after the first attempt,
        so that a node next to a healthy Redis serves subscriptions at once."""
        self._handler = handler
        self._fanout.handler = handler
        self._started = True
        try:
            async with asyncio.timeout(self._timeout):
                await self._topology.refresh()
        except (RedisError, OSError, TimeoutError) as exc:
            logger.warning(
                "cannot read the Redis topology at %s (%s); retrying",
                self._safe_url,
                type(exc).__name__,
            )
        await self._fanout.start()
        self._supervisor.spawn("redis-sync", self._views.sync_forever)
        self._supervisor.spawn("redis-watch", self._watch_forever)
        self._supervisor.spawn("redis-presence", self._presence.sweep_forever)
        if not self._fanout.connected():
            logger.warning("cannot reach Redis at %s; retrying", self._safe_url)
            self._down_since = time.monotonic()

    def _link_up(self) -> None:
        self._link_is_up = True
        if self._down_since is not None:
            logger.info(
                "connection to Redis at %s restored after %.1f s",
                self._safe_url,
                time.monotonic() - self._down_since,
            )
            self._down_since = None

    def _link_down(self) -> None:
        if not self._link_is_up or self._closing:
            return
        self._link_is_up = False
        self._down_since = time.monotonic()
        logger.warning(
            "lost the connection to Redis at %s; reconnecting (/readyz fails until it is back)",
            self._safe_url,
        )

    async def close(self, *, clean: bool = True) -> None:
        """Stop everything. ``clean`` also removes this node's presence and channel
        counts from Redis (``False`` leaves them to expire, as a crash would)."""
        if self._closing:
            return
        self._closing = True
        self._views.closing = True
        try:
            async with asyncio.timeout(self._timeout):
                await self._supervisor.close()
        except TimeoutError:
            logger.warning("redis broker tasks did not stop within %g s", self._timeout)
        await self._fanout.close()
        if clean and self._started:
            try:
                await self._presence.depart_all()
            except BrokerUnavailable as exc:
                logger.warning("could not unregister this node's presence: %s", exc)
            try:
                await self._views.remove_node_entries()
            except BrokerUnavailable as exc:
                logger.warning("could not remove this node's entries from Redis: %s", exc)
        await self._publisher.close()
        await self._router.close()
        await self._topology.close()
        self._handler = None

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = self._supervisor.start(name, coro)
        return task

    async def _watch_forever(self) -> None:
        """Read the topology now and then: a Sentinel failover or a slot move that no
        connection noticed (a demoted primary still accepts subscriptions); and count
        each primary's replicas again (``ack_replicas`` auto)."""
        while not self._closing:
            await asyncio.sleep(self._ping_interval)
            try:
                async with asyncio.timeout(self._timeout):
                    await self._router.refresh_roles()
                    changed = await self._topology.refresh()
            except (RedisError, OSError, TimeoutError) as exc:
                logger.debug("reading the topology failed: %s", type(exc).__name__)
                continue
            if changed:
                logger.info("the Redis topology changed; following it")
                self._fanout.check_homes()

    # -- publishing and reading ------------------------------------------------------

    async def publish(self, requests: Sequence[PublishRequest]) -> list[PublishResult]:
        return await self._publisher.publish(requests)

    async def _read(
        self, channel: str, since: int, limit: int, touch: bool = False
    ) -> tuple[StreamPosition, int, int, list[StoredEvent]]:
        since = min(max(since, 0), _MAX_SINCE)
        meta, stream = self._keys.meta(channel), self._keys.stream(channel)
        (reply,) = await self._router.run(
            key_slot(meta.encode()),
            [
                (
                    "EVALSHA",
                    self._scripts.read,
                    2,
                    meta,
                    stream,
                    secrets.token_hex(8),
                    f"{since + 1}-0",
                    max(0, limit),
                    self._ttl_ms,
                    int(touch),
                    since,
                )
            ],
            retry=True,
        )
        if isinstance(reply, ResponseError):
            logger.warning("redis refused a read: %s", type(reply).__name__)
            raise unavailable(reply)
        position = StreamPosition(int(reply[1]), reply[0].decode())
        events = [
            StoredEvent(int(reply[i].split(b"-", 1)[0]), bytes(reply[i + 1]))
            for i in range(4, len(reply), 2)
        ]
        return position, int(reply[2]), int(reply[3]), events

    async def _position(self, channel: str, touch: bool = False) -> StreamPosition:
        position, _, _, _ = await self._read(channel, 0, 0, touch)
        return position

    async def position(self, channel: str) -> StreamPosition:
        return await self._position(channel)

    async def history(self, channel: str, since: int, limit: int) -> HistoryPage:
        position, oldest, appended, events = await self._read(channel, since, limit)
        complete = since + 1 >= oldest and since <= appended
        return HistoryPage(position, events, complete)

    async def ready(self) -> bool:
        if not self._fanout.connected():
            return False
        try:
            replies = await self._router.scatter([(key_slot(self._keys.nodes.encode()), ("PING",))])
        except BrokerUnavailable:
            return False
        return not isinstance(replies[0], ResponseError)

    # -- subscriptions ---------------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        await self._fanout.subscribe(channel)
        self._views.changed()

    async def unsubscribe(self, channel: str) -> None:
        self._fanout.unsubscribe(channel)
        self._views.changed()

    def _on_control(self, data: bytes) -> None:
        if is_relay(data):
            self.relay.on_message(data)
            return
        message = decode_control(data)
        if message is None:
            logger.warning("ignored a malformed control message")
            return
        if message.node != self.node_id and self._handler is not None:
            try:
                self._handler.on_disconnect_user(message.user, message.reason)
            except Exception:
                # BrokerHandler's failing-handler contract: logged, the rest go on.
                logger.exception("on_disconnect_user failed")

    # -- cluster-wide views ----------------------------------------------------------

    async def disconnect_user(self, user_id: str, reason: str) -> None:
        await self._views.disconnect_user(user_id, reason)

    async def channels(self, prefix: str) -> dict[str, int]:
        return await self._views.channels(prefix)

    async def presence(self, channel: str) -> dict[str, int]:
        return await self._views.presence(channel)

    async def presence_arrive(self, channel: str, user_id: str, ttl: float) -> None:
        await self._presence.arrive(channel, user_id, ttl)

    async def presence_depart(self, channel: str, user_id: str, ttl: float) -> None:
        await self._presence.depart(channel, user_id, ttl)

    # -- diagnostics -----------------------------------------------------------------

    def served_channels(self) -> Iterable[str]:
        """Channels this node is subscribed to (for tests and diagnostics)."""
        return self._fanout.served()

    def is_connected(self) -> bool:
        """True while every pub/sub subscription is in place."""
        return self._fanout.connected()

    def status(self, channel: str) -> Mapping[str, Any] | None:
        """The continuity tracker of ``channel`` (for tests and diagnostics)."""
        return self._fanout.status(channel)
