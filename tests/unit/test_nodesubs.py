"""Unit tests for tidings.nodesubs: one broker subscription per channel, ordered per channel."""

from __future__ import annotations

import asyncio

from fakes import next_tick
from tidings.nodesubs import NodeSubscriptions, _KeyedLocks
from timeouts import TIMEOUT


class GatedBroker:
    """Records subscribe/unsubscribe calls; each call waits for its gate when one is set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def _call(self, name: str, channel: str) -> None:
        self.calls.append((name, channel))
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()

    async def subscribe(self, channel: str) -> None:
        await self._call("subscribe", channel)

    async def unsubscribe(self, channel: str) -> None:
        await self._call("unsubscribe", channel)


def node_subscriptions(broker: GatedBroker, local: set[str]) -> NodeSubscriptions:
    return NodeSubscriptions(broker, local.__contains__)  # type: ignore[arg-type]


async def test_concurrent_ensures_subscribe_once() -> None:
    """Many first subscribers of one channel at once cause one broker subscribe."""
    broker = GatedBroker()
    broker.gate = asyncio.Event()
    subs = node_subscriptions(broker, {"chat:1"})
    tasks = [asyncio.create_task(subs.ensure("chat:1")) for _ in range(20)]
    await asyncio.wait_for(broker.entered.wait(), TIMEOUT)
    broker.gate.set()
    await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
    assert broker.calls == [("subscribe", "chat:1")]


async def test_leave_and_rejoin_ends_subscribed() -> None:
    """A release in flight and a new subscriber right after: subscribe follows unsubscribe."""
    broker = GatedBroker()
    local = {"chat:1"}
    subs = node_subscriptions(broker, local)
    await subs.ensure("chat:1")
    local.clear()
    broker.gate = asyncio.Event()
    broker.entered.clear()
    subs.release_soon("chat:1")
    await asyncio.wait_for(broker.entered.wait(), TIMEOUT)  # unsubscribe is in flight
    local.add("chat:1")
    joining = asyncio.create_task(subs.ensure("chat:1"))
    broker.gate.set()
    await asyncio.wait_for(joining, TIMEOUT)
    await subs.settle()
    assert broker.calls == [
        ("subscribe", "chat:1"),
        ("unsubscribe", "chat:1"),
        ("subscribe", "chat:1"),
    ]


async def test_keyed_lock_is_fifo_and_forgotten_when_free() -> None:
    """Waiters get a key in arrival order; a free key leaves nothing behind."""
    locks = _KeyedLocks()
    order: list[int] = []
    await locks.acquire("k")

    async def worker(number: int) -> None:
        await locks.acquire("k")
        order.append(number)
        locks.release("k")

    tasks = [asyncio.create_task(worker(number)) for number in range(5)]
    await next_tick()  # every worker runs up to its wait
    locks.release("k")
    await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
    assert order == [0, 1, 2, 3, 4]
    assert len(locks) == 0


async def test_cancelled_waiter_does_not_keep_the_key() -> None:
    """A waiter cancelled while queued leaves the queue; the next waiter still gets the key."""
    locks = _KeyedLocks()
    await locks.acquire("k")
    cancelled = asyncio.create_task(locks.acquire("k"))
    after = asyncio.create_task(locks.acquire("k"))
    await next_tick()
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    locks.release("k")
    await asyncio.wait_for(after, TIMEOUT)
    locks.release("k")
    assert len(locks) == 0


async def test_waiter_cancelled_after_handover_passes_the_key_on() -> None:
    """A waiter handed the key and cancelled before it resumed hands it to the next one."""
    locks = _KeyedLocks()
    await locks.acquire("k")
    first = asyncio.create_task(locks.acquire("k"))
    second = asyncio.create_task(locks.acquire("k"))
    await next_tick()
    locks.release("k")  # hands the key to `first`, which has not run yet
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    assert first.cancelled()
    await asyncio.wait_for(second, TIMEOUT)
    locks.release("k")
    assert len(locks) == 0
