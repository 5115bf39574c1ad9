"""The table rows of the ``publish`` scenario: which rows a plan has (rates, ratios to the
memory broker, latencies, the node's and every redis-server's CPU per publish) and how
one run's figures fill them.

The rows are in the shape ``runner.Figure`` summarises; ``tidings.bench.publishing``
measures the figures.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tidings.bench.publish_plan import MODES, Broker, PublishPlan, mode_label, phase_concurrency

__all__ = ["Row", "add_resolution_notes", "fill_rows", "table_rows"]

#: /proc/<pid>/stat counts CPU time in ticks of 1/_TICKS s.
_TICKS = os.sysconf("SC_CLK_TCK")
_PERCENTILES = ("p50", "p99")


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


def table_rows(plan: PublishPlan, brokers: Sequence[Broker]) -> dict[tuple[str, ...], Row]:
    """Every row, in table order, keyed by (kind, mode, broker[, part])."""
    rows: dict[tuple[str, ...], Row] = {}
    where = (
        "every redis-server on the load CPU with the load process (postload)"
        if plan.redis_cpu == "load"
        else "every redis-server on the server CPU, the load process (postload) on the load CPU"
    )
    place = f"the Tidings node on the server CPU, {where}; one node per broker, fresh for every run"
    wait = (
        "cluster 3x1 WAIT: 3 shards with one replica each and broker.ack_replicas auto: "
        "every pipeline waits (WAIT) for one replica"
    )
    note = (
        "Redis CPU rows: redis-server CPU time (utime+stime) per acknowledged event; "
        "their server CPU % column is that redis-server's own CPU %"
    )
    if any(broker.replicas for broker in brokers):
        note += "; a 'replicas' row: all replicas of that cluster together"
    for mode in MODES:
        unit = "publishes/s" if mode == "single" else "events/s"
        base = {
            "mode": mode,
            "channels": plan.channels,
            "data_bytes": plan.data_bytes,
            "seconds": plan.seconds,
            "concurrency": phase_concurrency(plan, mode),
        }
        if mode == "batch":
            base["batch"] = plan.batch
        if mode == "lone":
            for part in _PERCENTILES:
                for broker in brokers:
                    rows[("latency", mode, broker.name, part)] = Row(
                        "publish_latency",
                        f"{mode_label(plan, mode)} {part}, {broker.label}",
                        f"latency_{part}_ms",
                        "ms",
                        "lower",
                        {**base, "broker": broker.name, "percentile": part},
                        note="latency rows: request to answer of single publishes, one in "
                        "flight, warm-up included; what WAIT for a replica adds shows "
                        "in the cluster 3x1 row",
                    )
            continue
        for broker in brokers:
            rows[("rate", mode, broker.name)] = Row(
                f"publish_{mode}",
                f"{mode_label(plan, mode)}, {broker.label}",
                "events_per_s",
                unit,
                "higher",
                {
                    **base,
                    "broker": broker.name,
                    "shards": broker.shards or None,
                    "replicas": broker.replicas,
                },
                note=wait if broker.replicas else place,
            )
        if mode == "single" and any(b.name == "memory" for b in brokers):
            for broker in brokers:
                if broker.name == "memory":
                    continue
                rows[("ratio", mode, broker.name)] = Row(
                    "publish_ratio",
                    f"{mode_label(plan, mode)}, {broker.label}/memory",
                    "ratio",
                    "ratio",
                    "higher",
                    {**base, "broker": broker.name, "target": broker.target},
                    note="ratio rows: taken run by run (same run), server CPU % is the Redis run's",
                )
        for broker in brokers:
            prefix = f"Tidings CPU {'1/req' if mode == 'single' else f'batch {plan.batch}'}"
            rows[("node", mode, broker.name)] = Row(
                "publish_node_cpu",
                f"{prefix}, {broker.label}",
                "us_per_publish",
                "µs/publish",
                "lower",
                {**base, "broker": broker.name},
                note="Tidings CPU rows: the node's CPU time (utime+stime) per acknowledged "
                "event, HTTP included",
            )
        for broker in brokers:
            if broker.name == "memory":
                continue
            params = {**base, "broker": broker.name}
            prefix = f"Redis CPU {'1/req' if mode == 'single' else f'batch {plan.batch}'}"
            if broker.shards == 0:
                rows[("cpu", mode, broker.name, "0")] = Row(
                    "publish_redis_cpu",
                    f"{prefix}, {broker.label}",
                    "us_per_publish",
                    "µs/publish",
                    "lower",
                    {**params, "shard": 1},
                    note=note,
                )
                continue
            rows[("cpu", mode, broker.name, "sum")] = Row(
                "publish_redis_cpu",
                f"{prefix}, {broker.label} sum",
                "us_per_publish",
                "µs/publish",
                "lower",
                {**params, "shard": "sum"},
                note=note,
            )
            for shard in range(broker.shards):
                rows[("cpu", mode, broker.name, str(shard))] = Row(
                    "publish_redis_cpu",
                    f"{prefix}, {broker.label} shard {shard + 1}",
                    "us_per_publish",
                    "µs/publish",
                    "lower",
                    {**params, "shard": shard + 1},
                    note=note,
                )
            if broker.replicas:
                rows[("cpu", mode, broker.name, "replicas")] = Row(
                    "publish_redis_cpu",
                    f"{prefix}, {broker.label} replicas",
                    "us_per_publish",
                    "µs/publish",
                    "lower",
                    {**params, "shard": "replicas"},
                    note=note,
                )
    return rows


def fill_rows(
    rows: dict[tuple[str, ...], Row],
    run: dict[str, dict[str, dict[str, Any]]],
    failed: dict[str, str],
    index: int,
) -> None:
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
            row.runs.append(
                {
                    **result,
                    "value": result["node_us_per_publish"],
                    "resolution_us": round(1e6 / _TICKS / result["events"], 2),
                }
            )
        elif kind == "ratio":
            memory = run["memory"][mode]
            row.runs.append(
                {
                    "value": round(result["value"] / memory["value"], 3),
                    "value_over": result["value"],
                    "memory_value": memory["value"],
                    "server_cpu": result["server_cpu"],
                    "gen_cpu": result["gen_cpu"],
                    "foreign_cpu": max(result["foreign_cpu"] or 0.0, memory["foreign_cpu"] or 0.0),
                    "lower_bound": bool(result["lower_bound"] or memory["lower_bound"]),
                    "noisy": bool(result.get("noisy") or memory.get("noisy")),
                }
            )
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
            row.runs.append(
                {
                    "value": value,
                    "server_cpu": round(cpu, 1),
                    "gen_cpu": result["gen_cpu"],
                    "events": result["events"],
                    "resolution_us": round(1e6 / _TICKS / result["events"], 2),
                    "foreign_cpu": result["foreign_cpu"],
                    "noisy": bool(result.get("noisy")),
                }
            )


def add_resolution_notes(rows: dict[tuple[str, ...], Row]) -> None:
    """Say in the CPU rows' notes how coarse their figures are: CPU time comes in ticks."""
    resolution = max(
        (
            run["resolution_us"]
            for key, row in rows.items()
            if key[0] in ("cpu", "node")
            for run in row.runs
        ),
        default=None,
    )
    for key, row in rows.items():
        if key[0] in ("cpu", "node") and resolution is not None:
            row.note += (
                f"; CPU time comes in ticks of {1000 // _TICKS} ms, so each figure "
                f"is within {resolution:g} µs/publish here (longer "
                "--publish-seconds: finer)"
            )
