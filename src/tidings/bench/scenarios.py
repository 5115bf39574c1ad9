"""One run of each scenario against one freshly started server.

Every function starts its own server (pinned to the server CPU), its own load generator
(pinned to the other CPU) and, where events are published, a publisher process on the
load CPU; it returns the figures of that one run as a flat dict, and stops every process
it started by PID before returning.

What a run needs is ``tidings.bench.context`` (re-exported here); publishing and counting
deliveries, ``tidings.bench.deliveries``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from tidings.bench.cluster import start_cluster
from tidings.bench.context import (
    GEN_BOTTLENECK_PERCENT,
    Context,
    RunError,
    connect_all,
    generator_for,
    server_for,
)
from tidings.bench.deliveries import (
    calibrated_events,
    common_figures,
    latency_figures,
    latency_ms,
    publish_and_count,
    warmup_events,
)
from tidings.bench.generator import Generator
from tidings.bench.servers import CHANNEL, Server, ServerKind, start_redis
from tidings.bench.system import core_busy, cpu_percent, cpu_sample, foreign_cpu, rss_bytes

__all__ = [
    "GEN_BOTTLENECK_PERCENT",
    "Context",
    "RunError",
    "fanout",
    "handshakes",
    "idle_memory",
    "latency",
    "redis_fanout",
    "redis_latency",
]


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def fanout(
    ctx: Context,
    kind: ServerKind,
    subscribers: int,
    *,
    seconds: float,
    events: int | None,
    max_events: int = 200_000,
) -> dict[str, Any]:
    """Deliveries per second: bursts of ``batch`` events per request, as fast as accepted."""
    with server_for(ctx, kind) as server:
        gen = generator_for(
            ctx, server, kind, subscribers, subscribe=True, sample_every=max(1, subscribers // 100)
        )
        try:
            ready = connect_all(gen, server, subscribers)
            # Warm-up, which also calibrates how many events fill ``seconds``; a measured
            # run shorter than half of ``seconds`` counts as warm-up too, and is repeated
            # with more events.
            warm = publish_and_count(ctx, server, gen, warmup_events(ctx, subscribers), subscribers)
            for _ in range(3):
                count = events or calibrated_events(ctx, warm, subscribers, seconds, max_events)
                measured = publish_and_count(
                    ctx, server, gen, count, subscribers, limit=max(120.0, seconds * 20)
                )
                if events or measured["seconds"] >= seconds / 2 or count >= max_events:
                    break
                warm = measured
        finally:
            gen.close()
    done = measured["done"]
    figures = common_figures(measured, count * subscribers)
    figures.update(
        {
            "value": round(done["frames"] / measured["seconds"]),
            "events": count,
            "subscribers": subscribers,
            "seconds": round(measured["seconds"], 3),
            "setup_seconds": round((ready.t_last_ready - ready.t_first_start) / 1e9, 3),
            "sampled_p50_ms": latency_ms(done, "p50_us"),
            "sampled_p99_ms": latency_ms(done, "p99_us"),
        }
    )
    return figures


def latency(
    ctx: Context,
    kind: ServerKind,
    subscribers: int,
    rate: float,
    *,
    seconds: float,
    warmup: float = 1.0,
) -> dict[str, Any]:
    """Publish-to-receipt latency at a fixed rate, one event per request."""
    with server_for(ctx, kind) as server:
        gen = generator_for(ctx, server, kind, subscribers, subscribe=True, sample_every=1)
        try:
            connect_all(gen, server, subscribers)
            warm_events = max(1, int(rate * warmup))
            publish_and_count(
                ctx, server, gen, warm_events, subscribers, rate=rate, limit=warmup * 3 + 30
            )
            events = max(1, int(rate * seconds))
            measured = publish_and_count(
                ctx, server, gen, events, subscribers, rate=rate, limit=seconds * 3 + 30
            )
        finally:
            gen.close()
    return latency_figures(measured, events, subscribers, rate)


def _settled_rss(pid: int, limit: float = 15.0) -> int:
    """RSS once two readings half a second apart differ by less than 0.2%."""
    deadline = time.monotonic() + limit
    last = rss_bytes(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = rss_bytes(pid)
        if abs(now - last) <= 0.002 * max(now, 1):
            return now
        last = now
    return last


def idle_memory(
    ctx: Context, kind: ServerKind, connections: int, *, warm: int = 200
) -> dict[str, Any]:
    """Server RSS growth per idle authenticated connection (warm-up connections excluded)."""
    with server_for(ctx, kind) as server:
        warm_gen = generator_for(ctx, server, kind, warm, subscribe=False, sample_every=0)
        gen: Generator | None = None
        try:
            connect_all(warm_gen, server, warm)
            before = _settled_rss(server.pid)
            gen = generator_for(ctx, server, kind, connections, subscribe=False, sample_every=0)
            cpu_before = cpu_sample([server.pid, gen.pid], ctx.cores)
            ready = connect_all(gen, server, connections)
            cpu_after = cpu_sample([server.pid, gen.pid], ctx.cores)
            after = _settled_rss(server.pid)
        finally:
            if gen is not None:
                gen.close()
            warm_gen.close()
    growth = after - before
    gen_cpu = round(cpu_percent(cpu_before, cpu_after, gen.pid), 1)
    return {
        "value": round(growth / connections / 1024, 2),
        "connections": connections,
        "rss_before_mib": round(before / 2**20, 1),
        "rss_after_mib": round(after / 2**20, 1),
        "handshakes_per_s": round(
            ready.connected / max(1e-9, (ready.t_last_connected - ready.t_first_start) / 1e9)
        ),
        "server_cpu": round(cpu_percent(cpu_before, cpu_after, server.pid), 1),
        "server_core_busy": _round(core_busy(cpu_before, cpu_after, ctx.pinning.server_cpu)),
        "gen_cpu": gen_cpu,
        "foreign_cpu": _round(foreign_cpu(cpu_before, cpu_after)),
        "lower_bound": False,
    }


def handshakes(ctx: Context, kind: ServerKind, count: int, *, concurrency: int) -> dict[str, Any]:
    """Connections per second completed to the server's ``connected`` message."""
    with server_for(ctx, kind) as server:
        # A few connections first, so that imports and caches are warm.
        warm_gen = generator_for(ctx, server, kind, 50, subscribe=False, sample_every=0)
        gen: Generator | None = None
        try:
            connect_all(warm_gen, server, 50)
            gen = generator_for(
                ctx, server, kind, count, subscribe=False, sample_every=0, concurrency=concurrency
            )
            before = cpu_sample([server.pid, gen.pid], ctx.cores)
            ready = connect_all(gen, server, count)
            after = cpu_sample([server.pid, gen.pid], ctx.cores)
        finally:
            if gen is not None:
                gen.close()
            warm_gen.close()
    seconds = max(1e-9, (ready.t_last_connected - ready.t_first_start) / 1e9)
    gen_cpu = round(cpu_percent(before, after, gen.pid), 1)
    return {
        "value": round(ready.connected / seconds),
        "connections": count,
        "concurrency": concurrency,
        "seconds": round(seconds, 3),
        "server_cpu": round(cpu_percent(before, after, server.pid), 1),
        "gen_cpu": gen_cpu,
        "server_core_busy": _round(core_busy(before, after, ctx.pinning.server_cpu)),
        "load_core_busy": _round(core_busy(before, after, ctx.pinning.load_cpu)),
        "foreign_cpu": _round(foreign_cpu(before, after)),
        "lower_bound": gen_cpu > GEN_BOTTLENECK_PERCENT,
    }


def _redis_cluster_run(
    ctx: Context,
    kind: ServerKind,
    subscribers: int,
    body: Any,
    *,
    sample_every: int,
    cluster: bool = False,
) -> dict[str, Any]:
    """Start Redis (one redis-server, or with ``cluster`` a 3-shard Redis Cluster without
    replicas) and two Tidings nodes on the server CPU, connect ``subscribers`` spread
    over both nodes, and run ``body(node_a, gen, others)``."""
    with contextlib.ExitStack() as stack:
        if cluster:
            engine = stack.enter_context(start_cluster(ctx.pinning, 3, 0))
            url, broker_pids = engine.url, engine.pids
        else:
            redis_proc, url = stack.enter_context(start_redis(ctx.pinning))
            broker_pids = (redis_proc.pid,)
        node_a = stack.enter_context(server_for(ctx, kind, url))
        node_b = stack.enter_context(server_for(ctx, kind, url))
        gen = Generator(
            ctx.exe,
            port=[node_a.port, node_b.port],
            mode=kind.gen_mode,
            conns=subscribers,
            tokens=ctx.tokens_for(subscribers),
            path=kind.ws_path,
            channel=CHANNEL,
            subscribe=True,
            concurrency=ctx.concurrency,
            sample_every=sample_every,
            pinning=ctx.pinning,
            setup_timeout=ctx.setup_timeout,
        )
        stack.callback(gen.close)
        connect_all(gen, node_a, subscribers)
        result: dict[str, Any] = body(node_a, gen, (node_b.pid, *broker_pids))
        return result


def redis_fanout(
    ctx: Context,
    kind: ServerKind,
    subscribers: int,
    *,
    seconds: float,
    events: int | None,
    cluster: bool = False,
) -> dict[str, Any]:
    """Fan-out through the Redis broker: publishes to node A, subscribers on A and B;
    through a 3-shard Redis Cluster with ``cluster``."""

    def body(node: Server, gen: Generator, others: tuple[int, ...]) -> dict[str, Any]:
        warm = publish_and_count(
            ctx, node, gen, warmup_events(ctx, subscribers), subscribers, others=others
        )
        count = events or calibrated_events(ctx, warm, subscribers, seconds, 200_000)
        measured = publish_and_count(
            ctx, node, gen, count, subscribers, limit=max(120.0, seconds * 20), others=others
        )
        figures = common_figures(measured, count * subscribers)
        done = measured["done"]
        figures.update(
            {
                "value": round(done["frames"] / measured["seconds"]),
                "events": count,
                "subscribers": subscribers,
                "nodes": 2,
                "shards": 3 if cluster else 1,
                "seconds": round(measured["seconds"], 3),
                "sampled_p50_ms": latency_ms(done, "p50_us"),
                "sampled_p99_ms": latency_ms(done, "p99_us"),
            }
        )
        return figures

    return _redis_cluster_run(
        ctx, kind, subscribers, body, sample_every=max(1, subscribers // 100), cluster=cluster
    )


def redis_latency(
    ctx: Context,
    kind: ServerKind,
    subscribers: int,
    rate: float,
    *,
    seconds: float,
    warmup: float = 1.0,
) -> dict[str, Any]:
    """Publish-to-receipt latency through the Redis broker (two nodes)."""

    def body(node: Server, gen: Generator, others: tuple[int, ...]) -> dict[str, Any]:
        publish_and_count(
            ctx,
            node,
            gen,
            max(1, int(rate * warmup)),
            subscribers,
            rate=rate,
            limit=warmup * 3 + 30,
            others=others,
        )
        count = max(1, int(rate * seconds))
        measured = publish_and_count(
            ctx, node, gen, count, subscribers, rate=rate, limit=seconds * 3 + 30, others=others
        )
        return latency_figures(measured, count, subscribers, rate) | {"nodes": 2}

    return _redis_cluster_run(ctx, kind, subscribers, body, sample_every=1)
