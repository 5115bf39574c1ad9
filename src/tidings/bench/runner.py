"""``tidings bench``: the order of runs and the runs themselves (options in
``tidings.bench.plan``, aggregation, the table and the JSON file in ``tidings.bench.report``)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tidings.bench import publishing, scenarios
from tidings.bench.generator import BuildError, build_generator
from tidings.bench.otlpsink import Sink, otlp_sink
from tidings.bench.plan import SCENARIOS, Figure, Plan, add_arguments
from tidings.bench.report import build_report, fmt, render_table, summarise
from tidings.bench.scenarios import Context, RunError
from tidings.bench.servers import (
    Credentials,
    ServerKind,
    redis_available,
    write_tokens,
)
from tidings.bench.system import Pinning, raise_nofile, wait_quiet

__all__ = ["SCENARIOS", "add_arguments", "run"]


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _measure(
    plan: Plan,
    figure: Figure,
    one: Callable[[ServerKind], dict[str, Any]],
    kinds: Sequence[ServerKind] | None = None,
) -> None:
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
                except (RunError, RuntimeError, TimeoutError, OSError, ValueError, KeyError) as exc:
                    errors.append(f"run {index + 1}: {exc}")
                    _progress(f"  {figure.label} | {kind.name} run {index + 1}: FAILED: {exc}")
                    break
                result["machine_busy_before"] = busy_before
                result["attempt"] = attempt + 1
                foreign = result.get("foreign_cpu") or 0.0
                extra = ""
                if "server_cpu" in result:
                    extra = (
                        f" (server CPU {result['server_cpu']}%, generator "
                        f"{result['gen_cpu']}%, other processes {foreign}%)"
                    )
                _progress(
                    f"  {figure.label} | {kind.name} run {index + 1}/{plan.runs}: "
                    f"{fmt(result.get('value'), figure.unit)} {figure.unit}{extra} "
                    f"[{time.monotonic() - started:.1f} s]"
                )
                attempts.append(result)
                if foreign <= plan.max_foreign:
                    break
                _progress(
                    f"    other processes used {foreign}% of a core: "
                    + ("repeating" if attempt + 1 < plan.attempts else "kept as noisy")
                )
            if attempts:
                best = min(attempts, key=lambda r: r.get("foreign_cpu") or 0.0)
                if (best.get("foreign_cpu") or 0.0) > plan.max_foreign:
                    best["noisy"] = True
                runs.append(best)
    figure.servers = {name: summarise(runs, errors) for name, (runs, errors) in collected.items()}


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


def _fanout(
    ctx: Context, kind: ServerKind, *, n: int, seconds: float, events: int | None
) -> dict[str, Any]:
    return scenarios.fanout(ctx, kind, n, seconds=seconds, events=events)


def _latency(
    ctx: Context, kind: ServerKind, *, n: int, rate: float, seconds: float, warmup: float
) -> dict[str, Any]:
    return scenarios.latency(ctx, kind, n, rate, seconds=seconds, warmup=warmup)


def _memory(ctx: Context, kind: ServerKind, *, n: int) -> dict[str, Any]:
    return scenarios.idle_memory(ctx, kind, n)


def _handshakes(ctx: Context, kind: ServerKind, *, n: int, concurrency: int) -> dict[str, Any]:
    return scenarios.handshakes(ctx, kind, n, concurrency=concurrency)


def _redis_fanout(
    ctx: Context,
    kind: ServerKind,
    *,
    n: int,
    seconds: float,
    events: int | None,
    cluster: bool = False,
) -> dict[str, Any]:
    return scenarios.redis_fanout(ctx, kind, n, seconds=seconds, events=events, cluster=cluster)


def _redis_latency(
    ctx: Context, kind: ServerKind, *, n: int, rate: float, seconds: float, warmup: float
) -> dict[str, Any]:
    return scenarios.redis_latency(ctx, kind, n, rate, seconds=seconds, warmup=warmup)


def _redis_figures(
    plan: Plan, ctx: Context, figures: list[Figure], skipped: dict[str, str]
) -> None:
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
        figure = Figure(
            "redis_fanout",
            f"Redis 2 nodes fan-out {n:,} subs",
            "deliveries_per_s",
            "deliveries/s",
            "higher",
            {"subscribers": n, "nodes": 2},
            {},
        )
        _measure(
            plan,
            figure,
            functools.partial(_redis_fanout, ctx, n=n, seconds=plan.seconds, events=plan.events),
            tidings,
        )
        figures.append(figure)
    for n in plan.subscribers:
        figure = Figure(
            "redis_fanout",
            f"Redis cluster 3x0, 2 nodes fan-out {n:,} subs",
            "deliveries_per_s",
            "deliveries/s",
            "higher",
            {"subscribers": n, "nodes": 2, "shards": 3},
            {},
        )
        _measure(
            plan,
            figure,
            functools.partial(
                _redis_fanout, ctx, n=n, seconds=plan.seconds, events=plan.events, cluster=True
            ),
            tidings,
        )
        figures.append(figure)
    n = plan.latency_subscribers
    for rate in plan.latency_rates:
        figure = Figure(
            "redis_latency",
            f"Redis 2 nodes latency {rate:g} ev/s x {n:,}",
            "p99_ms",
            "ms",
            "lower",
            {"subscribers": n, "rate": rate, "nodes": 2},
            {},
        )
        _measure(
            plan,
            figure,
            functools.partial(
                _redis_latency,
                ctx,
                n=n,
                rate=rate,
                seconds=plan.latency_seconds,
                warmup=min(1.0, plan.latency_seconds / 2),
            ),
            tidings,
        )
        figures.append(figure)


def _publish_figures(
    plan: Plan,
    args: argparse.Namespace,
    ctx: Context,
    figures: list[Figure],
    skipped: dict[str, str],
) -> None:
    """Publishes per second through each broker, on one Tidings node (tidings/bench/
    publishing.py); Tidings only."""
    if not any(kind.name == "tidings" for kind in plan.kinds):
        skipped["publish"] = "only Tidings runs the publish scenario, and it is not among --servers"
        return
    rows, why = publishing.measure_publish(
        ctx,
        publishing.plan_from_args(
            args,
            runs=plan.runs,
            quiet_wait=plan.quiet_wait,
            max_foreign=plan.max_foreign,
            attempts=plan.attempts,
        ),
        progress=_progress,
    )
    skipped.update(why)
    for row in rows:
        figures.append(
            Figure(
                row.scenario,
                row.label,
                row.metric,
                row.unit,
                row.better,
                row.params,
                {"tidings": summarise(row.runs, row.errors)},
                row.note,
            )
        )


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
    _progress(
        f"tidings bench: servers {[k.name for k in plan.kinds]}, {plan.runs} run(s) each, "
        f"pinning {pinning.method} (server CPU {pinning.server_cpu}, load CPU "
        f"{pinning.load_cpu}), file descriptors {nofile}"
    )
    tokens = {n: write_tokens(work / f"tokens-{n}.txt", credentials.secret, n) for n in usable}
    ctx = Context(
        exe=exe,
        pinning=pinning,
        credentials=credentials,
        tokens=tokens,
        send_buffer=args.send_buffer,
        batch=args.batch,
        publishers=args.publishers,
    )
    figures: list[Figure] = []
    skipped: dict[str, str] = dict(plan.skipped_kinds)
    sink: Sink | None = None

    with contextlib.ExitStack() as stack:
        if getattr(args, "otel", False):
            if importlib.util.find_spec("opentelemetry.sdk") is None:
                raise SystemExit(
                    "tidings bench: --otel needs the otel extra (pip install 'tidings[otel]')"
                )
            sink = stack.enter_context(otlp_sink())
            ctx.server_env = sink.env()
            _progress(f"tidings bench: tracing on, spans exported to {sink.endpoint}")
        _run_figures(plan, args, ctx, figures, skipped, nofile, work)

    report = build_report(plan, pinning, figures, skipped, started)
    if sink is not None:
        report["otel"] = sink.summary()
    output = Path(args.output)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(render_table(report))
    print(f"\nresults written to {output}")
    return report


def _run_figures(
    plan: Plan,
    args: argparse.Namespace,
    ctx: Context,
    figures: list[Figure],
    skipped: dict[str, str],
    nofile: int,
    work: Path,
) -> None:
    """Every figure of ``plan``, into ``figures`` (and why some were not, ``skipped``)."""
    try:
        if "fanout" in plan.scenarios:
            for n in plan.subscribers:
                if n + 500 > nofile:
                    skipped[f"fanout {n}"] = f"needs {n + 500} file descriptors, limit {nofile}"
                    continue
                figure = Figure(
                    "fanout",
                    f"fan-out {n:,} subs",
                    "deliveries_per_s",
                    "deliveries/s",
                    "higher",
                    {"subscribers": n},
                    {},
                )
                _measure(
                    plan,
                    figure,
                    functools.partial(_fanout, ctx, n=n, seconds=plan.seconds, events=plan.events),
                )
                figures.append(figure)
        if "latency" in plan.scenarios:
            n = plan.latency_subscribers
            for rate in plan.latency_rates:
                figure = Figure(
                    "latency",
                    f"latency {rate:g} ev/s x {n:,}",
                    "p99_ms",
                    "ms",
                    "lower",
                    {"subscribers": n, "rate": rate},
                    {},
                )
                _measure(
                    plan,
                    figure,
                    functools.partial(
                        _latency,
                        ctx,
                        n=n,
                        rate=rate,
                        seconds=plan.latency_seconds,
                        warmup=min(1.0, plan.latency_seconds / 2),
                    ),
                )
                figures.append(figure)
        if "memory" in plan.scenarios:
            for n in plan.memory_connections:
                if n + 500 > nofile:
                    skipped[f"memory {n}"] = (
                        f"needs about {n + 500} file descriptors per "
                        f"process; the hard limit is {nofile}"
                    )
                    _progress(f"  idle memory {n:,}: skipped ({skipped[f'memory {n}']})")
                    continue
                figure = Figure(
                    "memory",
                    f"idle memory {n:,} conns",
                    "kb_per_connection",
                    "KB",
                    "lower",
                    {"connections": n},
                    {},
                )
                _measure(plan, figure, functools.partial(_memory, ctx, n=n))
                figures.append(figure)
        if "handshake" in plan.scenarios:
            n = plan.handshakes
            figure = Figure(
                "handshake",
                f"handshakes ({n:,}, {plan.handshake_concurrency} in flight)",
                "handshakes_per_s",
                "/s",
                "higher",
                {"connections": n, "concurrency": plan.handshake_concurrency},
                {},
            )
            _measure(
                plan,
                figure,
                functools.partial(_handshakes, ctx, n=n, concurrency=plan.handshake_concurrency),
            )
            figures.append(figure)
        if "redis" in plan.scenarios:
            _redis_figures(plan, ctx, figures, skipped)
        if "publish" in plan.scenarios:
            _publish_figures(plan, args, ctx, figures, skipped)
    finally:
        for path in work.iterdir():
            path.unlink()
        work.rmdir()
