"""The publish load process: keeps N ``POST /api/publish`` (or ``/api/batch``) requests
in flight against one server, and counts acknowledged events.

Run as ``python -m tidings.bench.postload``. It opens ``--concurrency`` keep-alive HTTP/1.1
connections to ``--url`` (127.0.0.1 only), prints ``{"event": "ready"}`` and then obeys one
command per stdin line:

* ``go``: start; every connection sends a request, waits for the answer, sends the next.
* ``mark``: print ``{"event": "mark", "t": <CLOCK_MONOTONIC ns>, "events": <acknowledged
  events so far>, "requests": ..., "failed": ...}``, without pausing the load. The rate of
  a window is the difference of two marks.
* ``stop`` (or end of input, or ``--limit`` seconds after ``go``): let every connection
  finish its request in flight, print one ``{"event": "result", ...}`` line and exit.

Each request carries one event (``--mode single``) or ``--batch`` events (``--mode
batch``) of type ``chat_message`` with about ``--data-bytes`` bytes of data, on channels
``<prefix><i>`` for i in 0..``--channels``-1, in turn. An event counts as acknowledged
when its answer is 200 and holds its ``offset``. The HTTP client is a minimal one of its
own (prebuilt request bytes, Content-Length answers only), so that the load costs little
CPU next to the server it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import sys
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import msgspec

from tidings.bench.system import run_fast

__all__ = ["build_requests", "main"]

_encoder = msgspec.json.Encoder()


def _data(index: int, size: int) -> dict[str, Any]:
    """A ``chat_message`` data object of about ``size`` bytes of JSON."""
    data = {
        "conversation_id": f"conv-{index % 64:02d}",
        "sender_id": f"user-{index:04d}",
        "content": "",
    }
    pad = max(0, size - len(_encoder.encode(data)))
    data["content"] = ("lorem ipsum dolor sit amet " * (pad // 27 + 1))[:pad]
    return data


def build_requests(
    *,
    host: str,
    port: int,
    key: str,
    mode: str,
    batch: int,
    channels: int,
    prefix: str,
    data_bytes: int,
) -> list[bytes]:
    """The raw HTTP/1.1 requests the load cycles through: one per channel (single), or
    one per starting channel with ``batch`` events spread over the channels (batch)."""
    requests = []
    for start in range(channels):
        if mode == "single":
            path = "/api/publish"
            body = _encoder.encode(
                {
                    "channel": f"{prefix}{start}",
                    "type": "chat_message",
                    "data": _data(start, data_bytes),
                }
            )
        else:
            path = "/api/batch"
            body = _encoder.encode(
                {
                    "events": [
                        {
                            "channel": f"{prefix}{(start + i) % channels}",
                            "type": "chat_message",
                            "data": _data(start + i, data_bytes),
                        }
                        for i in range(batch)
                    ]
                }
            )
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        requests.append(head.encode() + body)
    return requests


class _Stats:
    def __init__(self) -> None:
        self.events = 0
        self.requests = 0
        self.failed = 0
        self.statuses: dict[str, int] = {}
        self.errors: list[str] = []
        self.latencies: list[float] = []


_MAX_LATENCIES = 1_000_000


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bytes]:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length is None:
        raise ValueError("an answer without Content-Length")
    return status, await reader.readexactly(length)


async def _worker(
    index: int,
    requests: list[bytes],
    stopping: asyncio.Event,
    stats: _Stats,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    cycle = itertools.cycle(requests[index % len(requests) :] + requests[: index % len(requests)])
    try:
        while not stopping.is_set():
            began = time.monotonic()
            try:
                status, body = await _exchange(reader, writer, next(cycle))
            except (
                OSError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                ValueError,
                IndexError,
            ) as exc:
                stats.failed += 1
                stats.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                return
            if len(stats.latencies) < _MAX_LATENCIES:
                stats.latencies.append(time.monotonic() - began)
            stats.statuses[str(status)] = stats.statuses.get(str(status), 0) + 1
            acked = body.count(b'"offset"') if status == 200 else 0
            if acked:
                stats.requests += 1
                stats.events += acked
            else:
                stats.failed += 1
                if len(stats.errors) < 5:
                    stats.errors.append(f"{status}: {body[:200].decode(errors='replace')}")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def _stdin_lines(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[str]:
    """Lines of stdin ('' at its end), read by a daemon thread that never delays exit."""
    queue: asyncio.Queue[str] = asyncio.Queue()

    def read() -> None:
        while True:
            line = sys.stdin.readline()
            try:
                loop.call_soon_threadsafe(queue.put_nowait, line)
            except RuntimeError:  # the loop is closed: nobody listens any more
                return
            if not line:
                return

    threading.Thread(target=read, name="stdin", daemon=True).start()
    return queue


def _print(message: dict[str, Any]) -> None:
    sys.stdout.write(_encoder.encode(message).decode() + "\n")
    sys.stdout.flush()


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    split = urlsplit(args.url)
    host, port = split.hostname or "", split.port or 80
    if host != "127.0.0.1":
        raise SystemExit("postload only talks to 127.0.0.1")
    requests = build_requests(
        host=host,
        port=port,
        key=args.key,
        mode=args.mode,
        batch=args.batch,
        channels=args.channels,
        prefix=args.prefix,
        data_bytes=args.data_bytes,
    )
    opened = [await asyncio.open_connection(host, port) for _ in range(args.concurrency)]
    stats = _Stats()
    stopping = asyncio.Event()
    commands = _stdin_lines(asyncio.get_running_loop())
    _print({"event": "ready", "request_bytes": len(requests[0])})
    if (await commands.get()).strip() != "go":
        for _, writer in opened:
            writer.close()
        return {"event": "result", "aborted": True}
    began = time.monotonic_ns()
    workers = [
        asyncio.create_task(_worker(i, requests, stopping, stats, *opened[i]))
        for i in range(args.concurrency)
    ]
    deadline = time.monotonic() + args.limit
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            line = await asyncio.wait_for(commands.get(), remaining)
        except TimeoutError:
            break
        command = line.strip()
        if command == "mark":
            _print(
                {
                    "event": "mark",
                    "t": time.monotonic_ns(),
                    "events": stats.events,
                    "requests": stats.requests,
                    "failed": stats.failed,
                }
            )
        elif command == "stop" or not line:
            break
    stopping.set()
    await asyncio.gather(*workers)
    lat = stats.latencies
    return {
        "event": "result",
        "began": began,
        "ended": time.monotonic_ns(),
        "events": stats.events,
        "requests": stats.requests,
        "failed": stats.failed,
        "statuses": stats.statuses,
        "errors": stats.errors[:5],
        "request_bytes": len(requests[0]),
        "latency_p50_ms": round((_percentile(lat, 0.5) or 0.0) * 1000, 3),
        "latency_p99_ms": round((_percentile(lat, 0.99) or 0.0) * 1000, 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tidings.bench.postload")
    parser.add_argument("--url", required=True, help="http://127.0.0.1:PORT")
    parser.add_argument("--key", default="none", help="API key")
    parser.add_argument("--mode", choices=("single", "batch"), default="single")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--prefix", default="bench:p")
    parser.add_argument("--data-bytes", type=int, default=100)
    parser.add_argument(
        "--limit", type=float, default=120.0, help="stop by itself this many seconds after go"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.concurrency <= 1024 or not 1 <= args.channels <= 10_000:
        parser.error("--concurrency must be 1-1024 and --channels 1-10000")
    result = run_fast(_run(args))
    _print(result)


if __name__ == "__main__":
    main()
