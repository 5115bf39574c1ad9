"""In-process fakes for hub, broker and gateway tests: no sockets involved.

``FakeConn`` is the hub's ``Outbound`` and ``FakePeer`` the gateway's ``Peer``; both record
every write. ``parse_frames`` decodes the unmasked server text frames those writes carry
(one write may hold several joined frames). ``FakeClock`` is a manual monotonic clock.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from tidings.auth import Identity
from tidings.gateway import Gateway
from tidings.protocol import CloseCode

__all__ = [
    "FakeClock",
    "FakeConn",
    "FakePeer",
    "command",
    "connect_peer",
    "next_tick",
    "parse_frames",
]


def parse_frames(data: bytes) -> list[dict[str, Any]]:
    """Decode every server WebSocket frame in ``data``: final, unmasked text frames whose
    payload is one JSON object. Raises ``AssertionError`` on anything else."""
    messages: list[dict[str, Any]] = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= 2, f"truncated frame header at byte {pos}"
        first, second = data[pos], data[pos + 1]
        assert first == 0x81, f"expected a final text frame (0x81), got {first:#04x}"
        assert not second & 0x80, "server frames must not be masked"
        length = second & 0x7F
        pos += 2
        if length == 126:
            length = int.from_bytes(data[pos : pos + 2], "big")
            pos += 2
            assert length >= 126, "16-bit length used for a short payload"
        elif length == 127:
            length = int.from_bytes(data[pos : pos + 8], "big")
            pos += 8
            assert length >= 65536, "64-bit length used for a medium payload"
        payload = data[pos : pos + length]
        assert len(payload) == length, f"truncated payload: {len(payload)} of {length} bytes"
        pos += length
        message = json.loads(payload)
        assert isinstance(message, dict), f"payload is not a JSON object: {message!r}"
        messages.append(message)
    return messages


class FakeClock:
    """A monotonic clock that only moves when the test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeConn:
    """The hub's view of a connection: records each ``send`` as one write.

    ``on_send`` runs after a write is recorded (to close or unsubscribe mid-flush).
    ``deflate`` stands for a negotiated permessage-deflate; ``send_encoded`` writes are
    recorded in ``writes`` too.
    """

    def __init__(
        self,
        conn_id: str,
        user_id: str = "user-1",
        on_send: Callable[[FakeConn, bytes], None] | None = None,
        deflate: bool = False,
    ) -> None:
        self.deflate = deflate
        self._conn_id = conn_id
        self._user_id = user_id
        self.writes: list[bytes] = []
        self.on_send = on_send

    @property
    def conn_id(self) -> str:
        return self._conn_id

    @property
    def user_id(self) -> str:
        return self._user_id

    def send(self, data: bytes) -> None:
        self.writes.append(data)
        if self.on_send is not None:
            self.on_send(self, data)

    def send_encoded(self, data: bytes) -> None:
        self.send(data)

    def __repr__(self) -> str:
        return f"FakeConn({self._conn_id!r})"


class FakePeer(FakeConn):
    """A ``Peer`` for the gateway: records writes, closes and pings.

    ``closed`` resolves with ``(code, reason)`` on the first ``close``; ``pinged``
    resolves on the first ``send_ping``. Like the real connection, ``close`` does not
    disconnect: the test calls ``gateway.disconnect(peer)`` when it needs to.
    """

    def __init__(self, session: Any) -> None:
        super().__init__(session.conn_id, session.identity.user_id)
        self.session = session
        self.closes: list[tuple[int, str]] = []
        self.pings = 0
        loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[tuple[int, str]] = loop.create_future()
        self.pinged: asyncio.Future[None] = loop.create_future()
        self._read = 0

    def close(self, code: CloseCode, reason: str) -> None:
        self.closes.append((int(code), reason))
        if not self.closed.done():
            self.closed.set_result((int(code), reason))

    def send_ping(self) -> None:
        self.pings += 1
        if not self.pinged.done():
            self.pinged.set_result(None)

    def messages(self) -> list[dict[str, Any]]:
        """Every message written so far, in order."""
        return [message for write in self.writes for message in parse_frames(write)]

    def take(self) -> list[dict[str, Any]]:
        """The messages written since the previous ``take``."""
        messages = self.messages()
        fresh, self._read = messages[self._read :], len(messages)
        return fresh

    async def next_message(self) -> dict[str, Any]:
        """Wait for the next message not yet taken, and take it."""
        while True:
            messages = self.messages()
            if len(messages) > self._read:
                self._read += 1
                return messages[self._read - 1]
            wrote: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            previous = self.on_send

            def wake(conn: FakeConn, data: bytes, wrote: asyncio.Future[None] = wrote) -> None:
                if not wrote.done():
                    wrote.set_result(None)

            self.on_send = wake
            try:
                await wrote
            finally:
                self.on_send = previous


async def next_tick() -> None:
    """Yield exactly one event-loop iteration: callbacks already scheduled with
    ``loop.call_soon`` (the hub's end-of-tick flush) run before this returns.

    This is not a sleep for time: a future resolved by ``call_soon`` wakes the task
    through another ``call_soon``, which the FIFO ready queue runs after the flush.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    loop.call_soon(done.set_result, None)
    await done


async def connect_peer(
    gateway: Gateway, user_id: str = "user-1", channels: tuple[str, ...] = ()
) -> FakePeer:
    """Create a session for ``user_id`` and connect it as a ``FakePeer``."""
    identity = Identity(user_id, gateway.wall_clock() + 3600, channels)
    peer = FakePeer(gateway.new_session(identity))
    await gateway.connect(peer)
    return peer


async def command(
    gateway: Gateway,
    peer: FakePeer,
    kind: str,
    data: dict[str, Any] | None = None,
    id: str | None = None,
) -> None:
    """Feed one client command through the peer's session and run its effects."""
    message: dict[str, Any] = {"type": kind}
    if data is not None:
        message["data"] = data
    if id is not None:
        message["id"] = id
    effects = peer.session.receive_text(json.dumps(message), gateway.clock())
    await gateway.handle(peer, effects)
