"""The supervisor of background loops: restart with backoff, health, close."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tidings.supervisor import Supervisor
from timeouts import TIMEOUT

pytestmark = pytest.mark.timeout(30)

WAIT = TIMEOUT


class Gate:
    """An injected ``sleep`` that records its delays and waits until released."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.waiting = asyncio.Event()
        self._release = asyncio.Event()

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        self.waiting.set()
        await self._release.wait()
        self._release.clear()
        self.waiting.clear()

    def release(self) -> None:
        self._release.set()


async def test_a_failed_critical_loop_is_down_until_it_restarts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A critical loop that raises makes the supervisor unhealthy, is logged, and runs
    again after a doubling delay; once running again the supervisor is healthy."""
    gate = Gate()
    supervisor = Supervisor(delays=(0.1, 0.3), sleep=gate.sleep)
    runs: list[int] = []
    running = asyncio.Event()

    async def flaky() -> None:
        runs.append(len(runs))
        if len(runs) <= 3:
            raise RuntimeError("boom")
        running.set()
        await asyncio.Event().wait()

    supervisor.spawn("flaky", flaky, critical=True)
    for _ in range(3):
        await asyncio.wait_for(gate.waiting.wait(), WAIT)
        assert not supervisor.healthy
        gate.release()
        await asyncio.sleep(0)
    await asyncio.wait_for(running.wait(), WAIT)
    assert supervisor.healthy
    assert gate.delays == [0.1, 0.2, 0.3]
    assert sum("flaky failed" in r.getMessage() for r in caplog.records) == 3
    await supervisor.close()


async def test_a_loop_that_returns_is_not_restarted() -> None:
    """A loop that ends without an error is done: not run again, supervisor healthy."""
    supervisor = Supervisor()
    runs = 0
    finished = asyncio.Event()

    async def once() -> None:
        nonlocal runs
        runs += 1
        finished.set()

    supervisor.spawn("once", once, critical=True)
    await asyncio.wait_for(finished.wait(), WAIT)
    await asyncio.sleep(0)
    assert runs == 1 and supervisor.healthy
    await supervisor.close()


async def test_close_cancels_everything_and_raises_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """close cancels every loop, waits for each, and a loop that fails while being
    cancelled is logged instead of raised; spawning afterwards is refused."""
    supervisor = Supervisor()
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def stubborn() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
            raise ValueError("failed in cleanup")

    supervisor.spawn("stubborn", stubborn)
    await asyncio.wait_for(started.wait(), WAIT)
    with caplog.at_level(logging.ERROR):
        await supervisor.close()
    assert cancelled.is_set()
    assert any("stubborn failed while closing" in r.getMessage() for r in caplog.records)
    with pytest.raises(RuntimeError):
        supervisor.spawn("late", stubborn)


async def test_one_shot_tasks_are_held_logged_and_collected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """start runs a coroutine once, holds it until it ends, logs its failure, and close
    cancels and collects the ones still running; starting after close is refused."""
    supervisor = Supervisor()

    async def fails() -> None:
        raise ValueError("release failed")

    failing = supervisor.start("release:x", fails())
    with caplog.at_level(logging.ERROR):
        await asyncio.gather(failing, return_exceptions=True)
        await asyncio.sleep(0)  # the done callback runs on the next turn
    assert any("release:x failed" in r.getMessage() for r in caplog.records)
    assert supervisor.tasks == frozenset()
    forever = supervisor.start("repair", asyncio.Event().wait())
    assert supervisor.tasks == {forever}
    await supervisor.close()
    assert forever.cancelled()
    late = fails()
    with pytest.raises(RuntimeError):
        supervisor.start("late", late)
