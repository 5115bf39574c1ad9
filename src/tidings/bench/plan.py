"""``tidings bench``'s options and what they select: the scenarios, the ``Plan`` of a run and
the ``Figure`` (one row of the table) that running it fills in."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from tidings.bench import publishing
from tidings.bench.servers import ServerKind, available_kinds

__all__ = ["SCENARIOS", "Figure", "Plan", "add_arguments"]

SCENARIOS = ("fanout", "latency", "memory", "handshake", "redis", "publish")


def _ints(text: str) -> list[int]:
    return [int(part.replace("_", "")) for part in text.split(",") if part.strip()]


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    bad = [name for name in names if name not in SCENARIOS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown scenario(s) {bad}; choose from {SCENARIOS}")
    return names


def _servers(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    bad = [name for name in names if name not in ("tidings", "floor", "socketio")]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown server(s) {bad}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``tidings bench`` (shared by ``python -m tidings.bench``)."""
    parser.add_argument(
        "--quick", action="store_true", help="a short smoke run: 1 run, smaller sizes, short phases"
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="run the same scenarios against the floor and python-socketio",
    )
    parser.add_argument(
        "--servers",
        type=_servers,
        help="servers to run, e.g. tidings,floor (default: tidings, or all three with --compare)",
    )
    parser.add_argument(
        "--scenarios",
        type=_names,
        default=None,
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument("--runs", type=int, help="runs per figure (default 3; --quick 1)")
    parser.add_argument("--output", default="tidings-bench.json", help="JSON results file")
    parser.add_argument(
        "--subscribers", type=_ints, help="fan-out sizes (default 1000,10000; --quick 1000)"
    )
    parser.add_argument(
        "--events", type=int, help="events per fan-out run (default: enough for --seconds)"
    )
    parser.add_argument(
        "--seconds", type=float, help="target length of a fan-out run (default 5; --quick 1)"
    )
    parser.add_argument(
        "--latency-subscribers",
        type=int,
        default=1000,
        help="subscribers in the latency scenario (default 1000)",
    )
    parser.add_argument(
        "--latency-rates",
        type=_floats,
        help="events/s for the latency scenario (default 20,100; --quick 100)",
    )
    parser.add_argument(
        "--latency-seconds", type=float, help="length of a latency run (default 10; --quick 2)"
    )
    parser.add_argument(
        "--memory-connections",
        type=_ints,
        help="idle connections (default 10000,50000; --quick 1000); sizes "
        "beyond the file-descriptor limit are skipped",
    )
    parser.add_argument(
        "--handshakes", type=int, help="connections per handshake run (default 5000; --quick 500)"
    )
    parser.add_argument(
        "--handshake-concurrency", type=int, default=64, help="handshakes in flight at once"
    )
    parser.add_argument("--batch", type=int, default=50, help="events per publish request")
    parser.add_argument(
        "--publishers",
        type=int,
        default=4,
        help="publish requests in flight in the fan-out scenario",
    )
    parser.add_argument(
        "--send-buffer",
        type=int,
        default=64 * 1024 * 1024,
        help="limits.send_buffer_bytes given to the server under test",
    )
    parser.add_argument(
        "--publish-seconds",
        type=float,
        help="measured window of each publish phase (default 4; --quick 0.5, "
        "and one attempt per run)",
    )
    parser.add_argument(
        "--publish-brokers",
        type=publishing.broker_names,
        help=f"brokers of the publish scenario, from {','.join(publishing.BROKERS)}"
        f" (default: all; --quick {','.join(publishing.QUICK_BROKERS)})",
    )
    parser.add_argument(
        "--redis-cpu",
        choices=("server", "load"),
        default="server",
        help="where the publish scenario's redis-servers run: on the server "
        "CPU with the node (default; Redis's cost counts against the "
        "node) or on the load CPU (Redis on machines of its own, as in "
        "production)",
    )
    parser.add_argument(
        "--otel",
        action="store_true",
        help="trace the Tidings servers (OpenTelemetry, the otel extra), "
        "exporting over OTLP/HTTP to a discarding receiver here; "
        "without it their OTEL_* variables are removed",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        help="before each run, wait up to this many seconds for the machine "
        "to be idle (< 15%% busy) (default 60; --quick 5; 0: never)",
    )
    parser.add_argument(
        "--max-foreign",
        type=float,
        default=20.0,
        help="repeat a run during which other processes used more than this "
        "percentage of a core (default 20)",
    )
    parser.add_argument(
        "--attempts",
        type=int,
        default=3,
        help="attempts per run when other processes disturb it (default 3)",
    )


@dataclass(frozen=True, slots=True)
class Plan:
    runs: int
    scenarios: list[str]
    kinds: list[ServerKind]
    skipped_kinds: dict[str, str]
    subscribers: list[int]
    events: int | None
    seconds: float
    latency_subscribers: int
    latency_rates: list[float]
    latency_seconds: float
    memory_connections: list[int]
    handshakes: int
    handshake_concurrency: int
    quiet_wait: float
    max_foreign: float
    attempts: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        quick = bool(args.quick)
        names = args.servers or (["tidings", "floor", "socketio"] if args.compare else ["tidings"])
        kinds, skipped = available_kinds(names)
        return cls(
            runs=max(1, args.runs or (1 if quick else 3)),
            scenarios=list(args.scenarios or SCENARIOS),
            kinds=kinds,
            skipped_kinds=skipped,
            subscribers=args.subscribers or ([1000] if quick else [1000, 10000]),
            events=args.events,
            seconds=args.seconds or (1.0 if quick else 5.0),
            latency_subscribers=args.latency_subscribers,
            latency_rates=args.latency_rates or ([100.0] if quick else [20.0, 100.0]),
            latency_seconds=args.latency_seconds or (2.0 if quick else 10.0),
            memory_connections=args.memory_connections or ([1000] if quick else [10000, 50000]),
            handshakes=args.handshakes or (500 if quick else 5000),
            handshake_concurrency=args.handshake_concurrency,
            quiet_wait=args.quiet_wait if args.quiet_wait is not None else (5.0 if quick else 60.0),
            max_foreign=args.max_foreign,
            attempts=max(1, args.attempts),
        )


@dataclass(slots=True)
class Figure:
    """One row of the table: a scenario with its parameters, run against every server."""

    scenario: str
    label: str
    metric: str
    unit: str
    better: str
    params: dict[str, Any]
    servers: dict[str, dict[str, Any]]
    note: str = ""
