"""The metrics of a server run with ``tidings serve --workers N``.

Every worker writes its ``tidings_*`` values to files in a directory private to the
supervisor (the client library's multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``), so that
a scrape answered by any worker describes the whole server: counters and histograms summed
over every worker that ever ran, gauges over the live ones. The directory also records
which pid is the supervisor and which is each worker (``record_process``), so that
``process_*`` series cover the supervisor and its live workers, read from ``/proc`` by the
worker that answers, with per-worker detail in ``tidings_worker_*`` series labelled
``worker``. ``tidings.metrics`` defines the series themselves.
"""

from __future__ import annotations

import gc
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, PlatformCollector
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["GcCounters", "forget_process", "leave_metrics", "record_process", "render_server"]

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


class GcCounters:
    """``python_gc_*`` as shared counters, for workers: the client library's collector
    reads only its own process."""

    def __init__(self, registry: CollectorRegistry) -> None:
        generations = [str(index) for index in range(len(gc.get_stats()))]
        collected = Counter(
            "python_gc_objects_collected",
            "Objects collected during gc",
            ["generation"],
            registry=registry,
        )
        uncollectable = Counter(
            "python_gc_objects_uncollectable",
            "Uncollectable objects found during GC",
            ["generation"],
            registry=registry,
        )
        collections = Counter(
            "python_gc_collections",
            "Number of times this generation was collected",
            ["generation"],
            registry=registry,
        )
        # Per worker: a gauge per process ("liveall" labels it by pid, which a scrape
        # turns into the worker's number).
        per_worker = Gauge(
            "tidings_worker_gc_collections",
            "Collections of this generation by one worker's garbage collector",
            ["generation"],
            registry=registry,
            multiprocess_mode="liveall",
        )
        self._per_worker = [per_worker.labels(generation) for generation in generations]
        self._counters = [
            (key, counter.labels(generation))
            for generation in generations
            for key, counter in (
                ("collected", collected),
                ("uncollectable", uncollectable),
                ("collections", collections),
            )
        ]
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


def render_server(directory: str) -> bytes:
    """A scrape of the whole server whose workers share ``directory``."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    shared = multiprocess.MultiProcessCollector(None, path=directory)  # type: ignore[no-untyped-call]
    registry.register(_ByWorker(shared, directory))
    registry.register(_ServerProcesses(directory))
    PlatformCollector(registry=registry)
    return generate_latest(registry)


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
        yield _counter(
            "process_cpu_seconds",
            "Total user and system CPU time of the server's processes in seconds",
            sum(p.cpu_seconds for p in every) + reaped,
        )
        yield _gauge(
            "process_resident_memory_bytes",
            "Resident memory of the server's processes in bytes",
            sum(p.resident_bytes for p in every),
        )
        yield _gauge(
            "process_virtual_memory_bytes",
            "Virtual memory of the server's processes in bytes",
            sum(p.virtual_bytes for p in every),
        )
        yield _gauge(
            "process_open_fds",
            "Open file descriptors of the server's processes",
            sum(p.open_fds for p in every),
        )
        yield _gauge(
            "process_start_time_seconds",
            "Start time of the server's oldest process since the epoch in seconds",
            min(p.start_time for p in every),
        )
        yield from _per_worker(workers)


def _per_worker(workers: Iterable[tuple[str, _Proc]]) -> Iterator[Metric]:
    rows = list(workers)
    cpu = CounterMetricFamily(
        "tidings_worker_cpu_seconds",
        "User and system CPU time of one worker in seconds",
        labels=["worker"],
    )
    resident = GaugeMetricFamily(
        "tidings_worker_resident_memory_bytes",
        "Resident memory of one worker in bytes",
        labels=["worker"],
    )
    fds = GaugeMetricFamily(
        "tidings_worker_open_fds", "Open file descriptors of one worker", labels=["worker"]
    )
    max_fds = GaugeMetricFamily(
        "tidings_worker_max_fds", "File descriptor limit of one worker", labels=["worker"]
    )
    started = GaugeMetricFamily(
        "tidings_worker_start_time_seconds",
        "Start time of one worker since the epoch in seconds",
        labels=["worker"],
    )
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
