"""The Python client against a real server (and the fault proxy): API, close codes,
token handling, liveness, recovery and ``tidings listen``."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from datetime import datetime

import pytest

from fault_proxy import FaultProxy, StateRecorder
from helpers import TIMEOUT, api, connect, publish, serve, token
from paths import SRC
from tidings.client import (
    AuthenticationFailed,
    Backoff,
    Client,
    ConnectionClosed,
    Event,
    Gap,
    Item,
    NotConnected,
    Subscription,
    SubscriptionError,
)
from tidings.client import connect as client_connect
from tidings.protocol import encode_message
from tidings.protocol.wire import text_frame
from tidings.server import RunningServer
from timeouts import scaled

CHANNELS = ("news:*", "room:*")


def fast_backoff() -> Backoff:
    """Tiny, deterministic reconnection delays."""
    return Backoff(initial=0.01, cap=0.05, random=lambda: 0.5)


async def next_item(sub: Subscription, timeout: float = TIMEOUT) -> Item:
    return await asyncio.wait_for(anext(sub), timeout)


async def next_items(sub: Subscription, count: int) -> list[Item]:
    return [await next_item(sub) for _ in range(count)]


def offsets(items: list[Item]) -> list[int | str]:
    return [i.offset if isinstance(i, Event) else f"gap:{i.last_offset}->{i.offset}" for i in items]


async def open_client(server: RunningServer | str, **options: object) -> Client:
    url = server if isinstance(server, str) else server.ws_url
    options.setdefault("token", token("u1", CHANNELS))
    options.setdefault("backoff", fast_backoff())
    return await Client(url, **options).start()  # type: ignore[arg-type]


@pytest.fixture
async def proxied() -> AsyncIterator[tuple[RunningServer, FaultProxy]]:
    async with (
        serve({"server": {"heartbeat_interval": 0.2, "heartbeat_timeout": 2}}) as server,
        FaultProxy(server.port) as proxy,
    ):
        yield server, proxy


def proxy_url(proxy: FaultProxy) -> str:
    return f"ws://127.0.0.1:{proxy.port}/ws"


# -- the API ---------------------------------------------------------------------------


async def test_subscribe_and_iterate_typed_events() -> None:
    """Events arrive through ``async for`` as typed objects matching what was published."""
    async with (
        serve() as server,
        client_connect(server.ws_url, token=token("u1", CHANNELS)) as client,
    ):
        sub = await client.subscribe("news:a")
        assert sub.confirmed and sub.epoch is not None and sub.offset == 0
        result = await publish(
            server,
            "news:a",
            "chat_message",
            {"conversation_id": "c1", "sender_id": "u2", "content": "hi"},
        )
        event = await next_item(sub)
        assert isinstance(event, Event)
        assert (event.type, event.channel, event.offset, event.id) == (
            "chat_message",
            "news:a",
            1,
            result["id"],
        )
        assert isinstance(event.timestamp, datetime) and event.timestamp.tzinfo is not None
        assert event.data == {"conversation_id": "c1", "sender_id": "u2", "content": "hi"}
        assert await client.subscribe("news:a") is sub


async def test_callback_form_delivers_events() -> None:
    """``subscribe(on_event=..., on_gap=...)`` calls the callbacks in offset order."""
    async with (
        serve() as server,
        client_connect(server.ws_url, token=token("u1", CHANNELS)) as client,
    ):
        seen: list[Event] = []
        gaps: list[Gap] = []
        third = asyncio.Event()

        async def on_event(event: Event) -> None:
            seen.append(event)
            if len(seen) == 3:
                third.set()

        await client.subscribe("news:a", on_event=on_event, on_gap=gaps.append)
        for _ in range(3):
            await publish(server, "news:a")
        await asyncio.wait_for(third.wait(), TIMEOUT)
        assert [e.offset for e in seen] == [1, 2, 3] and gaps == []


async def test_unsubscribe_ends_the_stream() -> None:
    """After ``unsubscribe`` the iterator ends and no further event is queued."""
    async with (
        serve() as server,
        client_connect(server.ws_url, token=token("u1", CHANNELS)) as client,
    ):
        sub = await client.subscribe("news:a")
        await publish(server, "news:a")
        assert offsets([await next_item(sub)]) == [1]
        await client.unsubscribe("news:a")
        await publish(server, "news:a")
        await client.ping()  # every frame sent before the pong has been read
        assert [item async for item in sub] == []
        assert sub.closed and "news:a" not in client.subscriptions


async def test_ping_returns_the_round_trip_time() -> None:
    """``ping()`` answers with a positive round trip time in seconds."""
    async with (
        serve() as server,
        client_connect(server.ws_url, token=token("u1", CHANNELS)) as client,
    ):
        rtt = await client.ping()
        assert 0 < rtt < TIMEOUT


async def test_refused_subscription_raises() -> None:
    """A channel outside the token's claims raises ``SubscriptionError`` (unauthorized)."""
    async with (
        serve() as server,
        client_connect(server.ws_url, token=token("u1", CHANNELS)) as client,
    ):
        with pytest.raises(SubscriptionError) as caught:
            await client.subscribe("secret:x")
        assert caught.value.code == "unauthorized" and caught.value.channel == "secret:x"
        assert "secret:x" not in client.subscriptions
        assert await client.ping() > 0


async def test_personal_channel_is_delivered_automatically() -> None:
    """The personal channel has a subscription from connect on, without a subscribe call."""
    async with (
        serve() as server,
        client_connect(server.ws_url, token=token("u1", CHANNELS)) as client,
    ):
        assert client.automatic_channels == {"user:u1"}
        personal = await client.subscribe("user:u1")
        assert personal is client.subscriptions["user:u1"]
        await publish(server, "user:u1")
        assert offsets([await next_item(personal)]) == [1]


async def test_overflow_is_reported_as_a_gap() -> None:
    """A subscription whose bounded queue is full reports the dropped events as one Gap."""
    async with (
        serve() as server,
        client_connect(server.ws_url, token=token("u1", CHANNELS)) as client,
    ):
        sub = await client.subscribe("news:a", queue_size=2)
        for _ in range(5):
            await publish(server, "news:a")
        await client.ping()
        items = await next_items(sub, 3)
        assert offsets(items) == [1, 2, "gap:2->5"]
        assert isinstance(items[2], Gap) and items[2].reason == "overflow"


# -- state and close codes -------------------------------------------------------------


async def test_state_changes_are_observable() -> None:
    """Listeners see connecting, connected and closed, with the close code."""
    recorder = StateRecorder()
    async with serve() as server:
        client = await open_client(server, on_state=recorder)
        assert client.connection_id and client.user_id == "u1"
        assert client.heartbeat_interval == 25
        await client.close()
    assert recorder.states() == ["connecting", "connected", "closed"]
    assert recorder.changes[-1].code == 1000 and recorder.changes[-1].error is None


async def test_forbidden_4403_stops_for_good() -> None:
    """A disconnect by the application (4403) stops the client and ends subscriptions."""
    recorder = StateRecorder()
    async with serve() as server:
        client = await open_client(server, on_state=recorder)
        sub = await client.subscribe("news:a")
        status, _ = await api(
            server, "POST", "/api/disconnect", {"user_id": "u1", "reason": "banned"}
        )
        assert status == 200
        closed = await recorder.wait("closed")
        assert closed.code == 4403 and "banned" in closed.reason
        with pytest.raises(ConnectionClosed) as caught:
            await next_item(sub)
        assert caught.value.code == 4403
        with pytest.raises(ConnectionClosed):
            await client.wait_closed()
        with pytest.raises(ConnectionClosed):
            await client.ping()
        assert recorder.count("connecting") == 1
        await client.close()


async def test_rejected_token_without_provider_is_a_clear_error() -> None:
    """An expired token and no provider: ``connect`` raises ``AuthenticationFailed`` (4401)."""
    async with serve() as server:
        with pytest.raises(AuthenticationFailed) as caught:
            async with client_connect(server.ws_url, token=token("u1", ttl=-60)):
                pass
        assert caught.value.code == 4401
        assert "token_provider" in str(caught.value) and "expired" in str(caught.value)


async def test_provider_supplies_a_new_token_after_4401() -> None:
    """After 4401 the client asks the token provider and reconnects with the new token."""
    recorder = StateRecorder()
    calls = 0

    async def provider() -> str:
        nonlocal calls
        calls += 1
        return token("u1", CHANNELS)

    async with serve() as server:
        client = await open_client(
            server, token=token("u1", ttl=-60), token_provider=provider, on_state=recorder
        )
        assert calls == 1
        assert recorder.states() == ["connecting", "disconnected", "connecting", "connected"]
        assert recorder.changes[1].code == 4401
        await client.close()


async def test_failing_provider_stops_with_a_clear_error() -> None:
    """When the token provider raises after a 4401, the client stops with that reason."""

    def provider() -> str:
        raise RuntimeError("identity provider down")

    async with serve() as server:
        with pytest.raises(AuthenticationFailed) as caught:
            await open_client(server, token=token("u1", ttl=-60), token_provider=provider)
        assert "identity provider down" in str(caught.value)


async def test_token_is_refreshed_before_it_expires() -> None:
    """With a provider, the client refreshes short-lived tokens and never drops."""
    recorder = StateRecorder()
    expiries: list[int] = []
    past_first = asyncio.Event()

    def provider() -> str:
        now = time.time()
        if expiries and now > expiries[0] + 0.4:
            past_first.set()
        expiries.append(int(now + 2))
        return token("u1", CHANNELS, ttl=2)

    overrides = {"auth": {"leeway": 0}, "server": {"heartbeat_interval": 0.4}}
    async with serve(overrides) as server:
        client = await open_client(server, token=None, token_provider=provider, on_state=recorder)
        await asyncio.wait_for(past_first.wait(), scaled(6))
        assert await client.ping() > 0
        assert recorder.states() == ["connecting", "connected"]
        assert client.expires_at is not None and client.expires_at > expiries[0]
        await client.close()


async def test_too_many_connections_reconnects_after_a_longer_floor() -> None:
    """4429 makes the client wait at least the slow floor before reconnecting."""
    delays: list[float] = []
    first_delay = asyncio.Event()
    release = asyncio.Event()

    async def sleep(delay: float) -> None:
        delays.append(delay)
        first_delay.set()
        await release.wait()

    recorder = StateRecorder()
    backoff = Backoff(initial=0.01, cap=0.05, slow_floor=3.0, random=lambda: 0.5)
    async with serve({"limits": {"max_connections_per_user": 1}}) as server:
        async with connect(server, token("u1")):
            client = Client(
                server.ws_url, token=token("u1"), backoff=backoff, sleep=sleep, on_state=recorder
            )
            started = asyncio.create_task(client.start())
            await asyncio.wait_for(first_delay.wait(), TIMEOUT)
        assert delays == [3.0 + 0.5 * 0.01]
        assert recorder.changes[1].code == 4429 and recorder.changes[1].retry_in == delays[0]
        release.set()
        await asyncio.wait_for(started, TIMEOUT)
        assert client.connected
        await client.close()


async def test_server_initiated_unsubscribe_resubscribes_with_recovery() -> None:
    """``unsubscribed`` with ``resubscribe: true`` is followed by a recovering subscribe:
    nothing is lost or duplicated."""
    async with (
        serve() as server,
        client_connect(server.ws_url, token=token("u1", CHANNELS)) as client,
    ):
        sub = await client.subscribe("news:a")
        await publish(server, "news:a")
        assert offsets([await next_item(sub)]) == [1]
        server.gateway.delivery.on_continuity_lost("news:a")
        for _ in range(3):
            await publish(server, "news:a")
        assert offsets(await next_items(sub, 3)) == [2, 3, 4]
        await client.ping()
        assert sub.qsize() == 0 and sub.active


async def test_revoked_subscription_ends_with_an_error() -> None:
    """``unsubscribed`` with ``resubscribe: false`` ends the subscription with an error."""
    async with (
        serve() as server,
        client_connect(server.ws_url, token=token("u1", CHANNELS)) as client,
    ):
        sub = await client.subscribe("news:a")
        revoke = text_frame(
            encode_message(
                "unsubscribed",
                {"channel": "news:a", "reason": "revoked", "resubscribe": False},
                timestamp=time.time(),
            )
        )
        for peer in server.gateway.hub.subscribers("news:a"):
            peer.send(revoke)
        with pytest.raises(SubscriptionError) as caught:
            await next_item(sub)
        assert caught.value.code == "revoked"
        assert "news:a" not in client.subscriptions


# -- faults through the proxy ----------------------------------------------------------


async def test_cut_connection_recovers_missed_events(
    proxied: tuple[RunningServer, FaultProxy],
) -> None:
    """Events published while the connection is cut are replayed once, in order, on every
    channel including the personal one."""
    server, proxy = proxied
    recorder = StateRecorder()
    client = await open_client(proxy_url(proxy), on_state=recorder)
    sub = await client.subscribe("news:a")
    personal = await client.subscribe("user:u1")
    for channel in ("news:a", "user:u1"):
        await publish(server, channel)
    assert offsets([await next_item(sub)]) == [1]
    assert offsets([await next_item(personal)]) == [1]
    proxy.refuse = True
    assert proxy.cut() == 1
    await recorder.wait("disconnected")
    for _ in range(3):
        for channel in ("news:a", "user:u1"):
            await publish(server, channel)
    proxy.refuse = False
    await recorder.wait("connected", 2)
    await publish(server, "news:a")
    assert offsets(await next_items(sub, 4)) == [2, 3, 4, 5]
    assert offsets(await next_items(personal, 3)) == [2, 3, 4]
    assert recorder.changes[2].code is None
    await client.ping()
    assert sub.qsize() == personal.qsize() == 0
    await client.close()


async def test_stalled_connection_is_detected_and_replaced(
    proxied: tuple[RunningServer, FaultProxy],
) -> None:
    """No frame for heartbeat interval + liveness timeout: the client reconnects."""
    server, proxy = proxied
    recorder = StateRecorder()
    client = await open_client(
        proxy_url(proxy), on_state=recorder, liveness_timeout=0.3, connect_timeout=1.0
    )
    assert client.heartbeat_interval == 0.2
    sub = await client.subscribe("news:a")
    proxy.stall()
    await publish(server, "news:a")
    lost = await recorder.wait("disconnected")
    assert lost.code is None and "no frame received for 0.5 s" in lost.reason
    proxy.resume()
    await recorder.wait("connected", 2)
    assert offsets([await next_item(sub)]) == [1]
    await client.close()


async def test_server_restart_reports_a_gap() -> None:
    """A restart of an in-memory server (new epoch) is a 1001 reconnect and a Gap."""
    recorder = StateRecorder()
    async with FaultProxy(0) as proxy:
        async with serve() as first:
            proxy.target_port = first.port
            client = await open_client(proxy_url(proxy), on_state=recorder)
            sub = await client.subscribe("news:a")
            await publish(first, "news:a")
            assert offsets([await next_item(sub)]) == [1]
        lost = await recorder.wait("disconnected")
        assert lost.code == 1001 and lost.reason == "server shutting down"
        async with serve() as second:
            proxy.target_port = second.port
            await recorder.wait("connected", 2)
            await publish(second, "news:a")
            items = await next_items(sub, 2)
            assert offsets(items) == ["gap:1->0", 1]
            gap = items[0]
            assert isinstance(gap, Gap) and gap.reason == "recovery_failed"
            assert gap.epoch != gap.last_epoch
            await client.close()


async def test_server_restart_gap_is_followed_by_the_new_epochs_events() -> None:
    """Events published to a restarted in-memory server before the client is back are
    delivered after the Gap (which reaches offset 0 of the new epoch), not lost."""
    recorder = StateRecorder()
    async with FaultProxy(0) as proxy:
        async with serve() as first:
            proxy.target_port = first.port
            client = await open_client(proxy_url(proxy), on_state=recorder)
            sub = await client.subscribe("news:a")
            for _ in range(3):
                await publish(first, "news:a")
            assert offsets(await next_items(sub, 3)) == [1, 2, 3]
        await recorder.wait("disconnected")
        async with serve() as second:
            # Published while the client cannot reach the new server yet.
            published = [await publish(second, "news:a") for _ in range(2)]
            proxy.target_port = second.port
            await recorder.wait("connected", 2)
            items = await next_items(sub, 3)
            assert offsets(items) == ["gap:3->0", 1, 2]
            gap = items[0]
            assert isinstance(gap, Gap) and gap.epoch != gap.last_epoch
            assert [i.id for i in items[1:] if isinstance(i, Event)] == [r["id"] for r in published]
            await publish(second, "news:a")
            assert offsets([await next_item(sub)]) == [3]
            await client.close()


# -- tidings listen --------------------------------------------------------------------


async def read_line(stream: asyncio.StreamReader, timeout: float = TIMEOUT) -> str:
    line = await asyncio.wait_for(stream.readline(), timeout)
    assert line, "the process closed its output"
    return line.decode().rstrip("\n")


async def read_until(stream: asyncio.StreamReader, needle: str) -> str:
    while True:
        line = await read_line(stream)
        if needle in line:
            return line


async def test_listen_prints_events_and_recovers(proxied: tuple[RunningServer, FaultProxy]) -> None:
    """``tidings listen`` prints JSON lines, reports state on stderr, reconnects and
    recovers without duplicates, says how many missed events each recovery brought, and
    exits 0 on SIGTERM."""
    server, proxy = proxied
    src = str(SRC)
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tidings.client.listen",
        "--token",
        token("u1", CHANNELS),
        "--url",
        proxy_url(proxy),
        "news:a",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        await read_until(process.stderr, "connected (connection")
        await read_until(process.stderr, "subscribed to news:a")
        await read_until(process.stderr, "subscribed to user:u1")
        first = await publish(server, "news:a")
        line = json.loads(await read_line(process.stdout))
        assert (line["channel"], line["offset"], line["id"]) == ("news:a", 1, first["id"])
        proxy.refuse = True
        proxy.cut()
        await read_until(process.stderr, "disconnected")
        await publish(server, "news:a")
        await publish(server, "user:u1")
        proxy.refuse = False
        lines = [json.loads(await read_line(process.stdout)) for _ in range(2)]
        assert sorted((x["channel"], x["offset"]) for x in lines) == [("news:a", 2), ("user:u1", 1)]
        wanted = {
            "tidings: news:a: recovered 1 missed event (offsets 2 to 2, epoch ",
            "tidings: user:u1: recovered 1 missed event (offsets 1 to 1, epoch ",
        }
        while wanted:
            line = await read_line(process.stderr)
            wanted = {text for text in wanted if not line.startswith(text)}
        process.terminate()
        assert await asyncio.wait_for(process.wait(), TIMEOUT) == 0
        assert await process.stdout.read() == b""
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


#: A connect-time hold of the personal channel far longer than any wait of these tests: a
#: client that waited for it would time out instead of seeing the event.
LONG_HOLD = {"auth": {"personal_channel_hold": 30}}


async def test_client_gets_personal_events_without_waiting_for_the_hold() -> None:
    """An event published to the personal channel right after the client connects arrives
    at once: the client's first command ends the connect-time hold (the README promises
    the client libraries never wait for it)."""
    async with serve(LONG_HOLD) as server:
        client = await open_client(server)
        try:
            sub = await client.subscribe("user:u1")
            sent = await publish(server, "user:u1")
            item = await next_item(sub)
            assert isinstance(item, Event) and item.id == sent["id"]
        finally:
            await client.close()


async def test_listen_gets_personal_events_without_waiting_for_the_hold() -> None:
    """``tidings listen`` prints a personal event published as soon as it has subscribed,
    without waiting out the connect-time hold."""
    async with serve(LONG_HOLD) as server:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tidings.client.listen",
            "--token",
            token("u1"),
            "--url",
            server.ws_url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stdout is not None and process.stderr is not None
        try:
            await read_until(process.stderr, "subscribed to user:u1")
            sent = await publish(server, "user:u1")
            line = json.loads(await read_line(process.stdout))
            assert (line["channel"], line["id"]) == ("user:u1", sent["id"])
            process.terminate()
            assert await asyncio.wait_for(process.wait(), TIMEOUT) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


async def test_listen_exits_1_when_stopped_for_good() -> None:
    """``tidings listen`` with a rejected token prints the reason and exits with status 1."""
    async with serve() as server:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tidings.client.listen",
            "--token",
            token("u1", ttl=-60),
            "--url",
            server.ws_url,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stderr is not None
        try:
            err = (await asyncio.wait_for(process.stderr.read(), TIMEOUT)).decode()
            assert await asyncio.wait_for(process.wait(), TIMEOUT) == 1
            assert "closed (code 4401" in err and "expired" in err
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


def test_listen_rejects_bad_channel_names() -> None:
    """A malformed channel name is a usage error (status 2)."""
    from tidings.client.listen import main

    with pytest.raises(SystemExit) as caught:
        main(["--token", "t", "not a channel"])
    assert caught.value.code == 2


async def test_ping_without_connection_raises() -> None:
    """``ping`` while disconnected raises ``NotConnected``."""
    recorder = StateRecorder()
    async with serve() as server, FaultProxy(server.port) as proxy:
        client = await open_client(proxy_url(proxy), on_state=recorder)
        proxy.refuse = True
        proxy.cut()
        await recorder.wait("disconnected")
        with pytest.raises(NotConnected):
            await client.ping()
        await client.close()
