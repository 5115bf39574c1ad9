"""Processes and the machine: CPU pinning, /proc readings, file-descriptor limits."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO, Any, TypeVar

__all__ = [
    "CpuSample",
    "Pinning",
    "Proc",
    "core_busy",
    "cpu_sample",
    "foreign_cpu",
    "machine_info",
    "raise_nofile",
    "rss_bytes",
    "run_fast",
    "wait_quiet",
]

T = TypeVar("T")

_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Pinning:
    """How processes are put on CPUs: ``taskset``, ``sched_setaffinity`` or not at all."""

    method: str
    server_cpu: int | None
    load_cpu: int | None

    @classmethod
    def detect(cls, enabled: bool = True) -> Pinning:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if not enabled or len(cpus) < 2:
            return cls("none", None, None)
        method = "taskset" if shutil.which("taskset") else "sched_setaffinity"
        return cls(method, cpus[0], cpus[1])

    def command(self, argv: Sequence[str], cpu: int | None) -> list[str]:
        if self.method == "taskset" and cpu is not None:
            return ["taskset", "-c", str(cpu), *argv]
        return list(argv)

    def preexec(self, cpu: int | None) -> Any:
        if self.method != "sched_setaffinity" or cpu is None:
            return None

        def pin() -> None:
            os.sched_setaffinity(0, {cpu})

        return pin

    def pin_self(self) -> None:
        """Keep the orchestrating process off the server's CPU."""
        if self.load_cpu is not None and hasattr(os, "sched_setaffinity"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, {self.load_cpu})


class Proc:
    """A child process with line-oriented stdin/stdout, stopped by its own PID."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        cpu: int | None,
        pinning: Pinning,
        env: Mapping[str, str] | None = None,
        name: str = "",
    ) -> None:
        self.name = name or Path(argv[0]).name
        # stderr goes to a file: a pipe nobody reads could fill and stall the process.
        self._errors = tempfile.TemporaryFile(mode="w+", prefix="tidings-bench-")  # noqa: SIM115
        self.popen = subprocess.Popen(  # noqa: S603 - argv built by the bench itself
            pinning.command(argv, cpu),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._errors,
            env=dict(env) if env is not None else None,
            text=True,
            bufsize=1,
            preexec_fn=pinning.preexec(cpu),
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def stdin(self) -> IO[str]:
        if self.popen.stdin is None:
            raise RuntimeError(f"{self.name} has no stdin")
        return self.popen.stdin

    def send(self, line: str) -> None:
        self.stdin.write(line + "\n")
        self.stdin.flush()

    def readline(self, timeout: float) -> str:
        """The next stdout line; raises ``TimeoutError`` or ``RuntimeError`` (exited)."""
        import select

        stdout = self.popen.stdout
        if stdout is None:
            raise RuntimeError(f"{self.name} has no stdout")
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: no output within {timeout:.0f} s")
            ready, _, _ = select.select([stdout], [], [], min(remaining, 1.0))
            if ready:
                line = stdout.readline()
                if line:
                    return line.rstrip("\n")
                raise RuntimeError(f"{self.name} exited ({self.popen.wait()}): {self.stderr()}")

    def stderr(self) -> str:
        """The last 2,000 characters the process wrote to stderr."""
        try:
            self._errors.flush()
            self._errors.seek(0)
            return self._errors.read()[-2000:].strip()
        except (OSError, ValueError):
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; always reaps the process."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def discard(self) -> None:
        """Release the stderr file (after ``stop``)."""
        with contextlib.suppress(OSError):
            self._errors.close()


@dataclass(frozen=True, slots=True)
class CpuSample:
    """CPU seconds used by some processes, one core's and the whole machine's busy/total
    jiffies, at a time."""

    wall: float
    proc_seconds: dict[int, float]
    cores: dict[int, tuple[int, int, int] | None]
    machine: tuple[int, int, int] | None = None


def _proc_cpu_seconds(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime


def _core_jiffies(cpu: int | None) -> tuple[int, int, int] | None:
    """(busy, total, irq) jiffies of one CPU, or of all CPUs together with ``cpu=-1``.

    ``busy`` includes interrupt time; ``irq`` is the hard and soft interrupt part of it,
    which the kernel does not charge to any process.
    """
    if cpu is None:
        return None
    prefix = "cpu " if cpu < 0 else f"cpu{cpu} "
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith(prefix):
                values = [int(v) for v in line.split()[1:9]]
                idle = values[3] + values[4]
                return sum(values) - idle, sum(values), values[5] + values[6]
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_sample(pids: Sequence[int], cores: Sequence[int | None]) -> CpuSample:
    return CpuSample(
        time.monotonic(),
        {pid: _proc_cpu_seconds(pid) for pid in pids},
        {cpu: _core_jiffies(cpu) for cpu in cores if cpu is not None},
        _core_jiffies(-1),
    )


def foreign_cpu(before: CpuSample, after: CpuSample) -> float | None:
    """CPU used by other processes of the machine during the window, in % of one core:
    the machine's busy time, less interrupt time and what the sampled processes used."""
    if before.machine is None or after.machine is None:
        return None
    wall = after.wall - before.wall
    if wall <= 0:
        return None
    busy = (after.machine[0] - before.machine[0]) - (after.machine[2] - before.machine[2])
    ours = sum(
        after.proc_seconds.get(pid, 0.0) - before.proc_seconds.get(pid, 0.0)
        for pid in after.proc_seconds
    )
    return max(0.0, 100.0 * (busy / _TICKS - ours) / wall)


def wait_quiet(limit: float, threshold: float = 15.0, window: float = 0.5) -> float:
    """Wait (at most ``limit`` seconds) until the machine's CPUs are less than
    ``threshold`` percent busy over ``window``; return that last reading."""
    deadline = time.monotonic() + limit
    while True:
        first = _core_jiffies(-1)
        time.sleep(window)
        second = _core_jiffies(-1)
        if first is None or second is None:
            return 0.0
        total = second[1] - first[1]
        busy = 100.0 * (second[0] - first[0]) / total if total > 0 else 0.0
        if busy < threshold or time.monotonic() >= deadline:
            return round(busy, 1)


def cpu_percent(before: CpuSample, after: CpuSample, pid: int) -> float:
    wall = after.wall - before.wall
    if wall <= 0:
        return 0.0
    used = after.proc_seconds.get(pid, 0.0) - before.proc_seconds.get(pid, 0.0)
    return 100.0 * used / wall


def core_busy(before: CpuSample, after: CpuSample, cpu: int | None) -> float | None:
    """How busy one CPU was between two samples, in percent (interrupt time included)."""
    first, second = before.cores.get(cpu or 0), after.cores.get(cpu or 0)
    if cpu is None or first is None or second is None:
        return None
    busy = second[0] - first[0]
    total = second[1] - first[1]
    return 100.0 * busy / total if total > 0 else None


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def raise_nofile() -> int:
    """Raise this process's soft file-descriptor limit to the hard limit; return it.

    Children inherit it (the servers under test and the load generator).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def machine_info(pinning: Pinning) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    versions: dict[str, str] = {}
    for dist in ("aiohttp", "uvloop", "msgspec", "PyJWT", "python-socketio", "redis"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "pinning": {
            "method": pinning.method,
            "server_cpu": pinning.server_cpu,
            "load_cpu": pinning.load_cpu,
        },
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "libraries": versions,
    }


def run_fast(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is installed (the bench's load processes must cost
    the machine as little as they can), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
