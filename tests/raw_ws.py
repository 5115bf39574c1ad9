"""A hand-made WebSocket client on a plain TCP socket, for tests that need what a
WebSocket library would hide: a reader that stops reading, unmasked or oversized frames,
handshakes with other protocol versions."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Mapping
from typing import Any

from helpers import TIMEOUT, ws_checked
from tidings.server import RunningServer

__all__ = [
    "OP_CLOSE",
    "OP_CONTINUATION",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "RawClient",
    "frame_bytes",
    "raw_client",
    "upgrade_request",
]

OP_TEXT, OP_CONTINUATION, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x0, 0x8, 0x9, 0xA


def frame_bytes(opcode: int, payload: bytes, *, mask: bool = True, fin: bool = True) -> bytes:
    """One client frame; ``mask=False`` builds the unmasked frame RFC 6455 forbids."""
    head = bytes([(0x80 if fin else 0) | opcode])
    size = len(payload)
    bit = 0x80 if mask else 0
    if size < 126:
        head += bytes([bit | size])
    elif size < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", size)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", size)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def upgrade_request(
    server: RunningServer,
    tok: str | None,
    *,
    version: str = "13",
    headers: Mapping[str, str] | None = None,
) -> bytes:
    """A WebSocket upgrade request head; ``headers`` replace or add fields."""
    fields = {
        "Host": f"{server.host}:{server.port}",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": version,
        **(headers or {}),
    }
    query = f"?token={tok}" if tok is not None else ""
    head = (
        f"GET {server.settings.server.path}{query} HTTP/1.1\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in fields.items())
        + "\r\n"
    )
    return head.encode()


class RawClient:
    """A hand-made WebSocket client on a plain TCP socket that reads only when told to."""

    def __init__(self, sock: socket.socket, buffer: bytes) -> None:
        self.sock = sock
        self.buffer = buffer

    @classmethod
    async def request(
        cls,
        server: RunningServer,
        tok: str | None,
        *,
        version: str = "13",
        extra: bytes = b"",
        rcvbuf: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[RawClient, bytes]:
        """Send an upgrade request (and ``extra`` bytes in the same write); return the
        client, holding what followed the response head, and that head."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        await loop.sock_connect(sock, (server.host, server.port))
        client = cls(sock, b"")
        await client.send_raw(
            upgrade_request(server, tok, version=version, headers=headers) + extra
        )
        return client, await client.response_head()

    @classmethod
    async def open(
        cls, server: RunningServer, tok: str, *, extra: bytes = b"", rcvbuf: int | None = None
    ) -> RawClient:
        """A client past a successful handshake (``connected`` not yet read)."""
        client, head = await cls.request(server, tok, extra=extra, rcvbuf=rcvbuf)
        assert head.startswith(b"HTTP/1.1 101"), head
        return client

    async def response_head(self) -> bytes:
        """The HTTP response head; what follows it stays in the buffer."""
        while b"\r\n\r\n" not in self.buffer:
            await self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        return head

    async def _recv(self) -> bytes:
        return await asyncio.get_running_loop().sock_recv(self.sock, 65536)

    async def _fill(self) -> None:
        chunk = await asyncio.wait_for(self._recv(), TIMEOUT)
        if not chunk:
            raise EOFError
        self.buffer += chunk

    def _parse(self) -> tuple[int, bytes] | None:
        buf = self.buffer
        if len(buf) < 2:
            return None
        assert not buf[1] & 0x80, "server frames are never masked"
        opcode, length, pos = buf[0] & 0x0F, buf[1] & 0x7F, 2
        if length == 126:
            if len(buf) < 4:
                return None
            (length,), pos = struct.unpack("!H", buf[2:4]), 4
        elif length == 127:
            if len(buf) < 10:
                return None
            (length,), pos = struct.unpack("!Q", buf[2:10]), 10
        if len(buf) < pos + length:
            return None
        self.buffer = buf[pos + length :]
        return opcode, buf[pos : pos + length]

    async def frame(self) -> tuple[int, bytes]:
        while (parsed := self._parse()) is None:
            await self._fill()
        return parsed

    async def recv(self) -> dict[str, Any]:
        opcode, payload = await self.frame()
        assert opcode == OP_TEXT, (opcode, payload)
        return ws_checked(payload.decode())

    async def send_raw(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def send(self, message: Mapping[str, Any]) -> None:
        await self.send_raw(frame_bytes(OP_TEXT, json.dumps(message).encode()))

    async def until_close(self) -> tuple[list[tuple[int, bytes]], int]:
        """Every frame before the server's close frame, and the close code."""
        frames: list[tuple[int, bytes]] = []
        while True:
            opcode, payload = await self.frame()
            if opcode == OP_CLOSE:
                return frames, struct.unpack("!H", payload[:2])[0]
            frames.append((opcode, payload))

    async def read_to_end(self) -> list[tuple[int, bytes]]:
        """Every remaining complete frame until EOF or reset."""
        frames: list[tuple[int, bytes]] = []
        with contextlib.suppress(EOFError, ConnectionResetError):
            while True:
                frames.append(await self.frame())
        return frames

    def close(self) -> None:
        self.sock.close()


@contextlib.asynccontextmanager
async def raw_client(server: RunningServer, tok: str, **kwargs: Any) -> AsyncIterator[RawClient]:
    """A raw client whose ``connected`` message has been read."""
    client = await RawClient.open(server, tok, **kwargs)
    try:
        assert (await client.recv())["type"] == "connected"
        yield client
    finally:
        client.close()
