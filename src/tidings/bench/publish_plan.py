"""What the ``publish`` scenario measures: its brokers (``Broker``, ``BROKERS``), the
``PublishPlan`` built from ``tidings bench``'s options, and the phases each broker runs
(single publishes, batches, one lone publish in flight) with their labels.

The scenario itself (starting the brokers and nodes, the load process, the CPU readings)
is ``tidings.bench.publishing``; the table rows it fills, ``tidings.bench.publish_rows``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "BROKERS",
    "MODES",
    "QUICK_BROKERS",
    "TARGET_RATIO",
    "Broker",
    "PublishPlan",
    "broker_names",
    "mode_label",
    "phase_concurrency",
    "plan_from_args",
]

#: The single-publish ratio to the memory broker that the issue asks of Redis.
TARGET_RATIO = 0.7


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


def plan_from_args(
    args: argparse.Namespace, *, runs: int, quiet_wait: float, max_foreign: float, attempts: int
) -> PublishPlan:
    """The plan of ``tidings bench`` options: ``--publish-seconds`` (default 4, --quick
    0.5) with a warm-up of half of it (at most 1 s), ``--publish-brokers`` (default all,
    --quick ``QUICK_BROKERS``); --quick also makes one attempt per run, whatever the
    machine's other load, so that it stays short."""
    quick = bool(args.quick)
    seconds = args.publish_seconds or (0.5 if quick else 4.0)
    return PublishPlan(
        brokers=args.publish_brokers or (QUICK_BROKERS if quick else tuple(BROKERS)),
        runs=runs,
        seconds=seconds,
        warmup=min(1.0, seconds / 2),
        quiet_wait=quiet_wait,
        max_foreign=max_foreign,
        attempts=1 if quick else attempts,
        redis_cpu=getattr(args, "redis_cpu", None) or "server",
    )


#: ``lone``: single publishes, one in flight, for the latency a publish costs unloaded.
MODES = ("single", "batch", "lone")


def mode_label(plan: PublishPlan, mode: str) -> str:
    """How the table and the progress lines name a phase of ``plan``."""
    if mode == "single":
        return f"publish 1/req x{plan.single_concurrency}"
    if mode == "lone":
        return "publish latency 1 in flight"
    return f"publish batch {plan.batch} x{plan.batch_concurrency}"


def phase_concurrency(plan: PublishPlan, mode: str) -> int:
    """Requests in flight in a phase of ``plan``."""
    if mode == "lone":
        return 1
    return plan.single_concurrency if mode == "single" else plan.batch_concurrency
