"""``tidings serve --workers N``: N worker processes sharing one port, supervised.

The supervisor reserves the port (``SO_REUSEPORT``), starts N workers, each a full node
on the Redis broker listening on that port with ``SO_REUSEPORT`` so the kernel spreads
connections over them, and restarts a worker that dies (with backoff). SIGTERM or SIGINT
is forwarded to every worker, which drains (readiness fails, clients get 1001); the
supervisor exits 0 once all have exited.

A worker receives the settings as one JSON line on its standard input and keeps that pipe
open: when the supervisor disappears, even by ``kill -9``, the pipe closes and the worker
drains and exits instead of living on unsupervised. A worker reports readiness by writing
its URL to a pipe inherited from the supervisor.

A worker that fails before it ever became ready (a port in use, an unreachable TLS file)
stops the whole start-up: the supervisor exits with that worker's status.

Metrics: the supervisor makes a private directory where every worker keeps its metric
values (``PROMETHEUS_MULTIPROC_DIR``) and the supervisor records which pid is which
worker, so that ``/metrics``, answered by whichever worker the kernel picks, describes
the whole server (``tidings.metrics``). The supervisor removes it when it exits; when the
supervisor was killed, the last worker to exit does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from tidings.config import Settings, load_settings
from tidings.errors import ConfigError
from tidings.metrics import forget_process, leave_metrics, record_process

__all__ = ["run_workers"]

logger = logging.getLogger(__name__)

#: A worker that ran at least this long before dying is restarted after the first delay.
STABLE_AFTER = 10.0
#: Seconds beyond the workers' own drain and shutdown budget before stragglers are killed:
#: room for a process to flush its last lines and exit after its server has closed.
STOP_MARGIN = 5.0
#: Seconds the keeper tasks get to notice their killed workers and end, after which they
#: are cancelled: a SIGKILLed process is reaped at once, so this only bounds a stuck wait.
REAP_TIMEOUT = 5.0


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) with SO_REUSEPORT: fixes the port for every worker and
    fails early when another program holds it."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def run_workers(
    settings: Settings,
    workers: int | None = None,
    *,
    restart_delay: tuple[float, float] = (0.5, 30.0),
) -> int:
    """Run ``workers`` (default ``settings.workers``) supervised worker processes until
    SIGTERM/SIGINT; return the exit status for the command line.

    ``settings`` must be final (development credentials already filled in), since every
    worker must share them.
    """
    count = workers or settings.workers
    if settings.broker.url.startswith("memory://"):
        print(
            "tidings: configuration error: workers: more than one worker needs the "
            "Redis broker (broker.url)",
            file=sys.stderr,
        )
        return 2
    if not hasattr(socket, "SO_REUSEPORT"):
        print("tidings: --workers needs SO_REUSEPORT, which this platform lacks", file=sys.stderr)
        return 2
    server = settings.server
    # The internal listener (server.internal_port) is shared by the workers the same way.
    listeners = [("port", server.host, server.port)]
    if server.internal_port is not None:
        listeners.append(("internal_port", server.internal_host, server.internal_port))
    with contextlib.ExitStack() as reservations:
        ports: dict[str, int] = {}
        for key, host, wanted in listeners:
            try:
                reservation = reservations.enter_context(_reserve_port(host, wanted))
            except OSError as exc:
                setting = (
                    "server.host, server.port"
                    if key == "port"
                    else "server.internal_host, server.internal_port"
                )
                print(
                    f"tidings: cannot listen on {host}:{wanted} ({setting}): {exc.strerror}",
                    file=sys.stderr,
                )
                return 1
            ports[key] = int(reservation.getsockname()[1])
        final = settings.model_copy(
            update={
                "server": server.model_copy(update=ports),
                "workers": 1,
            }
        )
        with tempfile.TemporaryDirectory(prefix="tidings-metrics-") as metrics_dir:
            return _run(_Supervisor(final, count, restart_delay, metrics_dir).run())


class _Supervisor:
    def __init__(
        self, settings: Settings, count: int, restart_delay: tuple[float, float], metrics_dir: str
    ) -> None:
        self._settings = settings
        self._metrics_dir = metrics_dir
        self._count = count
        self._restart_delay = restart_delay
        self._config = json.dumps(settings.model_dump(mode="json")).encode() + b"\n"
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._stop = asyncio.Event()
        self._status = 0
        self._ready: set[int] = set()
        self._announced = False

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        record_process(self._metrics_dir, os.getpid())
        slots = [
            asyncio.create_task(self._keep(index), name=f"worker-{index}")
            for index in range(1, self._count + 1)
        ]
        await self._stop.wait()
        for proc in list(self._procs.values()):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        server = self._settings.server
        limit = server.shutdown_timeout + server.drain_delay + STOP_MARGIN
        _, pending = await asyncio.wait(slots, timeout=limit)
        for proc in list(self._procs.values()):
            if proc.returncode is None:
                logger.warning("worker pid %d did not stop in time; killing it", proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        if pending:
            await asyncio.wait(pending, timeout=REAP_TIMEOUT)
        for task in slots:
            if not task.done():
                task.cancel()
            elif not task.cancelled() and task.exception() is not None:
                logger.error("worker slot failed", exc_info=task.exception())
                self._status = self._status or 1
        return self._status

    async def _spawn(self, index: int) -> tuple[asyncio.subprocess.Process, str]:
        """Start worker ``index``; return it and its URL ('' if it died before ready)."""
        read_end, write_end = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tidings.workers",
                str(index),
                str(write_end),
                self._metrics_dir,
                stdin=asyncio.subprocess.PIPE,
                pass_fds=(write_end,),
                # Read when the worker first imports prometheus_client: its values go to
                # files there, which every worker reads when scraped.
                env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir},
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        self._procs[index] = proc
        record_process(self._metrics_dir, proc.pid, index)
        assert proc.stdin is not None  # noqa: S101 - created with stdin=PIPE
        proc.stdin.write(self._config)
        with contextlib.suppress(ConnectionError):
            await proc.stdin.drain()
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        with os.fdopen(read_end, "rb") as pipe:
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), pipe
            )
            try:
                line = await reader.readline()
            finally:
                transport.close()
        return proc, line.decode().strip()

    async def _keep(self, index: int) -> None:
        """Keep worker ``index`` running until the supervisor stops."""
        low, high = self._restart_delay
        delay = low
        ever_ready = False
        while not self._stop.is_set():
            started = time.monotonic()
            proc, url = await self._spawn(index)
            if url:
                if ever_ready:
                    logger.info("worker %d restarted (pid %d)", index, proc.pid)
                ever_ready = True
                print(f"tidings: worker {index} ready (pid {proc.pid})", flush=True)
                self._worker_ready(index, url)
            code = await proc.wait()
            forget_process(self._metrics_dir, proc.pid, index)
            self._ready.discard(index)
            if proc.stdin is not None:
                proc.stdin.close()
            if self._stop.is_set():
                return
            # Through logging, not print: an operator's log pipeline reads these as JSON.
            if not ever_ready:
                logger.error("worker %d failed to start (exit status %s); stopping", index, code)
                self._status = code if code and code > 0 else 1
                self._stop.set()
                return
            delay = low if time.monotonic() - started >= STABLE_AFTER else delay
            logger.warning(
                "worker %d (pid %d) exited with status %s; restarting in %.1f s",
                index,
                proc.pid,
                code,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()
            delay = min(high, delay * 2)

    def _worker_ready(self, index: int, url: str) -> None:
        self._ready.add(index)
        if not self._announced and len(self._ready) == self._count:
            self._announced = True
            print(f"tidings: listening on {url} with {self._count} workers", flush=True)


# -- the worker process ----------------------------------------------------------------


def _worker_main(argv: Sequence[str]) -> int:
    from tidings.logs import configure_logging

    index, ready_fd, metrics_dir = int(argv[0]), int(argv[1]), argv[2]
    line = sys.stdin.buffer.readline()
    try:
        settings = load_settings(None, json.loads(line), environ={})
    except (ValueError, ConfigError) as exc:
        print(f"tidings: worker {index}: bad settings from the supervisor: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.logging.level, settings.logging.format, settings.secrets)
    return _run(_serve_worker(settings, ready_fd, metrics_dir, index))


async def _serve_worker(settings: Settings, ready_fd: int, metrics_dir: str, index: int) -> int:
    from tidings.metrics import Metrics
    from tidings.server import ListenError, running, tune_gc

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # The supervisor holds our stdin open; EOF means it is gone.
    lifeline = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(lifeline), sys.stdin
    )
    watcher = asyncio.create_task(lifeline.read())
    watcher.add_done_callback(lambda _: stop.set())
    try:
        metrics = Metrics(multiprocess_dir=metrics_dir)
        async with running(settings, reuse_port=True, metrics=metrics) as server:
            tune_gc()
            os.write(ready_fd, f"{server.http_url}\n".encode())
            os.close(ready_fd)
            await stop.wait()
    except ConfigError as exc:
        print(f"tidings: configuration error: {exc.key}: {exc.reason}", file=sys.stderr)
        return 2
    except ListenError as exc:
        print(f"tidings: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(
            f"tidings: cannot listen on {settings.server.host}:{settings.server.port}: "
            f"{exc.strerror}",
            file=sys.stderr,
        )
        return 1
    finally:
        orphaned = watcher.done() and not watcher.cancelled()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        transport.close()
        if orphaned:
            # The supervisor was killed and cannot remove the metrics directory.
            leave_metrics(metrics_dir, index)
    return 0


if __name__ == "__main__":
    raise SystemExit(_worker_main(sys.argv[1:]))
