"""The ``publish`` scenario: how many publishes one Tidings node acknowledges per second,
through each broker, and what each publish costs the redis-servers.

For every broker (``memory://``; one private redis-server; a 3-shard Redis Cluster
without replicas; optionally a 3-shard cluster with one replica each, where
``broker.ack_replicas`` "auto" makes every pipeline wait for one replica) a fresh Tidings
node is started on the server CPU, the redis-servers on the server CPU too, and the load
process (``tidings.bench.postload``) on the load CPU. On that node two phases run, each
after a warm-up:

* *single*: 32 connections, each with one ``POST /api/publish`` of one event in flight;
* *batch*: 8 connections, each with one ``POST /api/batch`` of 100 events in flight;
* *lone*: one connection with one single-event publish in flight: the latency of a
  publish when nothing queues (p50 and p99; what ``WAIT`` for a replica adds);

with ~100-byte event data spread over 64 channels ``bench:p<i>``. A phase's figure is the
acknowledged events between two marks divided by the time between them; the CPU time
(utime + stime) of the Tidings process, of the load process and of every redis-server is
read at both marks. Redis CPU per publish is each redis-server's CPU time over the window
divided by the events acknowledged in it; Tidings CPU per publish is the node's.

The brokers of one run are measured one after the other, so the ratios Redis/memory and
cluster/memory are taken run by run (same run, neighbours in time) and then summarised.

The brokers and the plan are ``tidings.bench.publish_plan``; the rows of the table,
``tidings.bench.publish_rows`` (both re-exported here).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tidings.bench.cluster import start_cluster
from tidings.bench.context import GEN_BOTTLENECK_PERCENT, Context, RunError
from tidings.bench.publish_plan import (
    BROKERS,
    MODES,
    QUICK_BROKERS,
    TARGET_RATIO,
    Broker,
    PublishPlan,
    broker_names,
    mode_label,
    phase_concurrency,
    plan_from_args,
)
from tidings.bench.publish_rows import Row, add_resolution_notes, fill_rows, table_rows
from tidings.bench.servers import KINDS, redis_available, start_redis, start_server
from tidings.bench.system import (
    CpuSample,
    Proc,
    core_busy,
    cpu_percent,
    cpu_sample,
    foreign_cpu,
    wait_quiet,
)

__all__ = [
    "BROKERS",
    "QUICK_BROKERS",
    "TARGET_RATIO",
    "Broker",
    "PublishPlan",
    "Row",
    "broker_names",
    "measure_publish",
    "plan_from_args",
]


@dataclass(slots=True)
class _Infra:
    url: str | None
    primaries: tuple[int, ...] = ()
    replicas: tuple[int, ...] = ()
    startup_seconds: float = 0.0


@contextlib.contextmanager
def _broker(ctx: Context, broker: Broker, plan: PublishPlan) -> Iterator[_Infra]:
    cpu = ctx.pinning.load_cpu if plan.redis_cpu == "load" else ctx.pinning.server_cpu
    if broker.name == "memory":
        yield _Infra(None)
    elif broker.shards == 0:
        began = time.monotonic()
        with start_redis(ctx.pinning, cpu) as (proc, url):
            yield _Infra(url, (proc.pid,), (), round(time.monotonic() - began, 2))
    else:
        with start_cluster(ctx.pinning, broker.shards, broker.replicas, cpu=cpu) as cluster:
            yield _Infra(
                cluster.url,
                tuple(n.pid for n in cluster.primaries),
                tuple(n.pid for n in cluster.replicas),
                cluster.startup_seconds,
            )


def _mark(load: Proc) -> dict[str, Any]:
    load.send("mark")
    line = load.readline(30)
    mark: dict[str, Any] = json.loads(line)
    if mark.get("event") != "mark":
        raise RunError(f"load process: unexpected {line[:200]}")
    return mark


def _us_per_event(before: CpuSample, after: CpuSample, pid: int, events: int) -> float:
    used = after.proc_seconds.get(pid, 0.0) - before.proc_seconds.get(pid, 0.0)
    return round(used * 1e6 / max(1, events), 2)


def _phase(
    ctx: Context, plan: PublishPlan, url: str, infra: _Infra, server_pid: int, mode: str
) -> dict[str, Any]:
    """One phase (``single`` or ``batch``) against a running node; the figures of its
    measured window."""
    concurrency = phase_concurrency(plan, mode)
    argv = [
        sys.executable,
        "-m",
        "tidings.bench.postload",
        "--url",
        url,
        "--key",
        ctx.credentials.api_key,
        "--mode",
        "batch" if mode == "batch" else "single",
        "--concurrency",
        str(concurrency),
        "--batch",
        str(plan.batch),
        "--channels",
        str(plan.channels),
        "--data-bytes",
        str(plan.data_bytes),
        "--limit",
        str(plan.warmup + plan.seconds + 60),
    ]
    load = Proc(argv, cpu=ctx.pinning.load_cpu, pinning=ctx.pinning, name="postload")
    try:
        line = load.readline(30)
        if '"ready"' not in line:
            raise RunError(f"load process did not start: {line} {load.stderr()}")
        pids = [server_pid, load.pid, *infra.primaries, *infra.replicas]
        load.send("go")
        time.sleep(plan.warmup)
        first = _mark(load)
        before = cpu_sample(pids, ctx.cores)
        time.sleep(plan.seconds)
        second = _mark(load)
        after = cpu_sample(pids, ctx.cores)
        load.send("stop")
        result: dict[str, Any] = json.loads(load.readline(60))
    finally:
        load.stop()
        load.discard()
    events = int(second["events"]) - int(first["events"])
    seconds = max(1e-9, (int(second["t"]) - int(first["t"])) / 1e9)
    if events <= 0:
        raise RunError(
            f"no publish acknowledged in {seconds:.1f} s: "
            f"{result.get('statuses')} {result.get('errors')}"
        )
    gen_cpu = round(cpu_percent(before, after, load.pid), 1)
    shards = [_us_per_event(before, after, pid, events) for pid in infra.primaries]
    replicas = [_us_per_event(before, after, pid, events) for pid in infra.replicas]
    return {
        "value": round(events / seconds),
        "mode": mode,
        "events": events,
        "requests": int(second["requests"]) - int(first["requests"]),
        "failed": int(second["failed"]) - int(first["failed"]),
        "seconds": round(seconds, 3),
        "concurrency": concurrency,
        "server_cpu": round(cpu_percent(before, after, server_pid), 1),
        "node_us_per_publish": _us_per_event(before, after, server_pid, events),
        "gen_cpu": gen_cpu,
        "redis_us_per_publish": shards,
        "redis_us_per_publish_sum": round(sum(shards), 2) if shards else None,
        "redis_cpu": [round(cpu_percent(before, after, pid), 1) for pid in infra.primaries],
        "replica_us_per_publish": replicas,
        "replica_cpu": [round(cpu_percent(before, after, pid), 1) for pid in infra.replicas],
        "server_core_busy": _round(core_busy(before, after, ctx.pinning.server_cpu)),
        "load_core_busy": _round(core_busy(before, after, ctx.pinning.load_cpu)),
        "foreign_cpu": _round(foreign_cpu(before, after)),
        "lower_bound": gen_cpu > GEN_BOTTLENECK_PERCENT,
        "statuses": result.get("statuses", {}),
        "load_errors": result.get("errors", []),
        "latency_p50_ms": result.get("latency_p50_ms"),
        "latency_p99_ms": result.get("latency_p99_ms"),
        "request_bytes": result.get("request_bytes"),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _one_broker(
    ctx: Context, plan: PublishPlan, broker: Broker, progress: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    """Start the broker and one Tidings node on it; run both phases; stop everything."""
    began = time.monotonic()
    with (
        _broker(ctx, broker, plan) as infra,
        start_server(
            KINDS["tidings"],
            ctx.pinning,
            ctx.credentials,
            send_buffer=ctx.send_buffer,
            broker=infra.url,
            env=ctx.server_env,
        ) as server,
    ):
        results = {
            mode: _phase(ctx, plan, server.http_url, infra, server.pid, mode) for mode in MODES
        }
        # Warnings and errors the node logged (the bench runs it at level warning).
        stderr = server.proc.stderr()
    for mode, result in results.items():
        result.update(
            broker=broker.name,
            broker_startup_seconds=infra.startup_seconds,
            server_stderr=stderr[-1000:],
        )
        shards = result["redis_us_per_publish"]
        detail = f", Redis {'/'.join(f'{v:g}' for v in shards)} µs/publish" if shards else ""
        progress(
            f"  {mode_label(plan, mode)}, {broker.label}: {result['value']:,} "
            f"events/s (server CPU {result['server_cpu']}%, load {result['gen_cpu']}%"
            f"{detail}, other processes {result['foreign_cpu']}%) "
            f"[{time.monotonic() - began:.1f} s]"
        )
        if result["failed"]:
            progress(f"    {result['failed']} request(s) failed: {result['load_errors']}")
    if stderr:
        progress(f"    [tidings stderr, {broker.label}] {stderr[-600:]}")
    return results


def _disturbance(run: dict[str, dict[str, dict[str, Any]]]) -> float:
    return max(
        (
            result.get("foreign_cpu") or 0.0
            for by_mode in run.values()
            for result in by_mode.values()
        ),
        default=0.0,
    )


def measure_publish(
    ctx: Context, plan: PublishPlan, *, progress: Callable[[str], None]
) -> tuple[list[Row], dict[str, str]]:
    """Run the scenario: ``plan.runs`` runs, each measuring every broker of
    ``plan.brokers`` in order. Returns the rows (each with its per-run figures and
    errors) and the brokers skipped, with why.

    A run during which other processes used more than ``plan.max_foreign`` percent of a
    core (in any of its phases) is repeated, up to ``plan.attempts`` attempts; the least
    disturbed attempt is kept, its figures marked noisy if it was still disturbed.
    Every process started is stopped (by PID) before this returns.
    """
    skipped: dict[str, str] = {}
    why = redis_available()
    brokers = []
    for name in plan.brokers:
        broker = BROKERS[name]
        if broker.name != "memory" and why is not None:
            skipped[f"publish {broker.label}"] = why
            progress(f"  publish, {broker.label}: skipped ({why})")
            continue
        brokers.append(broker)
    rows = table_rows(plan, brokers)
    for index in range(plan.runs):
        kept: tuple[dict[str, dict[str, dict[str, Any]]], dict[str, str], int] | None = None
        for attempt in range(plan.attempts):
            if plan.quiet_wait > 0:
                wait_quiet(plan.quiet_wait)
            run: dict[str, dict[str, dict[str, Any]]] = {}
            failed: dict[str, str] = {}
            progress(
                f"  publish run {index + 1}/{plan.runs}"
                + (f" (attempt {attempt + 1})" if attempt else "")
            )
            for broker in brokers:
                try:
                    run[broker.name] = _one_broker(ctx, plan, broker, progress)
                except (RunError, RuntimeError, TimeoutError, OSError, ValueError, KeyError) as exc:
                    failed[broker.name] = str(exc)[:500]
                    progress(f"  publish, {broker.label}: FAILED: {exc}")
            if kept is None or _disturbance(run) < _disturbance(kept[0]):
                kept = (run, failed, attempt + 1)
            if _disturbance(run) <= plan.max_foreign:
                break
            progress(
                f"    other processes used {_disturbance(run)}% of a core: "
                + ("repeating" if attempt + 1 < plan.attempts else "kept as noisy")
            )
        if kept is None:  # plan.attempts < 1
            raise ValueError("PublishPlan.attempts must be at least 1")
        run, failed, number = kept
        for by_mode in run.values():
            for result in by_mode.values():
                result["attempt"] = number
                if (result.get("foreign_cpu") or 0.0) > plan.max_foreign:
                    result["noisy"] = True
        fill_rows(rows, run, failed, index)
    add_resolution_notes(rows)
    return list(rows.values()), skipped
