"""Fan-out with and without permessage-deflate: deliveries/s, server CPU, bytes on the wire.

``python -m tidings.bench.deflate [--subscribers N] [--events N]`` starts a Tidings server
twice (``server.permessage_deflate`` off, then on), connects ``N`` subscribers from
this process (hand-made WebSocket clients that offer the extension when it is on and
count every byte they read), publishes ``--events`` events of about 400 bytes in batches
through the server API, and prints one row per mode. The clients are Python, so with
many subscribers they may be the bottleneck: the server CPU column says how busy the
server was. Every process it starts is stopped by PID before it returns.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import struct
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from tidings.auth import mint_token
from tidings.bench.servers import CHANNEL, KINDS, Credentials, Server, start_server
from tidings.bench.system import Pinning, cpu_percent, cpu_sample

__all__ = ["Row", "main", "measure"]

_OFFER = b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
_BATCH = 50
_TIMEOUT = 120.0


@dataclass(slots=True)
class Row:
    """One mode's figures."""

    deflate: bool
    negotiated: int
    deliveries: int
    seconds: float
    server_cpu: float
    wire_bytes: int

    def line(self) -> str:
        per_s = self.deliveries / self.seconds if self.seconds else 0.0
        per = self.wire_bytes / self.deliveries if self.deliveries else 0.0
        return (
            f"{'on' if self.deflate else 'off':<8}{self.negotiated:>11}"
            f"{self.deliveries:>12,}{per_s:>15,.0f}{self.server_cpu:>12.0f}%"
            f"{self.server_cpu * self.seconds / 100:>14.3f}"
            f"{self.wire_bytes / 1e6:>12.2f}{per:>14.1f}"
        )


HEADER = (
    f"{'deflate':<8}{'negotiated':>11}{'deliveries':>12}{'deliveries/s':>15}"
    f"{'server CPU':>13}{'server CPU s':>14}{'wire MB':>12}{'bytes/deliv.':>14}"
)


class _Subscriber:
    """A subscriber on a raw socket: counts bytes read and text frames after ``start``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.bytes = 0
        self.frames = 0
        self.compressed = False

    async def frame(self) -> tuple[int, bytes]:
        head = await self.reader.readexactly(2)
        length = head[1] & 0x7F
        extra = b""
        if length == 126:
            extra = await self.reader.readexactly(2)
            length = struct.unpack("!H", extra)[0]
        elif length == 127:
            extra = await self.reader.readexactly(8)
            length = struct.unpack("!Q", extra)[0]
        payload = await self.reader.readexactly(length)
        self.bytes += 2 + len(extra) + length
        return head[0], payload

    async def count(self, expected: int, done: asyncio.Event, counter: list[int]) -> None:
        while self.frames < expected:
            first, _ = await self.frame()
            if first & 0x0F == 0x1:
                self.frames += 1
                counter[0] += 1
                if counter[0] >= counter[1]:
                    done.set()


def _client_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x81, 0x80 | len(payload))) + mask + body


async def _subscribe(port: int, tok: str, offer: bool) -> _Subscriber:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /ws?token={tok} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n".encode()
        + (_OFFER if offer else b"")
        + b"\r\n"
    )
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"handshake refused: {head[:60]!r}")
    sub = _Subscriber(reader, writer)
    sub.compressed = b"permessage-deflate" in head.lower()
    await sub.frame()  # connected
    command = json.dumps({"type": "subscribe", "id": "s", "data": {"channel": CHANNEL}})
    writer.write(_client_frame(command.encode()))
    await sub.frame()  # subscribed
    sub.bytes = 0  # count the deliveries only
    return sub


def _event(index: int) -> dict[str, Any]:
    return {
        "channel": CHANNEL,
        "type": "chat_message",
        "data": {
            "conversation_id": "c-42",
            "sender_id": f"user-{index % 97}",
            "content": f"Message {index}: the shipment for order o-{index} left "
            "the warehouse and should arrive on Thursday; track it "
            "from the orders page or reply here with questions.",
        },
    }


async def _run(
    server: Server, credentials: Credentials, subscribers: int, events: int, offer: bool
) -> Row:
    subs = [
        await _subscribe(
            server.port,
            mint_token(credentials.secret, f"deflate-{i}", channels=["bench:*"], ttl=3600),
            offer,
        )
        for i in range(subscribers)
    ]
    done = asyncio.Event()
    counter = [0, subscribers * events]
    tasks = [asyncio.ensure_future(sub.count(events, done, counter)) for sub in subs]
    headers = {"Authorization": f"Bearer {credentials.api_key}"}
    try:
        before = cpu_sample([server.pid], [])
        started = time.perf_counter()
        async with aiohttp.ClientSession(headers=headers) as session:
            for first in range(0, events, _BATCH):
                batch = [_event(i) for i in range(first, min(events, first + _BATCH))]
                async with session.post(
                    server.http_url + "/api/batch", json={"events": batch}
                ) as response:
                    if response.status != 200:
                        raise RuntimeError(f"publish failed: {response.status}")
        await asyncio.wait_for(done.wait(), _TIMEOUT)
        seconds = time.perf_counter() - started
        after = cpu_sample([server.pid], [])
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sub in subs:
            sub.writer.close()
    return Row(
        offer,
        sum(sub.compressed for sub in subs),
        counter[0],
        seconds,
        cpu_percent(before, after, server.pid),
        sum(sub.bytes for sub in subs),
    )


def measure(subscribers: int, events: int) -> list[Row]:
    """Run both modes, each against its own server; the rows, off first."""
    credentials = Credentials.generate()
    rows = []
    for deflate in (False, True):
        env = {
            "TIDINGS_SERVER__PERMESSAGE_DEFLATE": "true" if deflate else "false",
            "TIDINGS_API__MAX_BATCH": str(_BATCH),
        }
        with start_server(
            KINDS["tidings"],
            Pinning("none", None, None),
            credentials,
            send_buffer=64 * 1024 * 1024,
            env=env,
        ) as server:
            rows.append(asyncio.run(_run(server, credentials, subscribers, events, deflate)))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--subscribers", type=int, default=200)
    parser.add_argument("--events", type=int, default=500)
    args = parser.parse_args(argv)
    print(
        f"{args.subscribers} subscribers of one channel, {args.events} events "
        f"(~400-byte payloads, batches of {_BATCH})"
    )
    print(HEADER)
    for row in measure(args.subscribers, args.events):
        print(row.line())


if __name__ == "__main__":
    main()
