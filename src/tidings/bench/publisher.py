"""The publisher process: POSTs ``chat_message`` events to ``/api/batch``.

Run as ``python -m tidings.bench.publisher``. It prints ``{"event": "ready"}``, waits for
``go`` on stdin, publishes, and prints one ``{"event": "result", ...}`` line. Every event
carries ``data.ts``, the publisher's CLOCK_MONOTONIC time in nanoseconds when the request
was built, which the load generator turns into publish-to-receipt latency.

Two modes: *burst* (``--rate 0``): ``--events`` events in requests of ``--batch``, from
``--concurrency`` requests in flight, as fast as the server accepts them; *paced*
(``--rate R``): one event per request on a fixed schedule of R a second, requests never
waiting for one another (at most 256 in flight).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import aiohttp
import msgspec

from tidings.bench.system import run_fast

__all__ = ["event_data", "main"]

_encoder = msgspec.json.Encoder()

#: Pads ``content`` so that an event's data is about 150 bytes of JSON.
_CONTENT = "The quick brown fox jumps over the lazy dog; benchmarks say hello."


def event_data(index: int, ts: int) -> dict[str, Any]:
    """A ``chat_message`` data object of about 150 bytes carrying the timestamp ``ts``."""
    return {
        "conversation_id": "conv-bench",
        "sender_id": f"user-{index % 1000:04d}",
        "content": _CONTENT,
        "ts": ts,
    }


def _body(channel: str, start: int, count: int) -> bytes:
    ts = time.monotonic_ns()
    return _encoder.encode(
        {
            "events": [
                {"channel": channel, "type": "chat_message", "data": event_data(start + i, ts)}
                for i in range(count)
            ]
        }
    )


class _Stats:
    def __init__(self) -> None:
        self.first_send = 0
        self.last_ack = 0
        self.sent = 0
        self.accepted = 0
        self.failed = 0
        self.statuses: dict[str, int] = {}
        self.behind = 0
        self.max_lag = 0.0


async def _post(
    http: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    body: bytes,
    count: int,
    stats: _Stats,
) -> None:
    if not stats.first_send:
        stats.first_send = time.monotonic_ns()
    stats.sent += count
    try:
        async with http.post(url, data=body, headers=headers) as response:
            await response.read()
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        stats.failed += count
        stats.statuses[type(exc).__name__] = stats.statuses.get(type(exc).__name__, 0) + 1
        return
    stats.statuses[str(status)] = stats.statuses.get(str(status), 0) + 1
    if status == 200:
        stats.accepted += count
        stats.last_ack = time.monotonic_ns()
    else:
        stats.failed += count


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    url = args.url.rstrip("/") + "/api/batch"
    headers = {"Authorization": f"Bearer {args.key}", "Content-Type": "application/json"}
    stats = _Stats()
    connector = aiohttp.TCPConnector(limit=max(args.concurrency, 1 if args.rate == 0 else 64))
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        print('{"event": "ready"}', flush=True)
        loop = asyncio.get_running_loop()
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if line.strip() != "go":
            return {"event": "result", "aborted": True}
        if args.rate <= 0:
            batches = [
                (start, min(args.batch, args.events - start))
                for start in range(0, args.events, args.batch)
            ]
            queue = iter(batches)

            async def worker() -> None:
                for start, count in queue:
                    await _post(http, url, headers, _body(args.channel, start, count), count, stats)

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        else:
            period = 1.0 / args.rate
            limit = asyncio.Semaphore(256)
            tasks: set[asyncio.Task[None]] = set()
            begin = time.monotonic()

            async def one(index: int) -> None:
                try:
                    await _post(http, url, headers, _body(args.channel, index, 1), 1, stats)
                finally:
                    limit.release()

            for index in range(args.events):
                target = begin + index * period
                delay = target - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    stats.behind += 1
                    stats.max_lag = max(stats.max_lag, -delay)
                await limit.acquire()
                task = asyncio.create_task(one(index))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
    return {
        "event": "result",
        "first_send": stats.first_send,
        "last_ack": stats.last_ack,
        "sent": stats.sent,
        "accepted": stats.accepted,
        "failed": stats.failed,
        "statuses": stats.statuses,
        "behind_schedule": stats.behind,
        "max_lag_ms": round(stats.max_lag * 1000, 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tidings.bench.publisher")
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", default="none")
    parser.add_argument("--channel", default="bench:fan")
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    result = run_fast(_run(args))
    sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
