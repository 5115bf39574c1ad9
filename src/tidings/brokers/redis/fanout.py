"""Fan-out between nodes: which channels this node receives, over which pub/sub
connection, and the continuity of each.

``Fanout`` owns one ``Subscriber`` per primary that owns channels this node serves, and
one ``Continuity`` tracker per served channel (the decisions are the pure
``tidings.brokers.continuity``'s; this module feeds it, and ``tidings.brokers.redis.feed``
carries them out):

* ``subscribe``: the channel is subscribed at the primary that owns its slot; once that
  is confirmed the starting position is read, so every later event comes through
  pub/sub.
* A lost connection, a slot that moved (``sunsubscribe`` push, ``MOVED``), or a primary
  that failed over: the channels are ``stale`` until subscribed where they live now
  (the topology is read again, with backoff), and then repaired from history after the
  last delivered offset, exactly as after a reconnect. Loss is never silent: a gap
  history cannot fill, or a changed epoch, reaches ``BrokerHandler.on_continuity_lost``.
* The control channel (node-to-node commands) is subscribed the same way and needs no
  repair.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from redis.exceptions import RedisError

from tidings.brokers.base import BrokerHandler, HistoryPage, StreamPosition
from tidings.brokers.continuity import Continuity
from tidings.brokers.redis.codec import decode_event
from tidings.brokers.redis.feed import Feed, ServedChannel, backoff
from tidings.brokers.redis.link import Address
from tidings.brokers.redis.presence import PRESENCE_MARK
from tidings.brokers.redis.pubsub import Subscriber
from tidings.brokers.redis.scripts import KeyLayout, key_slot
from tidings.brokers.redis.topology import Topology
from tidings.errors import BrokerUnavailable

__all__ = ["Fanout"]

logger = logging.getLogger(__name__)


class Fanout:
    """Subscriptions, pub/sub connections and continuity; see the module docstring.

    ``read_position(channel)`` reads the starting position (and keeps the channel's keys
    alive); ``read_history(channel, since, limit)`` pages history for repairs.
    """

    def __init__(
        self,
        keys: KeyLayout,
        topology: Topology,
        opener: Callable[[Address], Awaitable[Any]],
        *,
        read_position: Callable[[str], Awaitable[StreamPosition]],
        read_history: Callable[[str, int, int], Awaitable[HistoryPage]],
        on_control: Callable[[bytes], None],
        spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]],
        timeout: float,
        ping_interval: float,
        reconnect_delay: tuple[float, float],
        buffer_limit: int,
        history_chunk: int,
    ) -> None:
        self._keys = keys
        self._topology = topology
        self._opener = opener
        self._read_position = read_position
        self._on_control = on_control
        self._spawn = spawn
        self._timeout = timeout
        self._ping_interval = ping_interval
        self._reconnect_delay = reconnect_delay
        self._buffer_limit = buffer_limit
        #: Carries out each channel's continuity decisions; its ``handler`` is ours.
        self._feed = Feed(
            read_history=read_history,
            spawn=spawn,
            reconnect_delay=reconnect_delay,
            history_chunk=history_chunk,
        )
        self.channels: dict[str, ServedChannel] = {}
        self._by_pubsub: dict[bytes, ServedChannel] = {}
        self._subscribers: dict[Address, Subscriber] = {}
        self._homeless: set[bytes] = set()
        self._control_home: Subscriber | None = None
        self._rehoming: asyncio.Task[None] | None = None
        self._closing = False
        #: Set whenever a subscriber (re)connects after the first: presence is rewritten.
        self.on_reconnected: Callable[[], None] = lambda: None
        #: The control channel's pub/sub connection was confirmed (``on_control_up``) or
        #: went down (``on_control_down``, once per failed attempt while it stays down):
        #: the broker's "lost" and "restored" log lines.
        self.on_control_up: Callable[[], None] = lambda: None
        self.on_control_down: Callable[[], None] = lambda: None
        self._ever_connected = False
        self._changed = asyncio.Event()

    @property
    def handler(self) -> BrokerHandler | None:
        """The node's handler, told of events and losses (set when the broker starts)."""
        return self._feed.handler

    @handler.setter
    def handler(self, handler: BrokerHandler | None) -> None:
        self._feed.handler = handler

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe the control channel; returns after the first attempt."""
        self._homeless.add(self._keys.control)
        self._rehome_now()
        home = self._control_home
        if home is not None:
            await self._until_settled(home)

    async def _until_settled(self, home: Subscriber) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        while not home.down and self._keys.control not in home.confirmed:
            left = deadline - loop.time()
            if left <= 0:
                return
            await self._wait_change(left)

    async def _wait_change(self, limit: float) -> None:
        """Until a subscriber confirms something or goes down (or ``limit`` seconds)."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                await self._changed.wait()

    async def close(self) -> None:
        self._closing = True
        if self._rehoming is not None:
            self._rehoming.cancel()
        for state in self.channels.values():
            self._fail_confirmation(state)
            if state.repair is not None:
                state.repair.cancel()
        for subscriber in list(self._subscribers.values()):
            await subscriber.close()
        self._subscribers.clear()
        self.channels.clear()
        self._by_pubsub.clear()

    def connected(self) -> bool:
        """True while the control channel and every served channel are subscribed."""
        home = self._control_home
        return (
            home is not None
            and home.connected
            and not self._homeless
            and self._keys.control in home.confirmed
        )

    def repairs(self) -> list[asyncio.Task[None]]:
        return [s.repair for s in self.channels.values() if s.repair is not None]

    # -- subscriptions ---------------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        existing = self.channels.get(channel)
        if existing is not None and existing.status != "init":
            return
        if existing is not None or self._closing or not self.connected():
            raise BrokerUnavailable("the broker is unavailable (not connected)")
        loop = asyncio.get_running_loop()
        state = ServedChannel(channel, self._keys.events(channel), Continuity(self._buffer_limit))
        self.channels[channel] = state
        self._by_pubsub[state.pubsub] = state
        confirmed = state.confirmed = loop.create_future()
        subscriber = self._home_of(state.pubsub)
        state.subscriber = subscriber
        subscriber.add(state.pubsub)
        try:
            done, _ = await asyncio.wait([confirmed], timeout=self._timeout)
            if not done:
                raise BrokerUnavailable("the broker is unavailable (TimeoutError)")
            confirmed.result()
            # Read the start AFTER the subscription is confirmed: every event past it is
            # published after the SUBSCRIBE, so it comes through pub/sub.
            position = await self._read_position(channel)
            if (
                state.closed
                or state.status != "init"
                or state.subscriber is not subscriber
                or subscriber.down
            ):
                raise BrokerUnavailable("the broker is unavailable (connection lost)")
        except BaseException:
            if self.channels.get(channel) is state:
                self._forget(state)
            raise
        self._feed.carry_out(state, state.tracker.start(position))

    def unsubscribe(self, channel: str) -> None:
        state = self.channels.get(channel)
        if state is not None:
            self._forget(state)

    def _forget(self, state: ServedChannel) -> None:
        state.closed = True
        self.channels.pop(state.name, None)
        self._by_pubsub.pop(state.pubsub, None)
        self._homeless.discard(state.pubsub)
        self._fail_confirmation(state)
        if state.repair is not None:
            state.repair.cancel()
        if state.subscriber is not None:
            state.subscriber.remove(state.pubsub)
            self._close_if_idle(state.subscriber)
            state.subscriber = None

    def _close_if_idle(self, subscriber: Subscriber) -> None:
        """A pub/sub connection that carries nothing any more is closed."""
        if subscriber.channels or subscriber is self._control_home:
            return
        if self._subscribers.get(subscriber.address) is subscriber:
            del self._subscribers[subscriber.address]
        self._spawn(subscriber.close(), "redis-pubsub-close")

    def _fail_confirmation(self, state: ServedChannel) -> None:
        if state.confirmed is not None and not state.confirmed.done():
            state.confirmed.set_exception(
                BrokerUnavailable("the broker is unavailable (connection lost)")
            )
            state.confirmed.exception()  # retrieved: an abandoned future logs nothing

    def _home_of(self, name: bytes) -> Subscriber:
        """The subscriber at the primary that owns ``name``'s slot (made if needed)."""
        address = self._topology.address(key_slot(name))
        subscriber = self._subscribers.get(address)
        if subscriber is None or subscriber.down:
            subscriber = Subscriber(
                address,
                self._opener,
                self,
                sharded=self._topology.sharded,
                timeout=self._timeout,
                ping_interval=self._ping_interval,
            )
            self._subscribers[address] = subscriber
            subscriber.start()
        return subscriber

    # -- SubscriberEvents ------------------------------------------------------------

    def on_message(self, name: bytes, data: bytes) -> None:
        if name == self._keys.control:
            self._on_control(data)
            return
        state = self._by_pubsub.get(name)
        if state is None:
            return
        if data.startswith(PRESENCE_MARK):
            self._feed.presence(state, data[len(PRESENCE_MARK) :])
            return
        message = decode_event(data)
        if message is None:
            logger.warning("ignored a malformed event message")
            return
        outputs = state.tracker.receive(message.epoch, message.offset, message.payload)
        if message.trace is None:
            self._feed.carry_out(state, outputs)
        else:
            # Only a message delivered as it arrives keeps its trace: one held for a
            # repair, or read from history, goes without (history stores none).
            self._feed.carry_out(state, outputs, traced=message)

    def on_confirmed(self, subscriber: Subscriber, name: bytes) -> None:
        self._changed.set()
        if name == self._keys.control:
            if self._ever_connected:
                self.on_reconnected()
            self._ever_connected = True
            self.on_control_up()
            return
        state = self._by_pubsub.get(name)
        if state is None or state.subscriber is not subscriber:
            return
        if state.status == "init":
            if state.confirmed is not None and not state.confirmed.done():
                state.confirmed.set_result(None)
        else:
            self._feed.carry_out(state, state.tracker.resubscribed())

    def on_dropped(self, subscriber: Subscriber, names: list[bytes]) -> None:
        for name in names:
            self._drop(subscriber, name)
        if not subscriber.down:
            self._close_if_idle(subscriber)
        self._rehome_soon()

    def on_down(self, subscriber: Subscriber) -> None:
        self._changed.set()
        if self._subscribers.get(subscriber.address) is subscriber:
            del self._subscribers[subscriber.address]
        # Read before the drops below, which forget the control channel's home.
        was_control_home = self._control_home is subscriber
        for name in list(subscriber.channels):
            self._drop(subscriber, name)
        if self._control_home is subscriber:
            self._homeless.add(self._keys.control)
            self._control_home = None
        if was_control_home and not self._closing:
            self.on_control_down()
        self._rehome_soon()

    def _drop(self, subscriber: Subscriber, name: bytes) -> None:
        if name == self._keys.control:
            if self._control_home is subscriber:
                self._control_home = None
                self._homeless.add(name)
            return
        state = self._by_pubsub.get(name)
        if state is None or state.subscriber is not subscriber:
            return
        state.subscriber = None
        if state.status == "init":
            # A subscribe() still setting up fails; its caller may try again.
            self._forget(state)
            return
        state.tracker.disconnected()
        if state.repair is not None:
            state.repair.cancel()
            state.repair = None
        self._homeless.add(name)

    # -- rehoming --------------------------------------------------------------------

    def _rehome_soon(self) -> None:
        if self._closing or self._rehoming is not None:
            return
        self._rehoming = self._spawn(self._rehome_forever(), "redis-rehome")

    async def _rehome_forever(self) -> None:
        """Subscribe every homeless channel where it lives now, reading the topology
        again between attempts, until none is left."""
        attempt = 0
        try:
            while self._homeless and not self._closing:
                attempt += 1
                # Let the cluster settle: a failover takes a moment to be decided.
                await asyncio.sleep(backoff(self._reconnect_delay, attempt))
                try:
                    async with asyncio.timeout(self._timeout):
                        await self._topology.refresh()
                except (RedisError, OSError, TimeoutError) as exc:
                    logger.debug("reading the topology failed: %s", type(exc).__name__)
                    continue
                self._rehome_now()
                # Wait for the new subscribers to connect (or fail) before looking again.
                waiting = [s for s in self._subscribers.values() if not s.connected and not s.down]
                loop = asyncio.get_running_loop()
                deadline = loop.time() + self._timeout
                while waiting and loop.time() < deadline:
                    await self._wait_change(deadline - loop.time())
                    waiting = [s for s in waiting if not s.connected and not s.down]
                if not self._homeless:
                    attempt = 0
        finally:
            self._rehoming = None
        if self._homeless and not self._closing:
            self._rehome_soon()

    def _rehome_now(self) -> None:
        for name in list(self._homeless):
            subscriber = self._home_of(name)
            self._homeless.discard(name)
            if name == self._keys.control:
                self._control_home = subscriber
            else:
                state = self._by_pubsub.get(name)
                if state is None:
                    continue
                state.subscriber = subscriber
            subscriber.add(name)

    def check_homes(self) -> None:
        """After the topology changed: move channels whose slot has a new owner."""
        for subscriber in list(self._subscribers.values()):
            moved = [
                n
                for n in subscriber.channels
                if self._topology.address(key_slot(n)) != subscriber.address
            ]
            for name in moved:
                subscriber.remove(name)
            if moved:
                self.on_dropped(subscriber, moved)

    def served(self) -> list[str]:
        return list(self.channels)

    def status(self, channel: str) -> dict[str, Any] | None:
        state = self.channels.get(channel)
        if state is None:
            return None
        tracker = state.tracker
        return {"status": tracker.status, "epoch": tracker.epoch, "last": tracker.last}
