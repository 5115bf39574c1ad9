"""Prometheus metrics behind a small interface; one registry per server instance.

A single process renders its own registry, with the client library's ``process_*`` and
``python_*`` collectors. Under ``tidings serve --workers N`` every worker writes its
``tidings_*`` values to files in a directory private to the supervisor (the client
library's multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``), so that a scrape answered by
any worker describes the whole server: counters and histograms summed over every worker
that ever ran, gauges over the live ones. ``process_*`` series then cover the supervisor
and its live workers, read from ``/proc`` by the worker that answers, with per-worker
detail in ``tidings_worker_*`` series labelled ``worker``.
"""

from __future__ import annotations

import gc
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tidings import __version__

__all__ = ["Metrics", "forget_process", "leave_metrics", "record_process"]

#: Seconds buckets of the publish latency: a Redis round trip or several, up to a timeout.
PUBLISH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
#: Seconds buckets of one event's fan-out to this node's subscribers: microseconds for a
#: few, milliseconds for tens of thousands.
FANOUT_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                  0.005, 0.01, 0.025, 0.05, 0.1, 0.25)

#: The file (in the multiprocess directory) naming the pid of worker ``index``.
_WORKER_FILE = "worker-{}.pid"
_SUPERVISOR_FILE = "supervisor.pid"


def record_process(directory: str, pid: int, index: int | None = None) -> None:
    """Record that ``pid`` is worker ``index`` (None: the supervisor) of the server whose
    metrics live in ``directory``; a scrape then reports its process figures."""
    name = _SUPERVISOR_FILE if index is None else _WORKER_FILE.format(index)
    path = Path(directory, name)
    staging = path.with_suffix(".tmp")
    staging.write_text(str(pid), encoding="ascii")
    staging.replace(path)  # atomic: a scrape never reads half a pid


def forget_process(directory: str, pid: int, index: int) -> None:
    """Worker ``index`` (``pid``) has exited: drop its live gauges and its process
    figures; its counters stay in the totals."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
    path = Path(directory, _WORKER_FILE.format(index))
    try:
        if path.read_text(encoding="ascii").strip() == str(pid):
            path.unlink()
    except (OSError, ValueError):
        pass  # already replaced by its successor, or never written


def leave_metrics(directory: str, index: int) -> None:
    """Worker ``index`` exits after its supervisor died (``kill -9``): drop its record,
    and the last worker to leave removes the directory the supervisor cannot."""
    import fcntl  # here: --workers runs only where it exists, this module everywhere

    folder = Path(directory)
    try:
        with (folder / ".lock").open("a") as lock:
            # Under a lock, so that of workers leaving at once exactly the last removes it.
            fcntl.flock(lock, fcntl.LOCK_EX)
            (folder / _WORKER_FILE.format(index)).unlink(missing_ok=True)
            if not any(folder.glob(_WORKER_FILE.format("*"))):
                shutil.rmtree(folder, ignore_errors=True)
    except OSError:
        pass  # removed already


class Metrics:
    """The server's metrics. Labels are bounded sets: event types, codes, command names,
    worker indexes; never a user, a channel, a token or a URL.

    ``multiprocess_dir`` selects the workers' shared mode (see the module docstring); the
    process must then have been started with ``PROMETHEUS_MULTIPROC_DIR`` set to it.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, *, multiprocess_dir: str | None = None) -> None:
        self._dir = multiprocess_dir
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        if multiprocess_dir is None:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self.connections = Gauge("tidings_connections",
                                 "Open client connections (WebSocket and SSE)",
                                 registry=r, multiprocess_mode="livesum")
        self.subscriptions = Gauge(
            "tidings_subscriptions", "Active channel subscriptions on this server", registry=r,
            multiprocess_mode="livesum",
        )
        self.broker_up = Gauge(
            "tidings_broker_up", "1 while the broker answers (every worker's, under "
            "--workers), else 0", registry=r, multiprocess_mode="livemin",
        )
        build = Gauge("tidings_build_info", "The running Tidings version (value 1)",
                      ["version"], registry=r, multiprocess_mode="livemax")
        build.labels(__version__).set(1)
        self._published = Counter(
            "tidings_events_published", "Events published", ["type"], registry=r
        )
        self._delivered = Counter(
            "tidings_events_delivered", "Event deliveries to connections", ["type"], registry=r
        )
        self._errors = Counter("tidings_errors", "Error messages sent", ["code"], registry=r)
        self._closes = Counter("tidings_closes", "Connections closed", ["code"], registry=r)
        self.webhooks_dropped = Counter(
            "tidings_webhooks_dropped", "Presence webhook events dropped (queue_full, "
            "attempts: retries exhausted, rejected: a 4xx answer)", ["reason"], registry=r)
        self.slow_consumer_closes = Counter(
            "tidings_slow_consumer_closes", "Connections closed for reading too slowly", registry=r
        )
        self.request_head_timeouts = Counter(
            "tidings_request_head_timeouts",
            "Connections closed because a request head was not complete within "
            "server.handshake_timeout",
            registry=r,
        )
        self._latency = Histogram(
            "tidings_command_seconds",
            "Time to handle a client command",
            ["command"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self._publish_seconds = Histogram(
            "tidings_publish_seconds",
            "Time from a publish or batch request to the broker's acknowledgement",
            buckets=PUBLISH_BUCKETS, registry=r,
        )
        self._fanout_seconds = Histogram(
            "tidings_fanout_seconds",
            "Time from an event's arrival from the broker to its frame written to every "
            "subscriber on this server",
            buckets=FANOUT_BUCKETS, registry=r,
        )
        self.handshakes = Counter(
            "tidings_handshakes", "WebSocket handshakes by outcome", ["outcome"], registry=r
        )
        # The two frequent outcomes, resolved once (a labels() lookup takes a lock).
        self.handshake_ok = self.handshakes.labels("ok")
        self.handshake_unauthorized = self.handshakes.labels("unauthorized")
        self.fanned_out = self._fanout_seconds.observe
        self._gc = _GcCounters(r) if multiprocess_dir is not None else None
        self.sync()  # the shared series exist from the start, not from the first period

    def bind_counts(self, connections: Callable[[], int],
                    subscriptions: Callable[[], int]) -> Callable[[], None]:
        """Report the two gauges from these functions; returns what to call after either
        count changed.

        A single process reads them at scrape time and the returned callable does
        nothing: the hot path pays no gauge update. Workers must write every change, as
        a scrape may be answered by another worker.
        """
        if self._dir is None:
            self.connections.set_function(connections)
            self.subscriptions.set_function(subscriptions)
            return _nothing
        set_connections, set_subscriptions = self.connections.set, self.subscriptions.set

        def changed() -> None:
            set_connections(connections())
            set_subscriptions(subscriptions())

        changed()
        return changed

    def published(self, event_type: str, count: int = 1) -> None:
        self._published.labels(event_type).inc(count)

    def delivered(self, event_type: str, count: int) -> None:
        self._delivered.labels(event_type).inc(count)

    def error(self, code: str) -> None:
        self._errors.labels(code).inc()

    def closed(self, code: int) -> None:
        self._closes.labels(str(code)).inc()

    def command(self, name: str, seconds: float) -> None:
        self._latency.labels(name).observe(seconds)

    def publish_acknowledged(self, seconds: float) -> None:
        self._publish_seconds.observe(seconds)

    def sync(self) -> None:
        """Periodic upkeep (the gateway calls it every few seconds): a worker copies its
        garbage collector's statistics into the shared files."""
        if self._gc is not None:
            self._gc.sync()

    def render(self) -> bytes:
        if self._dir is None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        shared = multiprocess.MultiProcessCollector(None, path=self._dir)  # type: ignore[no-untyped-call]
        registry.register(_ByWorker(shared, self._dir))
        registry.register(_ServerProcesses(self._dir))
        PlatformCollector(registry=registry)
        return generate_latest(registry)


def _nothing() -> None:
    pass


class _GcCounters:
    """``python_gc_*`` as shared counters, for workers: the client library's collector
    reads only its own process."""

    def __init__(self, registry: CollectorRegistry) -> None:
        generations = [str(index) for index in range(len(gc.get_stats()))]
        collected = Counter("python_gc_objects_collected", "Objects collected during gc",
                            ["generation"], registry=registry)
        uncollectable = Counter("python_gc_objects_uncollectable",
                                "Uncollectable objects found during GC", ["generation"],
                                registry=registry)
        collections = Counter("python_gc_collections",
                              "Number of times this generation was collected",
                              ["generation"], registry=registry)
        # Per worker: a gauge per process ("liveall" labels it by pid, which a scrape
        # turns into the worker's number).
        per_worker = Gauge("tidings_worker_gc_collections",
                           "Collections of this generation by one worker's garbage collector",
                           ["generation"], registry=registry, multiprocess_mode="liveall")
        self._per_worker = [per_worker.labels(generation) for generation in generations]
        self._counters = [(key, counter.labels(generation))
                          for generation in generations
                          for key, counter in (("collected", collected),
                                               ("uncollectable", uncollectable),
                                               ("collections", collections))]
        self._seen = [0] * len(self._counters)

    def sync(self) -> None:
        stats = gc.get_stats()
        for index, (key, child) in enumerate(self._counters):
            value = stats[index // 3][key]
            if value > self._seen[index]:
                child.inc(value - self._seen[index])
                self._seen[index] = value
        for generation, gauge in enumerate(self._per_worker):
            gauge.set(stats[generation]["collections"])


# -- process figures of the supervisor and its workers, from /proc (Linux) ---------------


@dataclass(frozen=True, slots=True)
class _Proc:
    cpu_seconds: float
    #: CPU of exited children the process has reaped (the supervisor's dead workers).
    children_cpu_seconds: float
    resident_bytes: int
    virtual_bytes: int
    start_time: float
    open_fds: int
    max_fds: float | None


def _boot_time() -> float | None:
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            for line in stat:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _max_fds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/limits", encoding="ascii") as limits:
            for line in limits:
                if line.startswith("Max open files"):
                    soft = line.split()[3]
                    return float("inf") if soft == "unlimited" else float(soft)
    except OSError:
        pass
    return None


def _read_proc(pid: int, boot: float) -> _Proc | None:
    """A process's figures, or None when it is gone (or this is not Linux)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            # Fields after the command name, which may itself hold spaces and parentheses.
            fields = stat.read().rsplit(")", 1)[1].split()
        open_fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    # proc(5) numbers the fields from 1, with state as 3: field n is fields[n - 3].
    return _Proc(
        cpu_seconds=(int(fields[11]) + int(fields[12])) / ticks,
        children_cpu_seconds=(int(fields[13]) + int(fields[14])) / ticks,
        resident_bytes=int(fields[21]) * page,
        virtual_bytes=int(fields[20]),
        start_time=boot + int(fields[19]) / ticks,
        open_fds=open_fds,
        max_fds=_max_fds(pid),
    )


def _pid_in(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None


def _workers(directory: Path) -> dict[int, str]:
    """The live workers' pids, with their numbers (as label values)."""
    found = {}
    for path in directory.glob(_WORKER_FILE.format("*")):
        pid = _pid_in(path)
        if pid is not None:
            found[pid] = path.name.split("-", 1)[1].split(".", 1)[0]
    return found


class _ByWorker(Collector):
    """The shared files' metrics, with each ``tidings_worker_*`` series labelled by the
    worker's number instead of its pid (numbers are a bounded set, pids are not)."""

    def __init__(self, inner: Collector, directory: str) -> None:
        self._inner = inner
        self._dir = Path(directory)

    def collect(self) -> Iterator[Metric]:
        workers: dict[int, str] | None = None
        for metric in self._inner.collect():
            if metric.name.startswith("tidings_worker_"):
                if workers is None:
                    workers = _workers(self._dir)
                samples = []
                for sample in metric.samples:
                    labels = dict(sample.labels)
                    worker = workers.get(int(labels.pop("pid", "0")))
                    if worker is not None:  # else it exited meanwhile
                        samples.append(sample._replace(labels={"worker": worker, **labels}))
                metric.samples = samples
            yield metric


class _ServerProcesses(Collector):
    """``process_*`` for the whole server (the supervisor and its live workers) and
    ``tidings_worker_*`` for each worker, read when scraped."""

    def __init__(self, directory: str) -> None:
        self._dir = Path(directory)

    def _processes(self) -> tuple[_Proc | None, list[tuple[str, _Proc]]]:
        boot = _boot_time()
        if boot is None:
            return None, []
        supervisor_pid = _pid_in(self._dir / _SUPERVISOR_FILE)
        supervisor = _read_proc(supervisor_pid, boot) if supervisor_pid else None
        workers = []
        for pid, worker in sorted(_workers(self._dir).items(), key=lambda item: int(item[1])):
            proc = _read_proc(pid, boot)
            if proc is not None:
                workers.append((worker, proc))
        return supervisor, workers

    def collect(self) -> Iterator[Metric]:
        supervisor, workers = self._processes()
        every = [proc for _, proc in workers]
        if supervisor is not None:
            every.append(supervisor)
        if not every:
            return
        # The supervisor's reaped children keep the CPU total from falling when a
        # worker is replaced.
        reaped = supervisor.children_cpu_seconds if supervisor is not None else 0.0
        yield _counter("process_cpu_seconds",
                       "Total user and system CPU time of the server's processes in seconds",
                       sum(p.cpu_seconds for p in every) + reaped)
        yield _gauge("process_resident_memory_bytes",
                     "Resident memory of the server's processes in bytes",
                     sum(p.resident_bytes for p in every))
        yield _gauge("process_virtual_memory_bytes",
                     "Virtual memory of the server's processes in bytes",
                     sum(p.virtual_bytes for p in every))
        yield _gauge("process_open_fds", "Open file descriptors of the server's processes",
                     sum(p.open_fds for p in every))
        yield _gauge("process_start_time_seconds",
                     "Start time of the server's oldest process since the epoch in seconds",
                     min(p.start_time for p in every))
        yield from _per_worker(workers)


def _per_worker(workers: Iterable[tuple[str, _Proc]]) -> Iterator[Metric]:
    rows = list(workers)
    cpu = CounterMetricFamily("tidings_worker_cpu_seconds",
                              "User and system CPU time of one worker in seconds",
                              labels=["worker"])
    resident = GaugeMetricFamily("tidings_worker_resident_memory_bytes",
                                 "Resident memory of one worker in bytes", labels=["worker"])
    fds = GaugeMetricFamily("tidings_worker_open_fds",
                            "Open file descriptors of one worker", labels=["worker"])
    max_fds = GaugeMetricFamily("tidings_worker_max_fds",
                                "File descriptor limit of one worker", labels=["worker"])
    started = GaugeMetricFamily("tidings_worker_start_time_seconds",
                                "Start time of one worker since the epoch in seconds",
                                labels=["worker"])
    for worker, proc in rows:
        cpu.add_metric([worker], proc.cpu_seconds)
        resident.add_metric([worker], proc.resident_bytes)
        fds.add_metric([worker], proc.open_fds)
        if proc.max_fds is not None:
            max_fds.add_metric([worker], proc.max_fds)
        started.add_metric([worker], proc.start_time)
    yield from (cpu, resident, fds, max_fds, started)


def _counter(name: str, documentation: str, value: float) -> Metric:
    return CounterMetricFamily(name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> Metric:
    return GaugeMetricFamily(name, documentation, value=value)
