"""Unit tests for tidings.deadlines: one timer for entries of one constant delay."""

from __future__ import annotations

import asyncio

import pytest

from fakes import next_tick
from tidings.deadlines import Deadlines
from timeouts import TIMEOUT


class Recorder:
    """Collects expired values; ``wait(n)`` resolves once ``n`` have expired."""

    def __init__(self) -> None:
        self.values: list[str] = []
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def __call__(self, value: str) -> None:
        self.values.append(value)
        for count, waiter in self._waiters:
            if len(self.values) >= count and not waiter.done():
                waiter.set_result(None)

    async def wait(self, count: int) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((count, waiter))
        if len(self.values) >= count:
            waiter.set_result(None)
        await asyncio.wait_for(waiter, TIMEOUT)


async def test_entries_expire_in_insertion_order() -> None:
    """Entries added one after another expire in that order, each exactly once."""
    expired = Recorder()
    deadlines: Deadlines[str, str] = Deadlines(0.0, expired)
    for key in "abcde":
        deadlines.add(key, key.upper())
    await expired.wait(5)
    assert expired.values == list("ABCDE")
    assert len(deadlines) == 0


async def test_popped_entries_never_expire() -> None:
    """``pop`` takes an entry out first: its value comes back and it never expires."""
    expired = Recorder()
    deadlines: Deadlines[str, str] = Deadlines(0.0, expired)
    deadlines.add("a", "A")
    deadlines.add("b", "B")
    deadlines.add("c", "C")
    assert deadlines.pop("b") == "B"
    assert deadlines.pop("b") is None
    assert "b" not in deadlines and "a" in deadlines
    await expired.wait(2)
    assert expired.values == ["A", "C"]


async def test_nothing_expires_before_its_delay() -> None:
    """With a long delay nothing has expired after the loop has run other work."""
    expired = Recorder()
    deadlines: Deadlines[str, str] = Deadlines(3600.0, expired)
    deadlines.add("a", "A")
    for _ in range(10):
        await next_tick()
    assert expired.values == []
    assert deadlines.pop("a") == "A"
    deadlines.close()


async def test_readding_a_key_restarts_it_at_the_end() -> None:
    """A key added again moves behind the others and expires once, with its new value."""
    expired = Recorder()
    deadlines: Deadlines[str, str] = Deadlines(0.0, expired)
    deadlines.add("a", "A1")
    deadlines.add("b", "B")
    deadlines.add("a", "A2")
    await expired.wait(2)
    assert expired.values == ["B", "A2"]


async def test_close_forgets_everything() -> None:
    """After ``close`` no entry expires and the timer is gone."""
    expired = Recorder()
    deadlines: Deadlines[str, str] = Deadlines(0.0, expired)
    deadlines.add("a", "A")
    deadlines.close()
    sentinel = Deadlines[str, str](0.0, expired)
    sentinel.add("z", "Z")  # expires after anything the first set could have fired
    await expired.wait(1)
    assert expired.values == ["Z"]


async def test_a_failing_callback_does_not_strand_later_entries() -> None:
    """An exception from ``on_expire`` reaches the loop's handler; later entries still
    expire."""
    loop = asyncio.get_running_loop()
    errors: list[BaseException | None] = []
    loop.set_exception_handler(lambda _, context: errors.append(context.get("exception")))
    expired = Recorder()

    def on_expire(value: str) -> None:
        if value == "boom":
            raise RuntimeError("boom")
        expired(value)

    deadlines: Deadlines[str, str] = Deadlines(0.0, on_expire)
    deadlines.add("a", "boom")
    deadlines.add("b", "B")
    try:
        await expired.wait(1)
    finally:
        loop.set_exception_handler(None)
    assert expired.values == ["B"]
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)


def test_add_needs_a_running_loop() -> None:
    """Outside a loop ``add`` fails loudly instead of never expiring."""
    deadlines: Deadlines[str, str] = Deadlines(1.0, lambda value: None)
    with pytest.raises(RuntimeError):
        deadlines.add("a", "A")
