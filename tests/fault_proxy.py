"""An asyncio TCP proxy for tests that can cut, stall and resume connections.

    async with FaultProxy(port) as proxy:      # listens on 127.0.0.1, a free port
        url = f"ws://127.0.0.1:{proxy.port}/ws"
        proxy.cut()          # abort every live connection (both sides, no close frame)
        proxy.refuse = True  # new connections are accepted and dropped at once
        proxy.stall()        # stop forwarding bytes (live and new connections) ...
        proxy.resume()       # ... and forward what was held
        proxy.target_port = other_port   # new connections go elsewhere

Waiting helpers (``wait_accepted``) use a condition, never sleeps. ``StateRecorder`` is a
client state listener that tests wait on.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from types import TracebackType

from tidings.client import StateChange
from timeouts import TIMEOUT

__all__ = ["FaultProxy", "StateRecorder"]

CHUNK = 65536


@dataclass(eq=False)
class _Pair:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            writer.transport.abort()


class FaultProxy:
    """Forwards 127.0.0.1:<port> to <target_host>:<target_port>; see the module docstring."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.refuse = False
        #: Client connections accepted so far (refused ones included).
        self.accepted = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._pairs: set[_Pair] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        self._flowing.set()
        handlers = list(self._handlers)
        if handlers:
            _, stuck = await asyncio.wait(handlers, timeout=TIMEOUT)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- faults ----------------------------------------------------------------------

    @property
    def live(self) -> int:
        """Connections currently forwarded."""
        return len(self._pairs)

    def cut(self) -> int:
        """Abort every live connection on both sides; return how many were cut."""
        pairs = list(self._pairs)
        for pair in pairs:
            pair.abort()
        return len(pairs)

    def stall(self) -> None:
        """Hold every byte (both directions, live and new connections) until ``resume``."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def wait_accepted(self, count: int, timeout: float = TIMEOUT) -> None:
        """Wait until at least ``count`` client connections were accepted in total."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.accepted >= count)

    # -- forwarding ------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._forward(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()  # asyncio's stream callback mishandles cancelled tasks
        finally:
            self._handlers.discard(task)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self._changed:
            self.accepted += 1
            self._changed.notify_all()
        if self.refuse:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        pair = _Pair(writer, up_writer)
        self._pairs.add(pair)
        pair.tasks = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        try:
            await asyncio.wait(pair.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._pairs.discard(pair)
            for pump in pair.tasks:
                pump.cancel()
            await asyncio.gather(*pair.tasks, return_exceptions=True)
            for side in (writer, up_writer):
                side.close()
                with contextlib.suppress(Exception):
                    await side.wait_closed()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    return
                await self._flowing.wait()
                if writer.transport.is_closing():
                    return
                writer.write(data)
                await writer.drain()


# -- support for client tests -------------------------------------------------------------


class StateRecorder:
    """A client state listener that records every change and lets a test wait for one."""

    def __init__(self) -> None:
        self.changes: list[StateChange] = []
        self._changed = asyncio.Event()

    def __call__(self, change: StateChange) -> None:
        self.changes.append(change)
        self._changed.set()

    def states(self) -> list[str]:
        return [c.state.value for c in self.changes]

    def count(self, state: str) -> int:
        return self.states().count(state)

    def mark(self) -> int:
        """A position in the history of changes, for ``wait(..., after=mark)``."""
        return len(self.changes)

    async def wait(
        self, state: str, count: int = 1, timeout: float = TIMEOUT, after: int = 0
    ) -> StateChange:
        """Wait for the ``count``-th change to ``state`` (counting changes from index
        ``after``); return that change."""
        async with asyncio.timeout(timeout):
            while True:
                matches = [c for c in self.changes[after:] if c.state.value == state]
                if len(matches) >= count:
                    return matches[count - 1]
                self._changed.clear()
                await self._changed.wait()
