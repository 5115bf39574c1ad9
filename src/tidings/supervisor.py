"""One owner for long-lived background loops: keeps their references, logs their
failures, restarts them with backoff, and cancels and collects them on close.

A loop that must never stop (the gateway's heartbeat and expiry sweep) is *critical*:
while it is down between a failure and its restart, ``healthy`` is False, so readiness
fails and a load balancer stops sending new connections to a node that would not ping
or expire them. A loop that ends without an error is done and not restarted.

Short background jobs (a channel release, a repair) are *tasks* (``start``): run once,
their references kept until they end, a failure logged, and cancelled and collected by
``close`` like the loops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

__all__ = ["Supervisor"]

logger = logging.getLogger(__name__)

#: First and largest delay before a failed loop runs again (doubling in between).
RESTART_DELAY = (0.1, 10.0)


@dataclass(slots=True, eq=False)
class _Loop:
    name: str
    factory: Callable[[], Coroutine[Any, Any, None]]
    critical: bool
    task: asyncio.Task[None] | None = None
    failures: int = 0
    down: bool = False
    done: bool = False


class Supervisor:
    """Runs loops (see the module docstring); ``sleep`` is injectable for tests."""

    def __init__(
        self,
        *,
        delays: tuple[float, float] = RESTART_DELAY,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._delays = delays
        self._sleep = sleep
        self._loops: list[_Loop] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    @property
    def healthy(self) -> bool:
        """False while a critical loop is down (failed and not yet running again)."""
        return not any(loop.critical and loop.down for loop in self._loops)

    def spawn(
        self, name: str, factory: Callable[[], Coroutine[Any, Any, None]], *, critical: bool = False
    ) -> None:
        """Run ``factory()`` as a task now, and again after each failure."""
        if self._closed:
            raise RuntimeError("the supervisor is closed")
        loop = _Loop(name, factory, critical)
        self._loops.append(loop)
        loop.task = asyncio.get_running_loop().create_task(self._run(loop), name=name)

    def start(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` once as a task, held until it ends; a failure is logged (the
        returned task may also be awaited, e.g. to settle what is in flight)."""
        if self._closed:
            coro.close()
            raise RuntimeError("the supervisor is closed")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    @property
    def tasks(self) -> frozenset[asyncio.Task[Any]]:
        """The one-shot tasks still running."""
        return frozenset(self._tasks)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            logger.error("background task %s failed", task.get_name(), exc_info=exc)

    async def _run(self, loop: _Loop) -> None:
        low, high = self._delays
        while not self._closed:
            try:
                await loop.factory()
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._closed:
                    raise  # failed while being cancelled: close() logs it
                loop.failures += 1
                loop.down = True
                delay = min(high, low * 2 ** min(loop.failures - 1, 20))
                logger.exception(
                    "background loop %s failed (%d times); restarting in %gs",
                    loop.name,
                    loop.failures,
                    delay,
                )
                await self._sleep(delay)
                loop.down = False
                continue
            loop.done = True
            return

    async def close(self) -> None:
        """Cancel every loop and wait for each; nothing they raise escapes (it is
        logged), so the caller's later close steps always run."""
        self._closed = True
        loops = [loop.task for loop in self._loops if loop.task is not None]
        shots = list(self._tasks)
        for task in (*loops, *shots):
            task.cancel()
        for task in loops:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                logger.exception("background loop %s failed while closing", task.get_name())
        # One-shot tasks log their own failures (``_task_done``); only collect them here.
        if shots:
            await asyncio.gather(*shots, return_exceptions=True)
