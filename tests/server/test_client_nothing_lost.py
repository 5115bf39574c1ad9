"""Nothing lost: the client under cuts and a server restart, with a real server and the
fault proxy in between.

While events are published back to back through the server API to four channels (three
subscribed explicitly, one the automatic personal channel), the proxy cuts the client's
connection several times, one outage is made longer than the history window, and the
server is restarted once (a new in-memory server, so every stream gets a new epoch). For
every channel the application must have received every acknowledged event within the
history window exactly once and in offset order, and a ``Gap`` (``recovered: false``)
exactly where events fell out of the window or the history was lost. The new server's
events published before the client is back are not lost: while its history holds them
from offset 1 they follow the restart's ``Gap``, which then ends at offset 0.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from fault_proxy import FaultProxy, StateRecorder
from helpers import API_KEY, TIMEOUT, serve, token
from tidings.client import Backoff, Client, Event, Gap, Item, Subscription
from tidings.server import RunningServer

#: History window of each channel: short, but far above what one brief cut lets pile up.
HISTORY = 100
USER = "u1"
CHANNELS = ("room:a", "room:b", "room:c", f"user:{USER}")
SETTINGS = {"history": {"size": HISTORY}}


class Signal:
    """One 'something changed' flag that tests wait on with a predicate and a timeout."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()

    async def until(self, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._event.clear()
                await self._event.wait()


@dataclass(frozen=True)
class Ack:
    server: int  # 0 before the restart, 1 after
    offset: int
    id: str


class Publisher:
    """Publishes to every channel in turn, back to back, recording each acknowledgement."""

    def __init__(self, signal: Signal) -> None:
        self.signal = signal
        self.acked: dict[str, list[Ack]] = {c: [] for c in CHANNELS}
        self._task: asyncio.Task[None] | None = None
        self._stop = False

    def start(self, server: RunningServer, generation: int) -> None:
        self._stop = False
        self._task = asyncio.create_task(self._run(server, generation))

    async def stop(self) -> None:
        self._stop = True
        if self._task is not None:
            await self._task

    def count(self, channel: str, generation: int) -> int:
        return sum(1 for a in self.acked[channel] if a.server == generation)

    async def _run(self, server: RunningServer, generation: int) -> None:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        n = 0
        async with aiohttp.ClientSession(headers=headers) as http:
            while not self._stop:
                for channel in CHANNELS:
                    n += 1
                    body = {
                        "channel": channel,
                        "type": "notification",
                        "data": {"message": f"#{n}", "level": "info"},
                    }
                    async with http.post(server.http_url + "/api/publish", json=body) as reply:
                        assert reply.status == 200, await reply.text()
                        result = (await reply.json())["results"][0]
                    self.acked[channel].append(Ack(generation, result["offset"], result["id"]))
                    self.signal.notify()


class Application:
    """What the application saw: every item of every subscription, in arrival order."""

    def __init__(self, signal: Signal) -> None:
        self.signal = signal
        self.items: dict[str, list[Item]] = {c: [] for c in CHANNELS}
        self._tasks: list[asyncio.Task[None]] = []

    def follow(self, sub: Subscription) -> None:
        self._tasks.append(asyncio.create_task(self._consume(sub)))

    async def _consume(self, sub: Subscription) -> None:
        async for item in sub:
            self.items[sub.channel].append(item)
            self.signal.notify()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def events(self, channel: str) -> list[Event]:
        return [i for i in self.items[channel] if isinstance(i, Event)]

    def gaps(self, channel: str) -> list[Gap]:
        return [i for i in self.items[channel] if isinstance(i, Gap)]

    def snapshot(self) -> dict[str, int]:
        return {c: len(self.events(c)) for c in CHANNELS}

    def grew(self, since: dict[str, int], by: int) -> Callable[[], bool]:
        return lambda: all(len(self.events(c)) >= since[c] + by for c in CHANNELS)


def caught_up(app: Application, publisher: Publisher) -> Callable[[], bool]:
    """Every channel's last received event is its last acknowledged one."""

    def check() -> bool:
        return all(
            app.events(c)
            and publisher.acked[c]
            and app.events(c)[-1].id == publisher.acked[c][-1].id
            for c in CHANNELS
        )

    return check


async def test_nothing_lost_through_cuts_and_a_restart() -> None:
    """Every acknowledged event within the history window reaches the application exactly
    once and in offset order; beyond the window the application gets a Gap."""
    signal = Signal()
    publisher = Publisher(signal)
    app = Application(signal)
    recorder = StateRecorder()
    connects = 1
    first_server = contextlib.AsyncExitStack()
    client: Client | None = None
    async with FaultProxy(0) as proxy, contextlib.AsyncExitStack() as cleanup:
        cleanup.push_async_callback(first_server.aclose)
        cleanup.push_async_callback(app.close)
        cleanup.push_async_callback(publisher.stop)
        server_a = await first_server.enter_async_context(serve(SETTINGS))
        proxy.target_port = server_a.port
        client = Client(
            f"ws://127.0.0.1:{proxy.port}/ws",
            token=token(USER, ("room:*",)),
            backoff=Backoff(initial=0.005, cap=0.05, random=lambda: 0.5),
            on_state=recorder,
            queue_size=100_000,
        )
        cleanup.push_async_callback(client.close)
        await client.start()
        for channel in CHANNELS:
            app.follow(await client.subscribe(channel))

        async def cut_and_recover() -> None:
            nonlocal connects
            mark = app.snapshot()
            await signal.until(app.grew(mark, 5))
            assert proxy.cut() == 1
            connects += 1
            await recorder.wait("connected", connects)

        # Server A: steady publishing and three cuts, each recovered from history.
        publisher.start(server_a, 0)
        for _ in range(3):
            await cut_and_recover()

        # An outage longer than the history window: more than HISTORY events per channel.
        await signal.until(app.grew(app.snapshot(), 5))
        proxy.refuse = True
        proxy.cut()
        at_cut = {c: publisher.count(c, 0) for c in CHANNELS}
        await signal.until(
            lambda: all(publisher.count(c, 0) > at_cut[c] + HISTORY + 10 for c in CHANNELS)
        )
        proxy.refuse = False
        connects += 1
        await recorder.wait("connected", connects)
        await signal.until(lambda: all(len(app.gaps(c)) == 1 for c in CHANNELS))
        await cut_and_recover()

        # Restart: server A drains (1001) and goes away; server B has a fresh history.
        await publisher.stop()
        await signal.until(caught_up(app, publisher))
        epochs_a = {c: client.subscriptions[c].epoch for c in CHANNELS}
        mark = recorder.mark()
        await first_server.aclose()
        assert (await recorder.wait("disconnected", after=mark)).code == 1001
        async with serve(SETTINGS) as server_b:
            publisher.start(server_b, 1)
            await signal.until(lambda: all(publisher.count(c, 1) >= 5 for c in CHANNELS))
            proxy.target_port = server_b.port
            connects += 1
            await recorder.wait("connected", connects)
            await signal.until(lambda: all(len(app.gaps(c)) == 2 for c in CHANNELS))
            for _ in range(2):
                await cut_and_recover()
            await publisher.stop()
            await signal.until(caught_up(app, publisher))
            await client.close()

    assert {c.code for c in recorder.changes if c.state.value == "disconnected"} <= {None, 1001}
    for channel in CHANNELS:
        check_channel(channel, app.items[channel], publisher.acked[channel], epochs_a[channel])


def check_channel(channel: str, items: list[Item], acked: list[Ack], epoch_a: str | None) -> None:
    """The per-channel contract; see the module docstring."""
    gaps = [i for i, item in enumerate(items) if isinstance(item, Gap)]
    assert len(gaps) == 2, (channel, [items[i] for i in gaps])
    window, restart = items[gaps[0]], items[gaps[1]]
    assert isinstance(window, Gap) and isinstance(restart, Gap)
    # Beyond the window: same epoch, and more events missing than history holds.
    assert window.reason == "recovery_failed"
    assert window.epoch == window.last_epoch == epoch_a
    assert window.offset - window.last_offset > HISTORY, (channel, window)
    # The restart: a new epoch, after the last event of the old one.
    assert restart.reason == "recovery_failed" and restart.last_epoch == epoch_a
    assert restart.epoch != epoch_a
    acked_a = [(a.offset, a.id) for a in acked if a.server == 0]
    acked_b = [(a.offset, a.id) for a in acked if a.server == 1]
    assert restart.last_offset == acked_a[-1][0]
    # Server B's first events are replayed (the Gap ends at 0) unless they had already
    # fallen out of its history by the time the client was back.
    assert restart.offset == 0 or HISTORY < restart.offset <= acked_b[-1][0], (channel, restart)

    def received(part: list[Item]) -> list[tuple[int, str]]:
        return [(e.offset, e.id) for e in part if isinstance(e, Event)]

    before_restart = received(items[: gaps[1]])
    after_restart = received(items[gaps[1] :])
    # Exactly once, in offset order, with the acknowledged ids: everything acknowledged
    # except the offsets each Gap reports.
    assert before_restart == [
        a for a in acked_a if not window.last_offset < a[0] <= window.offset
    ], channel
    assert after_restart == [b for b in acked_b if b[0] > restart.offset], channel
    assert [o for o, _ in before_restart] == sorted({o for o, _ in before_restart})
