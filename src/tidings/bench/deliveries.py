"""Publishing events to a server under test and counting their deliveries: a publisher
process on the load CPU, the CPU readings around it, and the figures the fan-out and
latency scenarios (single node and through Redis) share.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from tidings.bench.context import GEN_BOTTLENECK_PERCENT, Context, RunError
from tidings.bench.generator import Generator
from tidings.bench.servers import CHANNEL, Server
from tidings.bench.system import Proc, core_busy, cpu_percent, cpu_sample, foreign_cpu

__all__ = [
    "calibrated_events",
    "common_figures",
    "latency_figures",
    "latency_ms",
    "publish_and_count",
    "warmup_events",
]


def _publisher(ctx: Context, server: Server, events: int, *, rate: float = 0.0) -> Proc:
    """A publisher process on the load CPU, ready and waiting for ``go``."""
    argv = [
        sys.executable,
        "-m",
        "tidings.bench.publisher",
        "--url",
        server.http_url,
        "--key",
        ctx.credentials.api_key,
        "--channel",
        CHANNEL,
        "--events",
        str(events),
        "--batch",
        str(ctx.batch),
        "--concurrency",
        str(ctx.publishers),
        "--rate",
        str(rate),
    ]
    proc = Proc(argv, cpu=ctx.pinning.load_cpu, pinning=ctx.pinning, name="publisher")
    line = proc.readline(60)
    if '"ready"' not in line:
        proc.stop()
        raise RunError(f"publisher did not start: {line} {proc.stderr()}")
    return proc


def publish_and_count(
    ctx: Context,
    server: Server,
    gen: Generator,
    events: int,
    subscribers: int,
    *,
    rate: float = 0.0,
    limit: float = 600.0,
    others: tuple[int, ...] = (),
) -> dict[str, Any]:
    """Publish ``events`` and wait until every subscriber has them (or an idle timeout).

    ``others``: PIDs of further server-side processes (other nodes, the broker) whose CPU
    is counted with the server's.
    """
    publisher = _publisher(ctx, server, events, rate=rate)
    try:
        gen.start_measure(events * subscribers, idle=5.0, limit=limit)
        pids = [server.pid, gen.pid, publisher.pid, *others]
        before = cpu_sample(pids, ctx.cores)
        publisher.send("go")
        done = gen.done(limit)
        after = cpu_sample(pids, ctx.cores)
        published = _result(publisher.readline(limit + 60))
    finally:
        publisher.stop()
        publisher.discard()
    first_send = int(published.get("first_send") or done["t_start"])
    last_rx = int(done["last_rx"]) or int(done["t_end"])
    seconds = max(1e-9, (last_rx - first_send) / 1e9)
    return {
        "done": done,
        "published": published,
        "seconds": seconds,
        "server_cpu": round(
            sum(cpu_percent(before, after, pid) for pid in (server.pid, *others)), 1
        ),
        "gen_cpu": round(cpu_percent(before, after, gen.pid), 1),
        "publisher_cpu": round(cpu_percent(before, after, publisher.pid), 1),
        "server_core_busy": _round(core_busy(before, after, ctx.pinning.server_cpu)),
        "load_core_busy": _round(core_busy(before, after, ctx.pinning.load_cpu)),
        "foreign_cpu": _round(foreign_cpu(before, after)),
    }


def _result(line: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(line)
    return value


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def latency_ms(done: dict[str, Any], key: str) -> float | None:
    """The generator's latency percentile ``key`` (µs) in ms; None without samples."""
    lat = done.get("lat", {})
    if not lat.get("count"):
        return None
    return round(float(lat[key]) / 1000.0, 3)


def common_figures(measured: dict[str, Any], expected: int) -> dict[str, Any]:
    """The figures of a measured ``publish_and_count`` that every delivery scenario reports."""
    done = measured["done"]
    return {
        "expected": expected,
        "received": int(done["frames"]),
        "frame_bytes": round(done["bytes"] / done["frames"], 1) if done["frames"] else None,
        "closed": int(done["closed_after_ready"]),
        "close_codes": done["close_codes"],
        "end": done["reason"],
        "server_cpu": measured["server_cpu"],
        "gen_cpu": measured["gen_cpu"],
        "publisher_cpu": measured["publisher_cpu"],
        "server_core_busy": measured["server_core_busy"],
        "load_core_busy": measured["load_core_busy"],
        "foreign_cpu": measured["foreign_cpu"],
        "publish_failed": int(measured["published"].get("failed", 0)),
        "lower_bound": measured["gen_cpu"] > GEN_BOTTLENECK_PERCENT,
    }


def calibrated_events(
    ctx: Context, warm: dict[str, Any], subscribers: int, seconds: float, maximum: int
) -> int:
    """Events (a multiple of the batch size) to fill ``seconds`` at the rate of ``warm``."""
    rate = warm["done"]["frames"] / warm["seconds"]
    count = int(min(maximum, max(10, rate * seconds / subscribers)))
    return count // ctx.batch * ctx.batch if count >= ctx.batch else count


def warmup_events(ctx: Context, subscribers: int) -> int:
    """Warm-up events: two batches, fewer for many subscribers (slow peers take long)."""
    return max(10, min(ctx.batch * 2, 200_000 // subscribers))


def latency_figures(
    measured: dict[str, Any], events: int, subscribers: int, rate: float
) -> dict[str, Any]:
    """The figures of a latency run: percentiles, and whether the server kept up."""
    done = measured["done"]
    figures = common_figures(measured, events * subscribers)
    published = measured["published"]
    saturated = (
        figures["received"] < figures["expected"]
        or (latency_ms(done, "p50_us") or 0.0) > 1000.0
        or published.get("behind_schedule", 0) > events // 10
    )
    figures.update(
        {
            "value": latency_ms(done, "p99_us"),
            "p50_ms": latency_ms(done, "p50_us"),
            "p90_ms": latency_ms(done, "p90_us"),
            "p99_ms": latency_ms(done, "p99_us"),
            "p999_ms": latency_ms(done, "p999_us"),
            "max_ms": latency_ms(done, "max_us"),
            "mean_ms": latency_ms(done, "mean_us"),
            "samples": int(done.get("lat", {}).get("count", 0)),
            "events": events,
            "rate": rate,
            "subscribers": subscribers,
            "saturated": saturated,
            "deliveries_per_s": round(done["frames"] / measured["seconds"]),
        }
    )
    return figures
