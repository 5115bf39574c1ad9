"""``tidings bench``: options, the order of runs, aggregation, the table and the JSON file."""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidings import __version__
from tidings.bench import publishing, scenarios
from tidings.bench.generator import BuildError, build_generator
from tidings.bench.otlpsink import Sink, otlp_sink
from tidings.bench.scenarios import Context, RunError
from tidings.bench.servers import (
    Credentials,
    ServerKind,
    available_kinds,
    redis_available,
    write_tokens,
)
from tidings.bench.system import Pinning, machine_info, raise_nofile, wait_quiet

__all__ = ["SCENARIOS", "add_arguments", "run"]

SCENARIOS = ("fanout", "latency", "memory", "handshake", "redis", "publish")

#: Targets of the issue, as ratios to the floor or absolute figures.
TARGETS = {
    "fanout_ratio": 0.80,
    "latency_p99_ms": 15.0,
    "latency_p99_ratio": 1.5,
    "memory_kb": 16.0,
    "handshake_ratio": 0.75,
}


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
    parser.add_argument("--quick", action="store_true",
                        help="a short smoke run: 1 run, smaller sizes, short phases")
    parser.add_argument("--compare", action="store_true",
                        help="run the same scenarios against the floor and python-socketio")
    parser.add_argument("--servers", type=_servers,
                        help="servers to run, e.g. tidings,floor (default: tidings, or all "
                             "three with --compare)")
    parser.add_argument("--scenarios", type=_names, default=None,
                        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)")
    parser.add_argument("--runs", type=int, help="runs per figure (default 3; --quick 1)")
    parser.add_argument("--output", default="tidings-bench.json", help="JSON results file")
    parser.add_argument("--subscribers", type=_ints,
                        help="fan-out sizes (default 1000,10000; --quick 1000)")
    parser.add_argument("--events", type=int,
                        help="events per fan-out run (default: enough for --seconds)")
    parser.add_argument("--seconds", type=float,
                        help="target length of a fan-out run (default 5; --quick 1)")
    parser.add_argument("--latency-subscribers", type=int, default=1000,
                        help="subscribers in the latency scenario (default 1000)")
    parser.add_argument("--latency-rates", type=_floats,
                        help="events/s for the latency scenario (default 20,100; --quick 100)")
    parser.add_argument("--latency-seconds", type=float,
                        help="length of a latency run (default 10; --quick 2)")
    parser.add_argument("--memory-connections", type=_ints,
                        help="idle connections (default 10000,50000; --quick 1000); sizes "
                             "beyond the file-descriptor limit are skipped")
    parser.add_argument("--handshakes", type=int,
                        help="connections per handshake run (default 5000; --quick 500)")
    parser.add_argument("--handshake-concurrency", type=int, default=64,
                        help="handshakes in flight at once")
    parser.add_argument("--batch", type=int, default=50, help="events per publish request")
    parser.add_argument("--publishers", type=int, default=4,
                        help="publish requests in flight in the fan-out scenario")
    parser.add_argument("--send-buffer", type=int, default=64 * 1024 * 1024,
                        help="limits.send_buffer_bytes given to the server under test")
    parser.add_argument("--publish-seconds", type=float,
                        help="measured window of each publish phase (default 4; --quick 0.5, "
                             "and one attempt per run)")
    parser.add_argument("--publish-brokers", type=publishing.broker_names,
                        help=f"brokers of the publish scenario, from {','.join(publishing.BROKERS)}"
                             f" (default: all; --quick {','.join(publishing.QUICK_BROKERS)})")
    parser.add_argument("--redis-cpu", choices=("server", "load"), default="server",
                        help="where the publish scenario's redis-servers run: on the server "
                             "CPU with the node (default; Redis's cost counts against the "
                             "node) or on the load CPU (Redis on machines of its own, as in "
                             "production)")
    parser.add_argument("--otel", action="store_true",
                        help="trace the Tidings servers (OpenTelemetry, the otel extra), "
                             "exporting over OTLP/HTTP to a discarding receiver here; "
                             "without it their OTEL_* variables are removed")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--quiet-wait", type=float,
                        help="before each run, wait up to this many seconds for the machine "
                             "to be idle (< 15%% busy) (default 60; --quick 5; 0: never)")
    parser.add_argument("--max-foreign", type=float, default=20.0,
                        help="repeat a run during which other processes used more than this "
                             "percentage of a core (default 20)")
    parser.add_argument("--attempts", type=int, default=3,
                        help="attempts per run when other processes disturb it (default 3)")


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
        names = args.servers or (["tidings", "floor", "socketio"] if args.compare
                                 else ["tidings"])
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
            quiet_wait=args.quiet_wait if args.quiet_wait is not None else (5.0 if quick
                                                                             else 60.0),
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


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


#: Secondary figures summarised (median, min, max) next to a run's main value.
_EXTRA_KEYS = ("p50_ms", "p99_ms", "p999_ms", "max_ms", "sampled_p50_ms", "sampled_p99_ms",
               "deliveries_per_s", "handshakes_per_s")
#: Rows shown for a latency figure: (key, label suffix).
_LATENCY_ROWS = (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9"))


def _summary(runs: list[dict[str, Any]], errors: list[str]) -> dict[str, Any]:
    values = [run["value"] for run in runs if run.get("value") is not None]
    summary: dict[str, Any] = {"runs": runs, "errors": errors}
    if values:
        summary.update(median=statistics.median(values), min=min(values), max=max(values))
    else:
        summary.update(median=None, min=None, max=None)
    summary["lower_bound"] = any(run.get("lower_bound") for run in runs)
    summary["gen_cpu_max"] = max((run.get("gen_cpu", 0.0) for run in runs), default=None)
    cpus = [run["server_cpu"] for run in runs if run.get("server_cpu") is not None]
    summary["server_cpu_median"] = statistics.median(cpus) if cpus else None
    if any(run.get("saturated") for run in runs):
        summary["saturated"] = True
    if any(run.get("noisy") for run in runs):
        summary["noisy"] = True
    extra = {}
    for key in _EXTRA_KEYS:
        found = [run[key] for run in runs if run.get(key) is not None]
        if found:
            extra[key] = {"median": statistics.median(found), "min": min(found),
                          "max": max(found)}
    if extra:
        summary["extra"] = extra
    return summary


def _measure(plan: Plan, figure: Figure, one: Callable[[ServerKind], dict[str, Any]],
             kinds: Sequence[ServerKind] | None = None) -> None:
    """Run ``one`` ``plan.runs`` times per server, interleaving servers run by run.

    A run during which other processes of the machine used more than
    ``plan.max_foreign`` percent of a core is repeated (at most ``plan.attempts`` times in
    all); if every attempt was disturbed, the least disturbed one is kept, marked noisy.
    """
    kinds = list(plan.kinds if kinds is None else kinds)
    collected: dict[str, tuple[list[dict[str, Any]], list[str]]] = {
        kind.name: ([], []) for kind in kinds
    }
    for index in range(plan.runs):
        for kind in kinds:
            runs, errors = collected[kind.name]
            attempts: list[dict[str, Any]] = []
            for attempt in range(plan.attempts):
                busy_before = wait_quiet(plan.quiet_wait) if plan.quiet_wait > 0 else None
                started = time.monotonic()
                try:
                    result = one(kind)
                except (RunError, RuntimeError, TimeoutError, OSError, ValueError,
                        KeyError) as exc:
                    errors.append(f"run {index + 1}: {exc}")
                    _progress(f"  {figure.label} | {kind.name} run {index + 1}: FAILED: {exc}")
                    break
                result["machine_busy_before"] = busy_before
                result["attempt"] = attempt + 1
                foreign = result.get("foreign_cpu") or 0.0
                extra = ""
                if "server_cpu" in result:
                    extra = (f" (server CPU {result['server_cpu']}%, generator "
                             f"{result['gen_cpu']}%, other processes {foreign}%)")
                _progress(f"  {figure.label} | {kind.name} run {index + 1}/{plan.runs}: "
                          f"{_fmt(result.get('value'), figure.unit)} {figure.unit}{extra} "
                          f"[{time.monotonic() - started:.1f} s]")
                attempts.append(result)
                if foreign <= plan.max_foreign:
                    break
                _progress(f"    other processes used {foreign}% of a core: "
                          + ("repeating" if attempt + 1 < plan.attempts else "kept as noisy"))
            if attempts:
                best = min(attempts, key=lambda r: r.get("foreign_cpu") or 0.0)
                if (best.get("foreign_cpu") or 0.0) > plan.max_foreign:
                    best["noisy"] = True
                runs.append(best)
    figure.servers = {name: _summary(runs, errors) for name, (runs, errors) in collected.items()}


def _fmt(value: Any, unit: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and unit in ("ms", "KB", "ratio", "µs/publish"):
        return f"{value:,.2f}" if value < 100 else f"{value:,.1f}"
    return f"{value:,.0f}"


def _connection_counts(plan: Plan) -> set[int]:
    """How many connections (hence tokens) the selected scenarios open at most."""
    counts = {200}  # warm-up connections
    if "fanout" in plan.scenarios or "redis" in plan.scenarios:
        counts.update(plan.subscribers)
    if "latency" in plan.scenarios or "redis" in plan.scenarios:
        counts.add(plan.latency_subscribers)
    if "memory" in plan.scenarios:
        counts.update(plan.memory_connections)
    if "handshake" in plan.scenarios:
        counts.add(plan.handshakes)
    return counts


def _fanout(ctx: Context, kind: ServerKind, *, n: int, seconds: float,
            events: int | None) -> dict[str, Any]:
    return scenarios.fanout(ctx, kind, n, seconds=seconds, events=events)


def _latency(ctx: Context, kind: ServerKind, *, n: int, rate: float, seconds: float,
             warmup: float) -> dict[str, Any]:
    return scenarios.latency(ctx, kind, n, rate, seconds=seconds, warmup=warmup)


def _memory(ctx: Context, kind: ServerKind, *, n: int) -> dict[str, Any]:
    return scenarios.idle_memory(ctx, kind, n)


def _handshakes(ctx: Context, kind: ServerKind, *, n: int, concurrency: int) -> dict[str, Any]:
    return scenarios.handshakes(ctx, kind, n, concurrency=concurrency)


def _redis_fanout(ctx: Context, kind: ServerKind, *, n: int, seconds: float,
                  events: int | None, cluster: bool = False) -> dict[str, Any]:
    return scenarios.redis_fanout(ctx, kind, n, seconds=seconds, events=events,
                                  cluster=cluster)


def _redis_latency(ctx: Context, kind: ServerKind, *, n: int, rate: float, seconds: float,
                   warmup: float) -> dict[str, Any]:
    return scenarios.redis_latency(ctx, kind, n, rate, seconds=seconds, warmup=warmup)


def _redis_figures(plan: Plan, ctx: Context, figures: list[Figure],
                   skipped: dict[str, str]) -> None:
    """Fan-out and latency through Redis: two Tidings nodes and a private redis-server,
    all on the server CPU; Tidings only (the peers have no Redis mode here)."""
    why = redis_available()
    tidings = [kind for kind in plan.kinds if kind.name == "tidings"]
    if why is None and not tidings:
        why = "only Tidings runs through Redis, and it is not among --servers"
    if why is not None:
        skipped["redis"] = why
        _progress(f"  through Redis: skipped ({why})")
        return
    for n in plan.subscribers:
        figure = Figure("redis_fanout", f"Redis 2 nodes fan-out {n:,} subs", "deliveries_per_s",
                        "deliveries/s", "higher", {"subscribers": n, "nodes": 2}, {})
        _measure(plan, figure, functools.partial(
            _redis_fanout, ctx, n=n, seconds=plan.seconds, events=plan.events), tidings)
        figures.append(figure)
    for n in plan.subscribers:
        figure = Figure("redis_fanout", f"Redis cluster 3x0, 2 nodes fan-out {n:,} subs",
                        "deliveries_per_s", "deliveries/s", "higher",
                        {"subscribers": n, "nodes": 2, "shards": 3}, {})
        _measure(plan, figure, functools.partial(
            _redis_fanout, ctx, n=n, seconds=plan.seconds, events=plan.events,
            cluster=True), tidings)
        figures.append(figure)
    n = plan.latency_subscribers
    for rate in plan.latency_rates:
        figure = Figure("redis_latency", f"Redis 2 nodes latency {rate:g} ev/s x {n:,}",
                        "p99_ms", "ms", "lower", {"subscribers": n, "rate": rate, "nodes": 2},
                        {})
        _measure(plan, figure, functools.partial(
            _redis_latency, ctx, n=n, rate=rate, seconds=plan.latency_seconds,
            warmup=min(1.0, plan.latency_seconds / 2)), tidings)
        figures.append(figure)


def _publish_figures(plan: Plan, args: argparse.Namespace, ctx: Context,
                     figures: list[Figure], skipped: dict[str, str]) -> None:
    """Publishes per second through each broker, on one Tidings node (tidings/bench/
    publishing.py); Tidings only."""
    if not any(kind.name == "tidings" for kind in plan.kinds):
        skipped["publish"] = "only Tidings runs the publish scenario, and it is not among --servers"
        return
    rows, why = publishing.measure_publish(ctx, publishing.plan_from_args(
        args, runs=plan.runs, quiet_wait=plan.quiet_wait, max_foreign=plan.max_foreign,
        attempts=plan.attempts), progress=_progress)
    skipped.update(why)
    for row in rows:
        figures.append(Figure(row.scenario, row.label, row.metric, row.unit, row.better,
                              row.params, {"tidings": _summary(row.runs, row.errors)},
                              row.note))


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by ``args``; print the table; write and return the JSON."""
    plan = Plan.from_args(args)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C, so that every process started here is stopped.
        signal.signal(signal.SIGTERM, _terminate)
    pinning = Pinning.detect(not args.no_pin)
    pinning.pin_self()
    nofile = raise_nofile()
    if not plan.kinds:
        raise SystemExit(f"tidings bench: no server to run: {plan.skipped_kinds}")
    try:
        exe = build_generator()
    except BuildError as exc:
        raise SystemExit(f"tidings bench: {exc}") from None
    credentials = Credentials.generate()
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="tidings-bench-"))
    sizes = sorted(_connection_counts(plan))
    usable = [n for n in sizes if n + 500 <= nofile]
    _progress(f"tidings bench: servers {[k.name for k in plan.kinds]}, {plan.runs} run(s) each, "
              f"pinning {pinning.method} (server CPU {pinning.server_cpu}, load CPU "
              f"{pinning.load_cpu}), file descriptors {nofile}")
    tokens = {n: write_tokens(work / f"tokens-{n}.txt", credentials.secret, n) for n in usable}
    ctx = Context(exe=exe, pinning=pinning, credentials=credentials, tokens=tokens,
                  send_buffer=args.send_buffer, batch=args.batch, publishers=args.publishers)
    figures: list[Figure] = []
    skipped: dict[str, str] = dict(plan.skipped_kinds)
    sink: Sink | None = None

    with contextlib.ExitStack() as stack:
        if getattr(args, "otel", False):
            if importlib.util.find_spec("opentelemetry.sdk") is None:
                raise SystemExit("tidings bench: --otel needs the otel extra "
                                 "(pip install 'tidings[otel]')")
            sink = stack.enter_context(otlp_sink())
            ctx.server_env = sink.env()
            _progress(f"tidings bench: tracing on, spans exported to {sink.endpoint}")
        _run_figures(plan, args, ctx, figures, skipped, nofile, work)

    report = _report(plan, pinning, figures, skipped, started)
    if sink is not None:
        report["otel"] = sink.summary()
    output = Path(args.output)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(render_table(report))
    print(f"\nresults written to {output}")
    return report


def _run_figures(plan: Plan, args: argparse.Namespace, ctx: Context, figures: list[Figure],
                 skipped: dict[str, str], nofile: int, work: Path) -> None:
    """Every figure of ``plan``, into ``figures`` (and why some were not, ``skipped``)."""
    try:
        if "fanout" in plan.scenarios:
            for n in plan.subscribers:
                if n + 500 > nofile:
                    skipped[f"fanout {n}"] = f"needs {n + 500} file descriptors, limit {nofile}"
                    continue
                figure = Figure("fanout", f"fan-out {n:,} subs", "deliveries_per_s",
                                "deliveries/s", "higher", {"subscribers": n}, {})
                _measure(plan, figure, functools.partial(
                    _fanout, ctx, n=n, seconds=plan.seconds, events=plan.events))
                figures.append(figure)
        if "latency" in plan.scenarios:
            n = plan.latency_subscribers
            for rate in plan.latency_rates:
                figure = Figure("latency", f"latency {rate:g} ev/s x {n:,}", "p99_ms", "ms",
                                "lower", {"subscribers": n, "rate": rate}, {})
                _measure(plan, figure, functools.partial(
                    _latency, ctx, n=n, rate=rate, seconds=plan.latency_seconds,
                    warmup=min(1.0, plan.latency_seconds / 2)))
                figures.append(figure)
        if "memory" in plan.scenarios:
            for n in plan.memory_connections:
                if n + 500 > nofile:
                    skipped[f"memory {n}"] = (f"needs about {n + 500} file descriptors per "
                                              f"process; the hard limit is {nofile}")
                    _progress(f"  idle memory {n:,}: skipped ({skipped[f'memory {n}']})")
                    continue
                figure = Figure("memory", f"idle memory {n:,} conns", "kb_per_connection",
                                "KB", "lower", {"connections": n}, {})
                _measure(plan, figure, functools.partial(_memory, ctx, n=n))
                figures.append(figure)
        if "handshake" in plan.scenarios:
            n = plan.handshakes
            figure = Figure("handshake", f"handshakes ({n:,}, {plan.handshake_concurrency} "
                            "in flight)", "handshakes_per_s", "/s", "higher",
                            {"connections": n, "concurrency": plan.handshake_concurrency}, {})
            _measure(plan, figure, functools.partial(
                _handshakes, ctx, n=n, concurrency=plan.handshake_concurrency))
            figures.append(figure)
        if "redis" in plan.scenarios:
            _redis_figures(plan, ctx, figures, skipped)
        if "publish" in plan.scenarios:
            _publish_figures(plan, args, ctx, figures, skipped)
    finally:
        for path in work.iterdir():
            path.unlink()
        work.rmdir()


def _ratio(figure: Figure, name: str) -> float | None:
    floor = figure.servers.get("floor", {}).get("median")
    mine = figure.servers.get(name, {}).get("median")
    if not floor or mine is None:
        return None
    return round(float(mine) / float(floor), 3)


def _targets(figures: Sequence[Figure]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    for figure in figures:
        tidings = figure.servers.get("tidings", {})
        value = tidings.get("median")
        if value is None:
            continue
        ratio = _ratio(figure, "tidings")
        if figure.scenario == "fanout" and ratio is not None:
            checks.append({"figure": figure.label, "target": ">= 80% of the floor",
                           "value": ratio, "met": ratio >= TARGETS["fanout_ratio"]})
        elif figure.scenario == "latency" and figure.params["rate"] == 100:
            checks.append({"figure": figure.label, "target": "p99 <= 15 ms", "value": value,
                           "met": value <= TARGETS["latency_p99_ms"]})
            if ratio is not None:
                checks.append({"figure": figure.label, "target": "p99 <= 1.5x the floor",
                               "value": ratio, "met": ratio <= TARGETS["latency_p99_ratio"]})
        elif figure.scenario == "memory":
            checks.append({"figure": figure.label, "target": "<= 16 KB per connection",
                           "value": value, "met": value <= TARGETS["memory_kb"]})
        elif figure.scenario == "publish_ratio" and figure.params.get("target"):
            checks.append({"figure": figure.label, "target": f">= {publishing.TARGET_RATIO} "
                           "of the memory broker", "value": value,
                           "met": value >= publishing.TARGET_RATIO})
        elif figure.scenario == "handshake" and ratio is not None:
            checks.append({"figure": figure.label, "target": ">= 75% of the floor",
                           "value": ratio, "met": ratio >= TARGETS["handshake_ratio"]})
    return checks


def _report(plan: Plan, pinning: Pinning, figures: Sequence[Figure], skipped: dict[str, str],
            started: float) -> dict[str, Any]:
    return {
        "tidings_version": __version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "machine": machine_info(pinning),
        "config": {
            "runs": plan.runs,
            "servers": [kind.name for kind in plan.kinds],
            "scenarios": plan.scenarios,
            "fanout_subscribers": plan.subscribers,
            "fanout_seconds": plan.seconds,
            "fanout_events": plan.events,
            "latency_subscribers": plan.latency_subscribers,
            "latency_rates": plan.latency_rates,
            "latency_seconds": plan.latency_seconds,
            "memory_connections": plan.memory_connections,
            "handshakes": plan.handshakes,
            "handshake_concurrency": plan.handshake_concurrency,
            "quiet_wait": plan.quiet_wait,
            "max_foreign": plan.max_foreign,
            "generator_bottleneck_percent": scenarios.GEN_BOTTLENECK_PERCENT,
        },
        "results": [
            {
                "scenario": figure.scenario,
                "label": figure.label,
                "metric": figure.metric,
                "unit": figure.unit,
                "better": figure.better,
                "params": figure.params,
                "servers": figure.servers,
                "note": figure.note,
                "ratio_vs_floor": {name: _ratio(figure, name) for name in figure.servers
                                   if name != "floor" and "floor" in figure.servers},
            }
            for figure in figures
        ],
        "targets": _targets(figures),
        "skipped": skipped,
    }


def _cell(summary: dict[str, Any], unit: str) -> str:
    median = summary.get("median")
    if median is None:
        return "failed" if summary.get("errors") else "-"
    text = f"{_fmt(median, unit)} [{_fmt(summary['min'], unit)}-{_fmt(summary['max'], unit)}]"
    if summary.get("lower_bound"):
        text = ">=" + text
    if summary.get("saturated"):
        text += " SAT"
    if summary.get("noisy"):
        text += " *"
    return text


def _ratio_text(ratio: float) -> str:
    return f"{ratio:.2f}" if ratio >= 0.1 else f"{ratio:.4f}"


def render_table(report: dict[str, Any]) -> str:
    """The results as a plain-text table: median [min-max] per server, ratios to the floor."""
    servers: list[str] = report["config"]["servers"]
    header = ["figure", "unit", *[f"{name} median [min-max]" for name in servers]]
    if "floor" in servers:
        header += [f"{name}/floor" for name in servers if name != "floor"]
    header += ["gen CPU max %", "server CPU %"]
    rows = [header]
    for result in report["results"]:
        unit = result["unit"]
        views: list[tuple[str, dict[str, dict[str, Any]]]]
        if result["scenario"] in ("latency", "redis_latency"):
            views = []
            for key, suffix in _LATENCY_ROWS:
                per_server = {}
                for name, summary in result["servers"].items():
                    view = dict(summary.get("extra", {}).get(key, {"median": None}))
                    view.update(lower_bound=summary.get("lower_bound"), noisy=summary.get("noisy"),
                                saturated=summary.get("saturated"),
                                errors=summary.get("errors"))
                    per_server[name] = view
                views.append((f"{result['label']} {suffix}", per_server))
        else:
            views = [(result["label"], result["servers"])]
        for label, per_server in views:
            row = [label, unit]
            row += [_cell(per_server.get(name, {}), unit) for name in servers]
            if "floor" in servers:
                floor = per_server.get("floor", {}).get("median")
                for name in servers:
                    if name == "floor":
                        continue
                    mine = per_server.get(name, {}).get("median")
                    row.append(_ratio_text(mine / floor) if floor and mine is not None else "-")
            gen = [result["servers"][n].get("gen_cpu_max") for n in servers
                   if result["servers"].get(n, {}).get("gen_cpu_max") is not None]
            cpu = [f"{result['servers'][n]['server_cpu_median']:.0f}" for n in servers
                   if result["servers"].get(n, {}).get("server_cpu_median") is not None]
            row.append(f"{max(gen):.0f}" if gen else "-")
            row.append("/".join(cpu) if cpu else "-")
            rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = []
    if any(s.get("lower_bound") for r in report["results"] for s in r["servers"].values()):
        notes.append(">= : the load generator used > 90% of its core: a lower bound")
    if any(s.get("saturated") for r in report["results"] for s in r["servers"].values()):
        notes.append("SAT: the server could not keep up with the offered rate (events lost, "
                     "or p50 > 1 s, or the publisher fell behind)")
    if any(s.get("noisy") for r in report["results"] for s in r["servers"].values()):
        notes.append("*  : other processes of the machine used more than "
                     f"{report['config']['max_foreign']:g}% of a core during a kept run")
    notes.append("server CPU %: median per server, in the order of the columns")
    for note in dict.fromkeys(r["note"] for r in report["results"] if r.get("note")):
        notes.append(note)
    for check in report["targets"]:
        mark = "met" if check["met"] else "MISSED"
        notes.append(f"target {check['figure']}: {check['target']}: {check['value']} -> {mark}")
    for name, why in report["skipped"].items():
        notes.append(f"skipped {name}: {why}")
    machine = report["machine"]
    title = (f"tidings bench {report['tidings_version']}, {report['config']['runs']} run(s), "
             f"{machine['cpu_model']} x{machine['cpus']}, Python {machine['python']}, "
             f"pinning {machine['pinning']['method']}")
    return "\n".join([title, "", *lines, "", *notes])
