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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tidings.bench.cluster import start_cluster
from tidings.bench.scenarios import GEN_BOTTLENECK_PERCENT, Context, RunError
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

__all__ = ["BROKERS", "QUICK_BROKERS", "Broker", "PublishPlan", "Row", "broker_names",
           "measure_publish", "plan_from_args"]

#: The single-publish ratio to the memory broker that the issue asks of Redis.
TARGET_RATIO = 0.7
#: /proc/<pid>/stat counts CPU time in ticks of 1/_TICKS s.
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Broker:
    """One broker configuration: ``name`` (for ``--publish-brokers``), ``label`` (in the
    table), the cluster shape (``shards`` 0: not a cluster) and whether the issue's
    ratio target applies to it."""

    name: str
    label: str
    shards: int = 0
    replicas: int = 0
    target: bool = False


BROKERS: dict[str, Broker] = {
    "memory": Broker("memory", "memory"),
    "redis": Broker("redis", "Redis", target=True),
    "cluster": Broker("cluster", "cluster 3x0", shards=3, target=True),
    "cluster-replicas": Broker("cluster-replicas", "cluster 3x1 WAIT", shards=3, replicas=1),
}
#: ``--quick`` leaves out the cluster with replicas (it alone would take ~4 s more).
QUICK_BROKERS = ("memory", "redis", "cluster")


@dataclass(frozen=True, slots=True)
class PublishPlan:
    """What to run: brokers (names of ``BROKERS``, in order), runs, the measured window
    and warm-up of each phase, the load shape, and the quiet/repeat rules of the bench."""

    brokers: Sequence[str]
    runs: int = 1
    seconds: float = 4.0
    warmup: float = 1.0
    single_concurrency: int = 32
    batch_concurrency: int = 8
    batch: int = 100
    channels: int = 64
    data_bytes: int = 100
    quiet_wait: float = 0.0
    max_foreign: float = 20.0
    attempts: int = 1
    #: Where the redis-servers run: "server" (sharing the node's CPU: Redis's own cost
    #: counts against the node, the conservative reading) or "load" (with the load
    #: process, as in production, where Redis has machines of its own).
    redis_cpu: str = "server"


def broker_names(text: str) -> list[str]:
    """``--publish-brokers``: comma-separated names of ``BROKERS`` (argparse type)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names or any(name not in BROKERS for name in names):
        raise argparse.ArgumentTypeError(f"choose brokers from {list(BROKERS)}")
    return names


def plan_from_args(args: argparse.Namespace, *, runs: int, quiet_wait: float,
                   max_foreign: float, attempts: int) -> PublishPlan:
    """The plan of ``tidings bench`` options: ``--publish-seconds`` (default 4, --quick
    0.5) with a warm-up of half of it (at most 1 s), ``--publish-brokers`` (default all,
    --quick ``QUICK_BROKERS``); --quick also makes one attempt per run, whatever the
    machine's other load, so that it stays short."""
    quick = bool(args.quick)
    seconds = args.publish_seconds or (0.5 if quick else 4.0)
    return PublishPlan(brokers=args.publish_brokers or (QUICK_BROKERS if quick
                                                         else tuple(BROKERS)),
                       runs=runs, seconds=seconds, warmup=min(1.0, seconds / 2),
                       quiet_wait=quiet_wait, max_foreign=max_foreign,
                       attempts=1 if quick else attempts,
                       redis_cpu=getattr(args, "redis_cpu", None) or "server")


@dataclass(slots=True)
class Row:
    """One row of the table: its runs (flat dicts with ``value``) and errors, in the
    shape ``runner.Figure`` summarises."""

    scenario: str
    label: str
    metric: str
    unit: str
    better: str
    params: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    note: str = ""


#: ``lone``: single publishes, one in flight, for the latency a publish costs unloaded.
_MODES = ("single", "batch", "lone")
_PERCENTILES = ("p50", "p99")


def _mode_label(plan: PublishPlan, mode: str) -> str:
    if mode == "single":
        return f"publish 1/req x{plan.single_concurrency}"
    if mode == "lone":
        return "publish latency 1 in flight"
    return f"publish batch {plan.batch} x{plan.batch_concurrency}"


def _concurrency(plan: PublishPlan, mode: str) -> int:
    if mode == "lone":
        return 1
    return plan.single_concurrency if mode == "single" else plan.batch_concurrency


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
            yield _Infra(cluster.url, tuple(n.pid for n in cluster.primaries),
                         tuple(n.pid for n in cluster.replicas), cluster.startup_seconds)


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


def _phase(ctx: Context, plan: PublishPlan, url: str, infra: _Infra, server_pid: int,
           mode: str) -> dict[str, Any]:
    """One phase (``single`` or ``batch``) against a running node; the figures of its
    measured window."""
    concurrency = _concurrency(plan, mode)
    argv = [sys.executable, "-m", "tidings.bench.postload", "--url", url,
            "--key", ctx.credentials.api_key, "--mode", "batch" if mode == "batch" else "single",
            "--concurrency", str(concurrency), "--batch", str(plan.batch),
            "--channels", str(plan.channels), "--data-bytes", str(plan.data_bytes),
            "--limit", str(plan.warmup + plan.seconds + 60)]
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
        raise RunError(f"no publish acknowledged in {seconds:.1f} s: "
                       f"{result.get('statuses')} {result.get('errors')}")
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


def _one_broker(ctx: Context, plan: PublishPlan, broker: Broker,
                progress: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Start the broker and one Tidings node on it; run both phases; stop everything."""
    began = time.monotonic()
    with _broker(ctx, broker, plan) as infra, start_server(
            KINDS["tidings"], ctx.pinning, ctx.credentials, send_buffer=ctx.send_buffer,
            broker=infra.url, env=ctx.server_env) as server:
        results = {mode: _phase(ctx, plan, server.http_url, infra, server.pid, mode)
                   for mode in _MODES}
        # Warnings and errors the node logged (the bench runs it at level warning).
        stderr = server.proc.stderr()
    for mode, result in results.items():
        result.update(broker=broker.name, broker_startup_seconds=infra.startup_seconds,
                      server_stderr=stderr[-1000:])
        shards = result["redis_us_per_publish"]
        detail = (f", Redis {'/'.join(f'{v:g}' for v in shards)} µs/publish"
                  if shards else "")
        progress(f"  {_mode_label(plan, mode)}, {broker.label}: {result['value']:,} "
                 f"events/s (server CPU {result['server_cpu']}%, load {result['gen_cpu']}%"
                 f"{detail}, other processes {result['foreign_cpu']}%) "
                 f"[{time.monotonic() - began:.1f} s]")
        if result["failed"]:
            progress(f"    {result['failed']} request(s) failed: {result['load_errors']}")
    if stderr:
        progress(f"    [tidings stderr, {broker.label}] {stderr[-600:]}")
    return results


def _rows(plan: PublishPlan, brokers: Sequence[Broker]) -> dict[tuple[str, ...], Row]:
    """Every row, in table order, keyed by (kind, mode, broker[, part])."""
    rows: dict[tuple[str, ...], Row] = {}
    where = ("every redis-server on the load CPU with the load process (postload)"
             if plan.redis_cpu == "load" else
             "every redis-server on the server CPU, the load process (postload) on the load CPU")
    place = f"the Tidings node on the server CPU, {where}; one node per broker, fresh for every run"
    wait = ("cluster 3x1 WAIT: 3 shards with one replica each and broker.ack_replicas auto: "
            "every pipeline waits (WAIT) for one replica")
    note = ("Redis CPU rows: redis-server CPU time (utime+stime) per acknowledged event; "
            "their server CPU % column is that redis-server's own CPU %")
    if any(broker.replicas for broker in brokers):
        note += "; a 'replicas' row: all replicas of that cluster together"
    for mode in _MODES:
        unit = "publishes/s" if mode == "single" else "events/s"
        base = {"mode": mode, "channels": plan.channels, "data_bytes": plan.data_bytes,
                "seconds": plan.seconds, "concurrency": _concurrency(plan, mode)}
        if mode == "batch":
            base["batch"] = plan.batch
        if mode == "lone":
            for part in _PERCENTILES:
                for broker in brokers:
                    rows[("latency", mode, broker.name, part)] = Row(
                        "publish_latency", f"{_mode_label(plan, mode)} {part}, "
                        f"{broker.label}", f"latency_{part}_ms", "ms", "lower",
                        {**base, "broker": broker.name, "percentile": part},
                        note="latency rows: request to answer of single publishes, one in "
                             "flight, warm-up included; what WAIT for a replica adds shows "
                             "in the cluster 3x1 row")
            continue
        for broker in brokers:
            rows[("rate", mode, broker.name)] = Row(
                f"publish_{mode}", f"{_mode_label(plan, mode)}, {broker.label}",
                "events_per_s", unit, "higher",
                {**base, "broker": broker.name, "shards": broker.shards or None,
                 "replicas": broker.replicas}, note=wait if broker.replicas else place)
        if mode == "single" and any(b.name == "memory" for b in brokers):
            for broker in brokers:
                if broker.name == "memory":
                    continue
                rows[("ratio", mode, broker.name)] = Row(
                    "publish_ratio", f"{_mode_label(plan, mode)}, {broker.label}/memory",
                    "ratio", "ratio", "higher",
                    {**base, "broker": broker.name, "target": broker.target},
                    note="ratio rows: taken run by run (same run), server CPU % is the "
                         "Redis run's")
        for broker in brokers:
            prefix = f"Tidings CPU {'1/req' if mode == 'single' else f'batch {plan.batch}'}"
            rows[("node", mode, broker.name)] = Row(
                "publish_node_cpu", f"{prefix}, {broker.label}", "us_per_publish",
                "µs/publish", "lower", {**base, "broker": broker.name},
                note="Tidings CPU rows: the node's CPU time (utime+stime) per acknowledged "
                     "event, HTTP included")
        for broker in brokers:
            if broker.name == "memory":
                continue
            params = {**base, "broker": broker.name}
            prefix = f"Redis CPU {'1/req' if mode == 'single' else f'batch {plan.batch}'}"
            if broker.shards == 0:
                rows[("cpu", mode, broker.name, "0")] = Row(
                    "publish_redis_cpu", f"{prefix}, {broker.label}", "us_per_publish",
                    "µs/publish", "lower", {**params, "shard": 1}, note=note)
                continue
            rows[("cpu", mode, broker.name, "sum")] = Row(
                "publish_redis_cpu", f"{prefix}, {broker.label} sum", "us_per_publish",
                "µs/publish", "lower", {**params, "shard": "sum"}, note=note)
            for shard in range(broker.shards):
                rows[("cpu", mode, broker.name, str(shard))] = Row(
                    "publish_redis_cpu", f"{prefix}, {broker.label} shard {shard + 1}",
                    "us_per_publish", "µs/publish", "lower", {**params, "shard": shard + 1},
                    note=note)
            if broker.replicas:
                rows[("cpu", mode, broker.name, "replicas")] = Row(
                    "publish_redis_cpu", f"{prefix}, {broker.label} replicas",
                    "us_per_publish", "µs/publish", "lower", {**params, "shard": "replicas"},
                    note=note)
    return rows


def _fill(rows: dict[tuple[str, ...], Row], run: dict[str, dict[str, dict[str, Any]]],
          failed: dict[str, str], index: int) -> None:
    """Add one run's results (broker -> mode -> figures) to the rows."""
    for key, row in rows.items():
        kind, mode, name = key[0], key[1], key[2]
        if name in failed or (kind == "ratio" and "memory" in failed):
            row.errors.append(f"run {index + 1}: {failed.get(name) or failed['memory']}")
            continue
        result = run[name][mode]
        if kind == "rate":
            row.runs.append(result)
        elif kind == "latency":
            row.runs.append({**result, "value": result[f"latency_{key[3]}_ms"]})
        elif kind == "node":
            row.runs.append({**result, "value": result["node_us_per_publish"],
                             "resolution_us": round(1e6 / _TICKS / result["events"], 2)})
        elif kind == "ratio":
            memory = run["memory"][mode]
            row.runs.append({
                "value": round(result["value"] / memory["value"], 3),
                "value_over": result["value"], "memory_value": memory["value"],
                "server_cpu": result["server_cpu"], "gen_cpu": result["gen_cpu"],
                "foreign_cpu": max(result["foreign_cpu"] or 0.0,
                                   memory["foreign_cpu"] or 0.0),
                "lower_bound": bool(result["lower_bound"] or memory["lower_bound"]),
                "noisy": bool(result.get("noisy") or memory.get("noisy"))})
        else:
            part = key[3]
            if part == "sum":
                value, cpu = result["redis_us_per_publish_sum"], sum(result["redis_cpu"])
            elif part == "replicas":
                value = round(sum(result["replica_us_per_publish"]), 2)
                cpu = sum(result["replica_cpu"])
            else:
                value = result["redis_us_per_publish"][int(part)]
                cpu = result["redis_cpu"][int(part)]
            row.runs.append({"value": value, "server_cpu": round(cpu, 1),
                             "gen_cpu": result["gen_cpu"], "events": result["events"],
                             "resolution_us": round(1e6 / _TICKS / result["events"], 2),
                             "foreign_cpu": result["foreign_cpu"],
                             "noisy": bool(result.get("noisy"))})


def _disturbance(run: dict[str, dict[str, dict[str, Any]]]) -> float:
    return max((result.get("foreign_cpu") or 0.0 for by_mode in run.values()
                for result in by_mode.values()), default=0.0)


def measure_publish(ctx: Context, plan: PublishPlan, *,
                    progress: Callable[[str], None]) -> tuple[list[Row], dict[str, str]]:
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
    rows = _rows(plan, brokers)
    for index in range(plan.runs):
        kept: tuple[dict[str, dict[str, dict[str, Any]]], dict[str, str], int] | None = None
        for attempt in range(plan.attempts):
            if plan.quiet_wait > 0:
                wait_quiet(plan.quiet_wait)
            run: dict[str, dict[str, dict[str, Any]]] = {}
            failed: dict[str, str] = {}
            progress(f"  publish run {index + 1}/{plan.runs}"
                     + (f" (attempt {attempt + 1})" if attempt else ""))
            for broker in brokers:
                try:
                    run[broker.name] = _one_broker(ctx, plan, broker, progress)
                except (RunError, RuntimeError, TimeoutError, OSError, ValueError,
                        KeyError) as exc:
                    failed[broker.name] = str(exc)[:500]
                    progress(f"  publish, {broker.label}: FAILED: {exc}")
            if kept is None or _disturbance(run) < _disturbance(kept[0]):
                kept = (run, failed, attempt + 1)
            if _disturbance(run) <= plan.max_foreign:
                break
            progress(f"    other processes used {_disturbance(run)}% of a core: "
                     + ("repeating" if attempt + 1 < plan.attempts else "kept as noisy"))
        if kept is None:  # plan.attempts < 1
            raise ValueError("PublishPlan.attempts must be at least 1")
        run, failed, number = kept
        for by_mode in run.values():
            for result in by_mode.values():
                result["attempt"] = number
                if (result.get("foreign_cpu") or 0.0) > plan.max_foreign:
                    result["noisy"] = True
        _fill(rows, run, failed, index)
    resolution = max((run["resolution_us"] for key, row in rows.items()
                      if key[0] in ("cpu", "node")
                      for run in row.runs), default=None)
    for key, row in rows.items():
        if key[0] in ("cpu", "node") and resolution is not None:
            row.note += (f"; CPU time comes in ticks of {1000 // _TICKS} ms, so each figure "
                         f"is within {resolution:g} µs/publish here (longer "
                         "--publish-seconds: finer)")
    return list(rows.values()), skipped
