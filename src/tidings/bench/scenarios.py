"""One run of each scenario against one freshly started server.

Every function starts its own server (pinned to the server CPU), its own load generator
(pinned to the other CPU) and, where events are published, a publisher process on the
load CPU; it returns the figures of that one run as a flat dict, and stops every process
it started by PID before returning.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tidings.bench.cluster import start_cluster
from tidings.bench.generator import Generator
from tidings.bench.servers import (
    CHANNEL,
    Credentials,
    Server,
    ServerKind,
    start_redis,
    start_server,
)
from tidings.bench.system import (
    Pinning,
    Proc,
    core_busy,
    cpu_percent,
    cpu_sample,
    foreign_cpu,
    rss_bytes,
)

__all__ = ["Context", "RunError", "fanout", "handshakes", "idle_memory", "latency",
           "redis_fanout", "redis_latency"]

#: A figure is a lower bound when the load generator used more than this share of its core.
GEN_BOTTLENECK_PERCENT = 90.0


class RunError(RuntimeError):
    """A run could not produce its figure (connections refused, server died, ...)."""


@dataclass(slots=True)
class Context:
    """What every run needs: the generator, pinning, credentials and tuning knobs."""

    exe: Path
    pinning: Pinning
    credentials: Credentials
    tokens: dict[int, Path]
    send_buffer: int = 64 * 1024 * 1024
    batch: int = 50
    publishers: int = 4
    concurrency: int = 100
    setup_timeout: float = 180.0
    #: More environment for every server under test (``--otel``: its ``OTEL_*``).
    server_env: dict[str, str] = field(default_factory=dict)

    @property
    def cores(self) -> list[int | None]:
        return [self.pinning.server_cpu, self.pinning.load_cpu]

    def tokens_for(self, count: int) -> Path:
        best = min((n for n in self.tokens if n >= count), default=None)
        if best is None:
            raise RunError(f"no token file for {count} connections")
        return self.tokens[best]


def _server(ctx: Context, kind: ServerKind, broker: str | None = None
            ) -> contextlib.AbstractContextManager[Server]:
    """``kind`` started for a run of ``ctx`` (on ``broker``, when given)."""
    return start_server(kind, ctx.pinning, ctx.credentials, send_buffer=ctx.send_buffer,
                        broker=broker, env=ctx.server_env)


def _generator(ctx: Context, server: Server, kind: ServerKind, conns: int, *,
               subscribe: bool, sample_every: int, concurrency: int | None = None) -> Generator:
    return Generator(ctx.exe, port=server.port, mode=kind.gen_mode, conns=conns,
                     tokens=ctx.tokens_for(conns), path=kind.ws_path, channel=CHANNEL,
                     subscribe=subscribe, concurrency=concurrency or ctx.concurrency,
                     sample_every=sample_every, pinning=ctx.pinning,
                     setup_timeout=ctx.setup_timeout)


def _connect_all(gen: Generator, server: Server, wanted: int) -> Any:
    ready = gen.ready()
    if ready.ok < wanted:
        detail = ready.last_error or "unknown"
        raise RunError(f"only {ready.ok} of {wanted} connections became ready "
                       f"({ready.failed} failed: {ready.fail}; last: {detail}); "
                       f"server: {server.proc.stderr()[-300:]}")
    return ready


def _publisher(ctx: Context, server: Server, events: int, *, rate: float = 0.0) -> Proc:
    argv = [sys.executable, "-m", "tidings.bench.publisher", "--url", server.http_url,
            "--key", ctx.credentials.api_key, "--channel", CHANNEL, "--events", str(events),
            "--batch", str(ctx.batch), "--concurrency", str(ctx.publishers),
            "--rate", str(rate)]
    proc = Proc(argv, cpu=ctx.pinning.load_cpu, pinning=ctx.pinning, name="publisher")
    line = proc.readline(60)
    if '"ready"' not in line:
        proc.stop()
        raise RunError(f"publisher did not start: {line} {proc.stderr()}")
    return proc


def _publish_and_count(ctx: Context, server: Server, gen: Generator, events: int,
                       subscribers: int, *, rate: float = 0.0, limit: float = 600.0,
                       others: tuple[int, ...] = ()) -> dict[str, Any]:
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
        "server_cpu": round(sum(cpu_percent(before, after, pid)
                                for pid in (server.pid, *others)), 1),
        "gen_cpu": round(cpu_percent(before, after, gen.pid), 1),
        "publisher_cpu": round(cpu_percent(before, after, publisher.pid), 1),
        "server_core_busy": _round(core_busy(before, after, ctx.pinning.server_cpu)),
        "load_core_busy": _round(core_busy(before, after, ctx.pinning.load_cpu)),
        "foreign_cpu": _round(foreign_cpu(before, after)),
    }


def _result(line: str) -> dict[str, Any]:
    import json

    value: dict[str, Any] = json.loads(line)
    return value


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def _lat_ms(done: dict[str, Any], key: str) -> float | None:
    lat = done.get("lat", {})
    if not lat.get("count"):
        return None
    return round(float(lat[key]) / 1000.0, 3)


def _common(measured: dict[str, Any], expected: int) -> dict[str, Any]:
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


def _calibrated(ctx: Context, warm: dict[str, Any], subscribers: int, seconds: float,
                maximum: int) -> int:
    """Events (a multiple of the batch size) to fill ``seconds`` at the rate of ``warm``."""
    rate = warm["done"]["frames"] / warm["seconds"]
    count = int(min(maximum, max(10, rate * seconds / subscribers)))
    return count // ctx.batch * ctx.batch if count >= ctx.batch else count


def _warm_events(ctx: Context, subscribers: int) -> int:
    """Warm-up events: two batches, fewer for many subscribers (slow peers take long)."""
    return max(10, min(ctx.batch * 2, 200_000 // subscribers))


def fanout(ctx: Context, kind: ServerKind, subscribers: int, *, seconds: float,
           events: int | None, max_events: int = 200_000) -> dict[str, Any]:
    """Deliveries per second: bursts of ``batch`` events per request, as fast as accepted."""
    with _server(ctx, kind) as server:
        gen = _generator(ctx, server, kind, subscribers, subscribe=True,
                         sample_every=max(1, subscribers // 100))
        try:
            ready = _connect_all(gen, server, subscribers)
            # Warm-up, which also calibrates how many events fill ``seconds``; a measured
            # run shorter than half of ``seconds`` counts as warm-up too, and is repeated
            # with more events.
            warm = _publish_and_count(ctx, server, gen, _warm_events(ctx, subscribers),
                                      subscribers)
            for _ in range(3):
                count = events or _calibrated(ctx, warm, subscribers, seconds, max_events)
                measured = _publish_and_count(ctx, server, gen, count, subscribers,
                                              limit=max(120.0, seconds * 20))
                if events or measured["seconds"] >= seconds / 2 or count >= max_events:
                    break
                warm = measured
        finally:
            gen.close()
    done = measured["done"]
    figures = _common(measured, count * subscribers)
    figures.update({
        "value": round(done["frames"] / measured["seconds"]),
        "events": count,
        "subscribers": subscribers,
        "seconds": round(measured["seconds"], 3),
        "setup_seconds": round((ready.t_last_ready - ready.t_first_start) / 1e9, 3),
        "sampled_p50_ms": _lat_ms(done, "p50_us"),
        "sampled_p99_ms": _lat_ms(done, "p99_us"),
    })
    return figures


def latency(ctx: Context, kind: ServerKind, subscribers: int, rate: float, *,
            seconds: float, warmup: float = 1.0) -> dict[str, Any]:
    """Publish-to-receipt latency at a fixed rate, one event per request."""
    with _server(ctx, kind) as server:
        gen = _generator(ctx, server, kind, subscribers, subscribe=True, sample_every=1)
        try:
            _connect_all(gen, server, subscribers)
            warm_events = max(1, int(rate * warmup))
            _publish_and_count(ctx, server, gen, warm_events, subscribers, rate=rate,
                               limit=warmup * 3 + 30)
            events = max(1, int(rate * seconds))
            measured = _publish_and_count(ctx, server, gen, events, subscribers, rate=rate,
                                          limit=seconds * 3 + 30)
        finally:
            gen.close()
    return _latency_figures(measured, events, subscribers, rate)


def _latency_figures(measured: dict[str, Any], events: int, subscribers: int,
                     rate: float) -> dict[str, Any]:
    done = measured["done"]
    figures = _common(measured, events * subscribers)
    published = measured["published"]
    saturated = (figures["received"] < figures["expected"]
                 or (_lat_ms(done, "p50_us") or 0.0) > 1000.0
                 or published.get("behind_schedule", 0) > events // 10)
    figures.update({
        "value": _lat_ms(done, "p99_us"),
        "p50_ms": _lat_ms(done, "p50_us"),
        "p90_ms": _lat_ms(done, "p90_us"),
        "p99_ms": _lat_ms(done, "p99_us"),
        "p999_ms": _lat_ms(done, "p999_us"),
        "max_ms": _lat_ms(done, "max_us"),
        "mean_ms": _lat_ms(done, "mean_us"),
        "samples": int(done.get("lat", {}).get("count", 0)),
        "events": events,
        "rate": rate,
        "subscribers": subscribers,
        "saturated": saturated,
        "deliveries_per_s": round(done["frames"] / measured["seconds"]),
    })
    return figures


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


def idle_memory(ctx: Context, kind: ServerKind, connections: int, *,
                warm: int = 200) -> dict[str, Any]:
    """Server RSS growth per idle authenticated connection (warm-up connections excluded)."""
    with _server(ctx, kind) as server:
        warm_gen = _generator(ctx, server, kind, warm, subscribe=False, sample_every=0)
        gen: Generator | None = None
        try:
            _connect_all(warm_gen, server, warm)
            before = _settled_rss(server.pid)
            gen = _generator(ctx, server, kind, connections, subscribe=False, sample_every=0)
            cpu_before = cpu_sample([server.pid, gen.pid], ctx.cores)
            ready = _connect_all(gen, server, connections)
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
        "handshakes_per_s": round(ready.connected
                                  / max(1e-9, (ready.t_last_connected - ready.t_first_start)
                                        / 1e9)),
        "server_cpu": round(cpu_percent(cpu_before, cpu_after, server.pid), 1),
        "server_core_busy": _round(core_busy(cpu_before, cpu_after, ctx.pinning.server_cpu)),
        "gen_cpu": gen_cpu,
        "foreign_cpu": _round(foreign_cpu(cpu_before, cpu_after)),
        "lower_bound": False,
    }


def handshakes(ctx: Context, kind: ServerKind, count: int, *,
               concurrency: int) -> dict[str, Any]:
    """Connections per second completed to the server's ``connected`` message."""
    with _server(ctx, kind) as server:
        # A few connections first, so that imports and caches are warm.
        warm_gen = _generator(ctx, server, kind, 50, subscribe=False, sample_every=0)
        gen: Generator | None = None
        try:
            _connect_all(warm_gen, server, 50)
            gen = _generator(ctx, server, kind, count, subscribe=False, sample_every=0,
                             concurrency=concurrency)
            before = cpu_sample([server.pid, gen.pid], ctx.cores)
            ready = _connect_all(gen, server, count)
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


def _redis_cluster_run(ctx: Context, kind: ServerKind, subscribers: int, body: Any, *,
                       sample_every: int, cluster: bool = False) -> dict[str, Any]:
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
        node_a = stack.enter_context(_server(ctx, kind, url))
        node_b = stack.enter_context(_server(ctx, kind, url))
        gen = Generator(ctx.exe, port=[node_a.port, node_b.port], mode=kind.gen_mode,
                        conns=subscribers, tokens=ctx.tokens_for(subscribers),
                        path=kind.ws_path, channel=CHANNEL, subscribe=True,
                        concurrency=ctx.concurrency, sample_every=sample_every,
                        pinning=ctx.pinning,
                        setup_timeout=ctx.setup_timeout)
        stack.callback(gen.close)
        _connect_all(gen, node_a, subscribers)
        result: dict[str, Any] = body(node_a, gen, (node_b.pid, *broker_pids))
        return result


def redis_fanout(ctx: Context, kind: ServerKind, subscribers: int, *, seconds: float,
                 events: int | None, cluster: bool = False) -> dict[str, Any]:
    """Fan-out through the Redis broker: publishes to node A, subscribers on A and B;
    through a 3-shard Redis Cluster with ``cluster``."""

    def body(node: Server, gen: Generator, others: tuple[int, ...]) -> dict[str, Any]:
        warm = _publish_and_count(ctx, node, gen, _warm_events(ctx, subscribers), subscribers,
                                  others=others)
        count = events or _calibrated(ctx, warm, subscribers, seconds, 200_000)
        measured = _publish_and_count(ctx, node, gen, count, subscribers,
                                      limit=max(120.0, seconds * 20), others=others)
        figures = _common(measured, count * subscribers)
        done = measured["done"]
        figures.update({
            "value": round(done["frames"] / measured["seconds"]),
            "events": count, "subscribers": subscribers, "nodes": 2,
            "shards": 3 if cluster else 1,
            "seconds": round(measured["seconds"], 3),
            "sampled_p50_ms": _lat_ms(done, "p50_us"),
            "sampled_p99_ms": _lat_ms(done, "p99_us"),
        })
        return figures

    return _redis_cluster_run(ctx, kind, subscribers, body,
                              sample_every=max(1, subscribers // 100), cluster=cluster)


def redis_latency(ctx: Context, kind: ServerKind, subscribers: int, rate: float, *,
                  seconds: float, warmup: float = 1.0) -> dict[str, Any]:
    """Publish-to-receipt latency through the Redis broker (two nodes)."""

    def body(node: Server, gen: Generator, others: tuple[int, ...]) -> dict[str, Any]:
        _publish_and_count(ctx, node, gen, max(1, int(rate * warmup)), subscribers,
                           rate=rate, limit=warmup * 3 + 30, others=others)
        count = max(1, int(rate * seconds))
        measured = _publish_and_count(ctx, node, gen, count, subscribers, rate=rate,
                                      limit=seconds * 3 + 30, others=others)
        return _latency_figures(measured, count, subscribers, rate) | {"nodes": 2}

    return _redis_cluster_run(ctx, kind, subscribers, body, sample_every=1)
