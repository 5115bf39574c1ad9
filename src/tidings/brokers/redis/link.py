"""Connections to Redis servers: how to open one, and ``Link``, a pipelined command
connection to one server.

redis-py supplies the connection (RESP encoding, the hiredis parser when installed, TLS,
authentication, ``CLIENT SETNAME``); this module decides when bytes go out. A ``Link``
sends every call made during one event-loop tick as one write and matches replies to
calls in order, so concurrent publishes to one shard cost one round trip, not one each.

Guarantees of ``Link.call``: the commands of one call are written contiguously and in
order, calls are written in the order they were made, and the future gets one reply per
command (an error reply is a ``ResponseError`` instance in its place). When the
connection fails, or the oldest reply is overdue by ``timeout``, every call that has not
been answered fails with ``BrokerUnavailable`` (its commands may or may not have run)
and the next call opens a new connection. Nothing queues without bound: calls past
``max_pending`` fail at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from tidings.brokers.redis.resp import pack_commands
from tidings.brokers.redis.urls import Target
from tidings.errors import BrokerUnavailable

__all__ = ["Address", "Link", "Role", "open_connection", "unavailable"]

logger = logging.getLogger(__name__)

#: A server: (host, port), or a unix socket path.
Address = tuple[str, int] | str

Command = Sequence[Any]


def unavailable(exc: BaseException | str) -> BrokerUnavailable:
    """A ``BrokerUnavailable`` whose message never carries an address or a secret."""
    reason = exc if isinstance(exc, str) else type(exc).__name__
    return BrokerUnavailable(f"the broker is unavailable ({reason})")


def make_connection(
    target: Target, address: Address, *, timeout: float, client_name: str, reads_block: bool = False
) -> AbstractConnection:
    """A redis-py connection (not yet connected) to ``address`` of ``target``.

    ``reads_block``: a pub/sub connection, whose reads wait for messages (liveness is
    checked with PING). No connection has a socket timeout: every wait is bounded by its
    caller (a link's reply deadline, a pub/sub PING, ``asyncio.timeout`` around the
    rest), and redis-py would otherwise start a task per write and a timer per read.
    """
    common: dict[str, Any] = {
        "db": target.db,
        "username": target.username,
        "password": target.password,
        "socket_timeout": None,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
        "client_name": client_name,
        # RESP2: works with every Redis >= 5, and pub/sub messages are plain replies.
        "protocol": 2,
    }
    if isinstance(address, str):
        return UnixDomainSocketConnection(path=address, **common)
    host, port = address
    if target.tls:
        options: dict[str, Any] = {}
        for name, value in target.tls_options:
            options[name] = value == "true" if name == "ssl_check_hostname" else value
        return SSLConnection(host=host, port=port, **options, **common)
    return Connection(host=host, port=port, **common)


async def open_connection(
    target: Target,
    address: Address,
    *,
    timeout: float,  # noqa: ASYNC109
    client_name: str,
    reads_block: bool = False,
) -> AbstractConnection:
    """A connected connection; raises ``RedisError``/``OSError``/``TimeoutError``."""
    conn = make_connection(
        target, address, timeout=timeout, client_name=client_name, reads_block=reads_block
    )
    try:
        async with asyncio.timeout(timeout):
            await conn.connect()
    except BaseException:
        await conn.disconnect(nowait=True)
        raise
    return conn


@dataclass(frozen=True, slots=True)
class Role:
    """What ``ROLE`` said (when a link connected, and at each topology check): primary or
    not, and its live replicas."""

    primary: bool
    replicas: int


def parse_role(reply: Any) -> Role:
    """A ``ROLE`` reply as a ``Role``."""
    if isinstance(reply, list) and reply and reply[0] == b"master":
        replicas = reply[2] if len(reply) > 2 and isinstance(reply[2], list) else []
        return Role(True, len(replicas))
    return Role(False, 0)


@dataclass(slots=True, eq=False)
class _Call:
    commands: Sequence[Command]
    future: asyncio.Future[list[Any]]
    deadline: float
    replies: list[Any] = field(default_factory=list)


class Link:
    """One pipelined command connection to one server; see the module docstring.

    ``opener`` opens a connected redis-py connection. ``on_broken`` is called (once per
    connection) when it failed, so that the owner can look at the topology again.
    """

    def __init__(
        self,
        address: Address,
        opener: Callable[[Address], Any],
        *,
        timeout: float,
        max_pending: int = 100_000,
        on_broken: Callable[[Link, BaseException], None] | None = None,
    ) -> None:
        self.address = address
        self._opener = opener
        self._timeout = timeout
        self._max_pending = max_pending
        self._on_broken = on_broken
        self.role: Role | None = None
        #: The most replicas ``ROLE`` has shown for this primary since the link was made.
        #: Sticky, so that ``ack_replicas`` auto keeps waiting for a replica that dropped
        #: out (which a failover may yet promote) instead of acknowledging without it.
        self.replicas_seen = 0
        self._conn: AbstractConnection | None = None
        self._opening: asyncio.Task[None] | None = None
        self._outbox: list[_Call] = []
        self._inflight: deque[_Call] = deque()
        self._tasks: list[asyncio.Task[None]] = []
        self._wake: asyncio.Event | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def pending(self) -> int:
        return len(self._outbox) + len(self._inflight)

    def note_role(self, role: Role | None) -> None:
        """What ``ROLE`` said now (None: the server would not say)."""
        self.role = role
        if role is not None and role.primary:
            self.replicas_seen = max(self.replicas_seen, role.replicas)

    def call(self, commands: Sequence[Command]) -> asyncio.Future[list[Any]]:
        """Queue ``commands`` for this tick's write; see the module docstring."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        if self._closed:
            future.set_exception(unavailable("closed"))
            return future
        if self.pending >= self._max_pending:
            future.set_exception(unavailable("too many commands in flight"))
            return future
        self._outbox.append(_Call(commands, future, loop.time() + self._timeout))
        if self._timer is None:
            self._arm(loop)
        if self._conn is not None:
            if self._wake is not None:
                self._wake.set()
        elif self._opening is None:
            self._opening = loop.create_task(self._open(), name="redis-link-open")
        return future

    async def close(self) -> None:
        """Fail what is pending and close the connection."""
        self._closed = True
        if self._opening is not None:
            self._opening.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._opening
        self._break(unavailable("closed"), notify=False)
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=self._timeout)

    # -- connection ------------------------------------------------------------------

    async def _open(self) -> None:
        try:
            conn: AbstractConnection = await self._opener(self.address)
            try:
                async with asyncio.timeout(self._timeout):
                    await conn.send_command("ROLE", check_health=False)
                    self.note_role(parse_role(await conn.read_response()))
            except ResponseError:
                self.note_role(None)  # ROLE not permitted (ACL): nothing to learn from it
            except BaseException:
                await conn.disconnect(nowait=True)
                raise
        except (RedisError, OSError, TimeoutError) as exc:
            self._fail_all(unavailable(exc))
            if self._on_broken is not None:
                self._on_broken(self, exc)
            return
        finally:
            if self._opening is asyncio.current_task():
                self._opening = None
        if self._closed:
            await conn.disconnect(nowait=True)
            return
        self._conn = conn
        wake = self._wake = asyncio.Event()
        wake.set()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._write_forever(conn, wake), name="redis-link-write"),
            loop.create_task(self._read_forever(conn), name="redis-link-read"),
        ]

    async def _write_forever(self, conn: AbstractConnection, wake: asyncio.Event) -> None:
        try:
            while True:
                await wake.wait()
                wake.clear()
                calls, self._outbox = self._outbox, []
                if not calls:
                    continue
                commands = [command for call in calls for command in call.commands]
                self._inflight.extend(calls)
                await conn.send_packed_command(pack_commands(commands), check_health=False)
        except (RedisError, OSError, TimeoutError) as exc:
            self._break(unavailable(exc), conn=conn)

    async def _read_forever(self, conn: AbstractConnection) -> None:
        inflight = self._inflight
        try:
            while True:
                try:
                    reply = await conn.read_response(timeout=math.inf, disconnect_on_error=False)
                except ResponseError as error:
                    reply = error
                if not inflight:
                    raise ConnectionError("a reply no command asked for")
                call = inflight[0]
                call.replies.append(reply)
                if len(call.replies) == len(call.commands):
                    inflight.popleft()
                    if not call.future.done():
                        call.future.set_result(call.replies)
        except (RedisError, OSError, TimeoutError) as exc:
            self._break(unavailable(exc), conn=conn)

    def _break(
        self,
        error: BrokerUnavailable,
        *,
        conn: AbstractConnection | None = None,
        notify: bool = True,
    ) -> None:
        """Fail everything pending and drop the connection (only ``conn``, if given)."""
        if conn is not None and conn is not self._conn:
            return
        current, self._conn = self._conn, None
        tasks, self._tasks = self._tasks, []
        self._wake = None
        self._fail_all(error)
        this = asyncio.current_task()
        for task in tasks:
            if task is not this:
                task.cancel()
        if current is not None:
            # nowait: the socket is closed at once; the coroutine only tidies up.
            closing = asyncio.get_running_loop().create_task(current.disconnect(nowait=True))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
            if notify and self._on_broken is not None:
                self._on_broken(self, error)

    def _fail_all(self, error: BrokerUnavailable) -> None:
        calls = list(self._inflight) + self._outbox
        self._inflight.clear()
        self._outbox = []
        for call in calls:
            if not call.future.done():
                call.future.set_exception(error)
                call.future.exception()  # retrieved: an abandoned call logs nothing
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- deadlines -------------------------------------------------------------------

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        oldest = (
            self._inflight[0] if self._inflight else (self._outbox[0] if self._outbox else None)
        )
        self._timer = None if oldest is None else loop.call_at(oldest.deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        oldest = (
            self._inflight[0] if self._inflight else (self._outbox[0] if self._outbox else None)
        )
        if oldest is None:
            return
        if oldest.deadline <= loop.time():
            # A reply cannot be skipped: the connection is dropped with what it carries.
            self._break(unavailable("TimeoutError"))
            return
        self._arm(loop)
