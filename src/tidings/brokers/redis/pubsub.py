"""One pub/sub connection to one primary: ``Subscriber``.

A node holds one ``Subscriber`` per primary that owns channels it serves. Plain
``SUBSCRIBE`` is used on one primary (any Redis >= 5), ``SSUBSCRIBE`` on a cluster
(sharded pub/sub: a message travels only within its shard). The (un)subscriptions of one
loop tick go out together, one command per slot when sharded (a sharded command may not
span slots).

The subscriber reports into ``SubscriberEvents`` and never decides anything about
continuity:

* ``on_message``: a message, in the order the primary sent it;
* ``on_confirmed``: the primary confirmed a subscription, so every later message of the
  channel comes through here;
* ``on_dropped``: the primary dropped or refused channels (``sunsubscribe`` pushed after
  a slot moved away, ``MOVED``/``ASK`` in reply to ``SSUBSCRIBE``); they must be
  subscribed where they now live;
* ``on_down``: the connection failed or stopped answering PING; every channel on it is
  dropped, and the subscriber is finished (the owner makes a new one).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import AskError, RedisError, ResponseError

from tidings.brokers.redis.link import Address
from tidings.brokers.redis.resp import pack_commands
from tidings.brokers.redis.scripts import key_slot

__all__ = ["Subscriber", "SubscriberEvents"]

logger = logging.getLogger(__name__)

#: Channels per (un)subscribe command when not sharded.
_CHUNK = 1000


class SubscriberEvents(Protocol):
    """Where a ``Subscriber`` reports; every method must return quickly and not raise."""

    def on_message(self, name: bytes, data: bytes) -> None: ...

    def on_confirmed(self, subscriber: Subscriber, name: bytes) -> None: ...

    def on_dropped(self, subscriber: Subscriber, names: list[bytes]) -> None: ...

    def on_down(self, subscriber: Subscriber) -> None: ...


class Subscriber:
    """The pub/sub connection to ``address``; see the module docstring.

    ``channels`` are the names wanted here (confirmed or not). Call ``add``/``remove``
    from the event loop at any time; before the connection is up they wait for it.
    """

    def __init__(
        self,
        address: Address,
        opener: Callable[[Address], Awaitable[Any]],
        events: SubscriberEvents,
        *,
        sharded: bool,
        timeout: float,
        ping_interval: float,
    ) -> None:
        self.address = address
        self.sharded = sharded
        self.channels: set[bytes] = set()
        self.confirmed: set[bytes] = set()
        self._opener = opener
        self._events = events
        self._timeout = timeout
        self._ping_interval = ping_interval
        self._sub, self._unsub = (
            (b"SSUBSCRIBE", b"SUNSUBSCRIBE") if sharded else (b"SUBSCRIBE", b"UNSUBSCRIBE")
        )
        self._message = b"smessage" if sharded else b"message"
        self._queue: list[tuple[bytes, bytes]] = []
        self._flushing = False
        self._unsubscribing: dict[bytes, int] = {}
        self._conn: AbstractConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._pong: asyncio.Event | None = None
        self.down = False

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def start(self) -> None:
        """Connect in the background (``on_down`` if that fails)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="redis-pubsub")

    async def close(self) -> None:
        self.down = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=self._timeout)

    def add(self, name: bytes) -> None:
        if self.down or name in self.channels:
            return
        self.channels.add(name)
        self._enqueue(self._sub, name)

    def remove(self, name: bytes) -> None:
        if name not in self.channels:
            return
        self.channels.discard(name)
        self.confirmed.discard(name)
        if not self.down:
            self._unsubscribing[name] = self._unsubscribing.get(name, 0) + 1
            self._enqueue(self._unsub, name)

    # -- sending ---------------------------------------------------------------------

    def _enqueue(self, command: bytes, name: bytes) -> None:
        self._queue.append((command, name))
        if self._conn is not None and not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        conn = self._conn
        if conn is None or not self._queue:
            return
        queue, self._queue = self._queue, []
        commands = self._batches(queue)
        task = asyncio.get_running_loop().create_task(self._send(conn, commands))
        task.add_done_callback(_retrieve)

    def _batches(self, queue: list[tuple[bytes, bytes]]) -> list[tuple[bytes, ...]]:
        """Consecutive commands of one kind, merged: per slot when sharded."""
        commands: list[tuple[bytes, ...]] = []
        run: list[bytes] = []
        kind = b""

        def close_run() -> None:
            if not run:
                return
            if self.sharded:
                by_slot: dict[int, list[bytes]] = {}
                for name in run:
                    by_slot.setdefault(key_slot(name), []).append(name)
                commands.extend((kind, *names) for names in by_slot.values())
            else:
                for start in range(0, len(run), _CHUNK):
                    commands.append((kind, *run[start : start + _CHUNK]))
            run.clear()

        for command, name in queue:
            if command != kind:
                close_run()
                kind = command
            run.append(name)
        close_run()
        return commands

    async def _send(self, conn: AbstractConnection, commands: list[tuple[bytes, ...]]) -> None:
        try:
            await conn.send_packed_command(pack_commands(commands), check_health=False)
        except (RedisError, OSError, TimeoutError) as exc:
            logger.warning("pub/sub command failed: %s", type(exc).__name__)
            if self._conn is conn and self._task is not None:
                self._task.cancel()

    # -- the connection --------------------------------------------------------------

    async def _run(self) -> None:
        conn: AbstractConnection | None = None
        try:
            conn = await self._opener(self.address)
            self._conn = conn
            self._pong = asyncio.Event()
            # Everything wanted so far goes out as the first write.
            self._queue = [(self._sub, name) for name in self.channels]
            self._unsubscribing.clear()
            self._flush()
            pinger = asyncio.get_running_loop().create_task(self._ping_forever(conn))
            try:
                await self._read_forever(conn)
            finally:
                pinger.cancel()
                await asyncio.wait([pinger])
        except asyncio.CancelledError:
            pass
        except (RedisError, OSError, TimeoutError) as exc:
            log = logger.info if conn is not None else logger.debug
            log("pub/sub connection lost (%s)", type(exc).__name__)
        finally:
            self._conn = None
            if conn is not None:
                await conn.disconnect(nowait=True)
            was_down, self.down = self.down, True
            self.confirmed.clear()
            if not was_down:
                self._events.on_down(self)

    async def _ping_forever(self, conn: AbstractConnection) -> None:
        pong = self._pong
        if pong is None:
            return
        while True:
            await asyncio.sleep(self._ping_interval)
            pong.clear()
            await conn.send_command("PING", check_health=False)
            try:
                await asyncio.wait_for(pong.wait(), self._timeout)
            except TimeoutError:
                logger.info("no answer to PING on a pub/sub connection")
                if self._task is not None:
                    self._task.cancel()
                return

    async def _read_forever(self, conn: AbstractConnection) -> None:
        while True:
            try:
                reply = await conn.read_response(timeout=math.inf, disconnect_on_error=False)
            except AskError as error:  # MOVED is an AskError too
                self._refused(error.slot_id)
                continue
            except ResponseError as error:
                raise ConnectionError(f"pub/sub error reply: {type(error).__name__}") from None
            if not isinstance(reply, list) or not reply:
                if reply == b"PONG" and self._pong is not None:
                    # Outside subscribed mode (every channel left) PING answers plainly.
                    self._pong.set()
                continue
            kind = reply[0]
            if kind == self._message:
                self._events.on_message(reply[1], reply[2])
            elif kind == b"ssubscribe" or kind == b"subscribe":
                name = reply[1]
                if name in self.channels and name not in self.confirmed:
                    self.confirmed.add(name)
                    self._events.on_confirmed(self, name)
            elif kind == b"sunsubscribe" or kind == b"unsubscribe":
                self._unsubscribed(reply[1])
            elif kind == b"pong" and self._pong is not None:
                self._pong.set()

    def _unsubscribed(self, name: bytes) -> None:
        pending = self._unsubscribing.get(name, 0)
        if pending:
            if pending == 1:
                del self._unsubscribing[name]
            else:
                self._unsubscribing[name] = pending - 1
            return
        if name in self.channels:
            # Not asked for: the slot moved away (or the primary became a replica).
            self.channels.discard(name)
            self.confirmed.discard(name)
            self._events.on_dropped(self, [name])

    def _refused(self, slot: int) -> None:
        names = [n for n in self.channels if n not in self.confirmed and key_slot(n) == slot]
        for name in names:
            self.channels.discard(name)
        if names:
            self._events.on_dropped(self, names)


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
