"""Gateway: connect, subscribe with recovery, node subscriptions, broker signals, drain and
heartbeats, with a real MemoryBroker and fake peers (no sockets)."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import pytest

from fakes import FakeClock, FakePeer, command, connect_peer, next_tick
from helpers import make_settings, token
from tidings.api.service import ApiService
from tidings.auth import Authenticator, Identity
from tidings.brokers import (
    BrokerHandler,
    HistoryPage,
    PublishRequest,
    PublishResult,
    StreamPosition,
)
from tidings.brokers.memory import MemoryBroker
from tidings.channels import ChannelPolicy
from tidings.errors import BrokerUnavailable, PersonalChannelUnavailable, TooManyConnections
from tidings.event_types import frame_event_type as _frame_event_type
from tidings.gateway import Gateway
from tidings.protocol import encode_message, text_frame
from timeouts import TIMEOUT

WAIT = TIMEOUT
NAMESPACES = {"default": {"rule": "claims"}, "news": {"rule": "public"}, "vault": {"rule": "deny"}}

Hook = Callable[[str], Awaitable[None]]


class WrappedBroker:
    """A MemoryBroker that counts node subscriptions and runs test hooks.

    ``hooks`` maps ``subscribe``, ``position``, ``history_before`` and ``history_after``
    to coroutines called with the channel; a hook may raise to simulate a failure, or
    publish to simulate events racing with the call.
    """

    def __init__(self, inner: MemoryBroker) -> None:
        self.inner = inner
        self.hooks: dict[str, Hook] = {}
        self.subscribes: Counter[str] = Counter()
        self.unsubscribes: Counter[str] = Counter()
        self._changed = asyncio.Event()

    async def _hook(self, name: str, channel: str) -> None:
        hook = self.hooks.get(name)
        if hook is not None:
            await hook(channel)

    async def wait_unsubscribed(self, channel: str, count: int = 1) -> None:
        """Wait until this node has released ``channel`` ``count`` times."""
        async with asyncio.timeout(WAIT):
            while self.unsubscribes[channel] < count:
                self._changed.clear()
                await self._changed.wait()

    async def start(self, handler: BrokerHandler) -> None:
        await self.inner.start(handler)

    async def close(self) -> None:
        await self.inner.close()

    async def publish(self, requests: Sequence[PublishRequest]) -> list[PublishResult]:
        return await self.inner.publish(requests)

    async def subscribe(self, channel: str) -> None:
        await self._hook("subscribe", channel)
        await self.inner.subscribe(channel)
        self.subscribes[channel] += 1

    async def unsubscribe(self, channel: str) -> None:
        await self.inner.unsubscribe(channel)
        self.unsubscribes[channel] += 1
        self._changed.set()

    async def position(self, channel: str) -> StreamPosition:
        await self._hook("position", channel)
        return await self.inner.position(channel)

    async def history(self, channel: str, since: int, limit: int) -> HistoryPage:
        await self._hook("history_before", channel)
        page = await self.inner.history(channel, since, limit)
        await self._hook("history_after", channel)
        return page

    async def channels(self, prefix: str) -> dict[str, int]:
        return await self.inner.channels(prefix)

    async def presence(self, channel: str) -> dict[str, int]:
        return await self.inner.presence(channel)

    async def presence_arrive(self, channel: str, user_id: str, ttl: float) -> None:
        await self.inner.presence_arrive(channel, user_id, ttl)

    async def presence_depart(self, channel: str, user_id: str, ttl: float) -> None:
        await self.inner.presence_depart(channel, user_id, ttl)

    async def disconnect_user(self, user_id: str, reason: str) -> None:
        await self.inner.disconnect_user(user_id, reason)

    async def ready(self) -> bool:
        return await self.inner.ready()


MakeGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway() -> AsyncIterator[MakeGateway]:
    """Build started gateways (closed at teardown) around a wrapped MemoryBroker."""
    gateways: list[Gateway] = []

    async def make(
        overrides: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        broker_clock: FakeClock | None = None,
    ) -> Gateway:
        settings = make_settings({"namespaces": NAMESPACES, **(overrides or {})})
        inner = MemoryBroker(
            history_size=settings.history.size,
            history_ttl=settings.history.ttl,
            idempotency_window=settings.api.idempotency_window,
            clock=broker_clock or FakeClock(),
        )
        gateway = Gateway(
            settings,
            broker=WrappedBroker(inner),
            authenticator=Authenticator(settings.auth),
            policy=ChannelPolicy(settings.namespaces),
            clock=clock,
        )
        await gateway.start()
        gateways.append(gateway)
        return gateway

    yield make
    for gateway in gateways:
        await gateway.close()


@pytest.fixture
async def gateway(make_gateway: MakeGateway) -> Gateway:
    return await make_gateway()


def wrapped(gateway: Gateway) -> WrappedBroker:
    assert isinstance(gateway.broker, WrappedBroker)
    return gateway.broker


async def publish(gateway: Gateway, channel: str, count: int = 1) -> list[PublishResult]:
    requests = [
        PublishRequest(channel, "notification", {"message": "hi", "level": "info"})
        for _ in range(count)
    ]
    return await gateway.broker.publish(requests)


def offsets(messages: list[dict[str, Any]], channel: str | None = None) -> list[int]:
    """Offsets of the events among ``messages`` (of ``channel`` when given)."""
    return [
        m["offset"]
        for m in messages
        if "offset" in m and (channel is None or m["channel"] == channel)
    ]


def only(messages: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(messages) == 1, messages
    return messages[0]


def gauge(gateway: Gateway, name: str, **labels: str) -> float | None:
    return gateway.metrics.registry.get_sample_value(name, labels)


async def settle(gateway: Gateway) -> None:
    """Let background release tasks and the hub flush run to completion."""
    await next_tick()
    await asyncio.wait_for(gateway.node_subscriptions.settle(), WAIT)


# -- connect and the personal channel -----------------------------------------------


async def test_connect_subscribes_the_personal_channel_and_welcomes(gateway: Gateway) -> None:
    """Connecting subscribes ``user:<sub>``, lists it in ``connected`` with the position
    it went live at, and delivers its live events (not the ones published before)."""
    results = await publish(gateway, "user:user-1", 2)
    peer = await connect_peer(gateway, "user-1")
    welcome = only(peer.take())
    assert welcome["type"] == "connected"
    assert welcome["data"]["channels"] == ["user:user-1"]
    assert welcome["data"]["positions"] == {"user:user-1": {"offset": 2, "epoch": results[0].epoch}}
    assert welcome["data"]["user_id"] == "user-1"
    assert welcome["data"]["connection_id"] == peer.conn_id
    assert welcome["data"]["heartbeat_interval"] == 25
    assert welcome["data"]["expires_at"].endswith("Z")
    assert gateway.hub.is_subscribed(peer, "user:user-1")
    assert peer.session.personal == "user:user-1"
    assert wrapped(gateway).subscribes == {"user:user-1": 1}
    await publish(gateway, "user:user-1")
    await next_tick()
    (event,) = peer.take()
    assert (event["type"], event["channel"], event["offset"]) == ("notification", "user:user-1", 3)


async def test_connection_ids_are_random_not_sequential(gateway: Gateway) -> None:
    """Connection ids are ``c_`` and 96 random bits: unique, and neither consecutive nor
    sharing a per-node prefix, so that one id tells nothing about the next."""
    identity = Identity("user-1", gateway.wall_clock() + 3600, ())
    ids = [gateway.new_session(identity).conn_id for _ in range(2000)]
    assert all(re.fullmatch(r"c_[0-9a-f]{24}", conn_id) for conn_id in ids), ids[:3]
    assert len(set(ids)) == len(ids)
    values = [int(conn_id[2:], 16) for conn_id in ids]
    # With random 96-bit values either assertion fails less than once in a million runs.
    assert all(abs(b - a) > 2**48 for a, b in itertools.pairwise(values))
    assert all(a[:10] != b[:10] for a, b in itertools.pairwise(ids))


@pytest.mark.parametrize("sub", ["has space", "a/b", "x" * 129, "tab\there"])
async def test_no_personal_channel_for_a_sub_outside_the_grammar(
    gateway: Gateway, sub: str
) -> None:
    """A ``sub`` that does not fit the channel grammar gets no personal channel."""
    peer = await connect_peer(gateway, sub)
    welcome = only(peer.take())
    assert welcome["data"]["channels"] == []
    assert welcome["data"]["user_id"] == sub
    assert list(gateway.hub.channels()) == []
    assert set(gateway.hub.channels_of(peer)) == set()
    assert wrapped(gateway).subscribes == {}


async def test_personal_channel_can_be_disabled(make_gateway: MakeGateway) -> None:
    """With ``auth.personal_channel = false`` nothing is subscribed on connect."""
    gateway = await make_gateway({"auth": {"personal_channel": False}})
    peer = await connect_peer(gateway, "user-1")
    data = only(peer.take())["data"]
    assert data["channels"] == [] and "positions" not in data
    assert not gateway.hub.is_subscribed(peer, "user:user-1")


async def test_personal_channel_failure_at_connect_refuses_the_connection(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """When the broker cannot subscribe the personal channel the connection is refused
    (PersonalChannelUnavailable, closed with 1013 at the edge), nothing stays registered,
    and the log says so in one line without a traceback."""

    async def down(channel: str) -> None:
        raise BrokerUnavailable("broker down")

    caplog.set_level("WARNING", logger="tidings.gateway")
    wrapped(gateway).hooks["subscribe"] = down
    with pytest.raises(PersonalChannelUnavailable):
        await connect_peer(gateway, "user-1")
    assert gateway.hub.connection_count() == 0
    assert gateway.hub.user_connection_count("user-1") == 0
    assert not gateway.hub.has_channel("user:user-1")
    assert gateway.delivery.local_channels() == {}
    [record] = [r for r in caplog.records if "personal channel" in r.getMessage()]
    assert record.levelname == "WARNING" and record.exc_info is None
    assert "broker down" in record.getMessage()


# -- subscribe ----------------------------------------------------------------------


async def test_subscribe_reply_shape(gateway: Gateway) -> None:
    """``subscribed`` carries the command id, channel, latest offset and epoch only."""
    (result, _) = await publish(gateway, "news:a", 2)
    peer = await connect_peer(gateway)
    peer.take()
    await command(gateway, peer, "subscribe", {"channel": "news:a"}, id="s1")
    reply = only(peer.take())
    assert set(reply) == {"type", "id", "timestamp", "data"}
    assert reply["type"] == "subscribed" and reply["id"] == "s1"
    assert reply["data"] == {"channel": "news:a", "offset": 2, "epoch": result.epoch}
    await command(gateway, peer, "subscribe", {"channel": "news:empty"})
    reply = only(peer.take())
    assert "id" not in reply
    assert reply["data"]["offset"] == 0
    await command(
        gateway,
        peer,
        "subscribe",
        {"channel": "news:b", "recover": {"offset": 0, "epoch": "e"}},
        id="s3",
    )
    reply = only(peer.take())
    assert set(reply["data"]) == {"channel", "offset", "epoch", "recovered"}
    assert set(gateway.hub.channels_of(peer)) == {"user:user-1", "news:a", "news:empty", "news:b"}


@pytest.mark.parametrize("channel", ["orders:1", "vault:x", "user:user-1"])
async def test_denied_subscription_leaks_no_event(gateway: Gateway, channel: str) -> None:
    """A denied subscribe answers ``unauthorized`` and no later event of that channel
    reaches the connection, even while another connection here is subscribed."""
    owner = await connect_peer(gateway, "user-1", ("orders:*",))
    intruder = await connect_peer(gateway, "user-2")
    if channel != "user:user-1":
        await command(gateway, owner, "subscribe", {"channel": channel})
    owner.take()
    intruder.take()
    await command(gateway, intruder, "subscribe", {"channel": channel}, id="d")
    error = only(intruder.take())
    assert error["type"] == "error" and error["id"] == "d"
    assert error["data"]["code"] == "unauthorized"
    assert error["data"]["channel"] == channel
    assert not gateway.hub.is_subscribed(intruder, channel)
    assert channel not in set(gateway.hub.channels_of(intruder))
    await publish(gateway, channel, 2)
    await next_tick()
    assert intruder.take() == []
    assert intruder.closes == []
    if channel != "vault:x":  # nobody may read vault:
        assert offsets(owner.take(), channel) == [1, 2]


async def test_denied_subscription_does_not_subscribe_the_node(gateway: Gateway) -> None:
    """A denied first subscriber never makes the node subscribe to the channel."""
    peer = await connect_peer(gateway, "user-2")
    await command(gateway, peer, "subscribe", {"channel": "orders:1"})
    assert not gateway.hub.has_channel("orders:1")
    assert "orders:1" not in wrapped(gateway).subscribes


async def test_recover_replays_missed_events_then_live(gateway: Gateway) -> None:
    """Recovery with the right epoch and offset replays what was missed, then goes live."""
    results = await publish(gateway, "news:a", 3)
    peer = await connect_peer(gateway)
    peer.take()
    await command(
        gateway,
        peer,
        "subscribe",
        {"channel": "news:a", "recover": {"offset": 1, "epoch": results[0].epoch}},
        id="r",
    )
    messages = peer.take()
    assert messages[0]["type"] == "subscribed"
    assert messages[0]["data"] == {
        "channel": "news:a",
        "offset": 3,
        "epoch": results[0].epoch,
        "recovered": True,
    }
    assert offsets(messages[1:]) == [2, 3]
    assert [m["id"] for m in messages[1:]] == [r.id for r in results[1:]]
    await publish(gateway, "news:a")
    await next_tick()
    assert offsets(peer.take()) == [4]


@pytest.mark.parametrize("phase", ["history_before", "history_after"])
@pytest.mark.parametrize("yield_loop", [False, True], ids=["same-tick", "flushed"])
async def test_recovery_with_events_racing_the_history_read(
    gateway: Gateway, phase: str, yield_loop: bool
) -> None:
    """Events published while recovery reads history arrive exactly once, in order, after
    the ``subscribed`` reply and the replay."""
    results = await publish(gateway, "news:a", 3)

    async def race(channel: str) -> None:
        await publish(gateway, channel, 2)
        if yield_loop:
            await next_tick()  # let the hub flush them into the held subscriber

    wrapped(gateway).hooks[phase] = race
    peer = await connect_peer(gateway)
    peer.take()
    await command(
        gateway,
        peer,
        "subscribe",
        {"channel": "news:a", "recover": {"offset": 1, "epoch": results[0].epoch}},
    )
    del wrapped(gateway).hooks[phase]
    await next_tick()
    messages = peer.take()
    assert messages[0]["type"] == "subscribed"
    assert messages[0]["data"]["recovered"] is True
    assert offsets(messages) == [2, 3, 4, 5]
    await publish(gateway, "news:a")
    await next_tick()
    assert offsets(peer.take()) == [6]


@pytest.mark.parametrize("case", ["wrong-epoch", "too-old", "future-offset"])
@pytest.mark.parametrize("racing", [False, True], ids=["quiet", "racing"])
async def test_failed_recovery_sends_only_live_events(
    make_gateway: MakeGateway, case: str, racing: bool
) -> None:
    """Recovery that cannot be honoured says ``recovered: false`` and sends only events
    past the subscribed offset, once each, in order."""
    gateway = await make_gateway({"history": {"size": 2}})
    results = await publish(gateway, "news:a", 5)
    epoch = results[0].epoch
    recover = {
        "wrong-epoch": {"offset": 4, "epoch": "not-" + epoch},
        "too-old": {"offset": 1, "epoch": epoch},
        "future-offset": {"offset": 9, "epoch": epoch},
    }[case]
    reads: list[int] = []  # the latest offset at each history read

    async def race(channel: str) -> None:
        reads.append((await wrapped(gateway).inner.position(channel)).offset)
        if racing:
            await publish(gateway, channel, 2)

    wrapped(gateway).hooks["history_after"] = race
    peer = await connect_peer(gateway)
    peer.take()
    await command(gateway, peer, "subscribe", {"channel": "news:a", "recover": recover})
    wrapped(gateway).hooks.clear()
    await next_tick()
    # Another epoch is read again from offset 0 (trimmed here, so nothing is replayed).
    assert len(reads) == (2 if case == "wrong-epoch" else 1)
    latest = reads[-1]
    assert latest == (7 if racing and case == "wrong-epoch" else 5)
    messages = peer.take()
    reply = messages[0]
    assert reply["type"] == "subscribed"
    assert reply["data"] == {
        "channel": "news:a",
        "offset": latest,
        "epoch": epoch,
        "recovered": False,
    }
    racing_after = [latest + 1, latest + 2] if racing else []
    assert offsets(messages) == racing_after
    await publish(gateway, "news:a")
    await next_tick()
    assert offsets(peer.take()) == [latest + 1 + len(racing_after)]


async def test_recover_after_an_epoch_change_replays_the_new_epoch(
    make_gateway: MakeGateway,
) -> None:
    """After the channel's stream restarts under a new epoch, a recover naming the old one
    gets ``recovered: false`` (with ``since: 0``), the new epoch's events 1..n in order,
    the events published during that read, then live events, each once."""
    clock = FakeClock()
    gateway = await make_gateway({"history": {"ttl": 60}}, broker_clock=clock)
    old = await publish(gateway, "news:a", 5)
    clock.advance(61)
    wrapped(gateway).inner.expire()  # history lost: offsets start again at 1
    new = await publish(gateway, "news:a", 3)
    assert new[0].epoch != old[0].epoch and new[0].offset == 1
    reads = 0

    async def race(channel: str) -> None:
        nonlocal reads
        reads += 1
        if reads == 2:  # the read after offset 0
            await publish(gateway, channel, 2)

    wrapped(gateway).hooks["history_after"] = race
    peer = await connect_peer(gateway)
    peer.take()
    await command(
        gateway,
        peer,
        "subscribe",
        {"channel": "news:a", "recover": {"offset": 5, "epoch": old[0].epoch}},
        id="r",
    )
    wrapped(gateway).hooks.clear()
    await next_tick()
    messages = peer.take()
    assert messages[0] == {
        "type": "subscribed",
        "id": "r",
        "timestamp": messages[0]["timestamp"],
        "data": {
            "channel": "news:a",
            "offset": 3,
            "epoch": new[0].epoch,
            "recovered": False,
            "since": 0,
        },
    }
    assert offsets(messages) == [1, 2, 3, 4, 5]
    assert [m["id"] for m in messages[1:4]] == [r.id for r in new]
    await publish(gateway, "news:a")
    await next_tick()
    assert offsets(peer.take()) == [6]


async def test_recover_after_an_epoch_change_past_history_replays_nothing(
    make_gateway: MakeGateway,
) -> None:
    """When the new epoch is no longer complete from offset 1 (trimmed), a recover naming
    the old epoch is ``recovered: false`` with no replay and no ``since``, then live."""
    clock = FakeClock()
    gateway = await make_gateway({"history": {"ttl": 60, "size": 2}}, broker_clock=clock)
    old = await publish(gateway, "news:a", 2)
    clock.advance(61)
    wrapped(gateway).inner.expire()
    new = await publish(gateway, "news:a", 5)
    peer = await connect_peer(gateway)
    peer.take()
    await command(
        gateway,
        peer,
        "subscribe",
        {"channel": "news:a", "recover": {"offset": 2, "epoch": old[0].epoch}},
    )
    reply = only(peer.take())
    assert reply["data"] == {
        "channel": "news:a",
        "offset": 5,
        "epoch": new[0].epoch,
        "recovered": False,
    }
    await publish(gateway, "news:a")
    await next_tick()
    assert offsets(peer.take()) == [6]


async def test_subscribe_twice_is_idempotent(gateway: Gateway) -> None:
    """A second subscribe answers again but keeps one membership and one node subscription."""
    peer = await connect_peer(gateway)
    await command(gateway, peer, "subscribe", {"channel": "news:a"}, id="1")
    await publish(gateway, "news:a")
    await next_tick()
    await command(gateway, peer, "subscribe", {"channel": "news:a"}, id="2")
    messages = peer.take()
    replies = [m for m in messages if m["type"] == "subscribed"]
    assert [r["id"] for r in replies] == ["1", "2"]
    assert replies[1]["data"] == {
        "channel": "news:a",
        "offset": 1,
        "epoch": replies[0]["data"]["epoch"],
    }
    assert gateway.hub.channel_counts()["news:a"] == 1
    assert wrapped(gateway).subscribes["news:a"] == 1
    assert set(gateway.hub.channels_of(peer)) == {"user:user-1", "news:a"}
    assert gauge(gateway, "tidings_subscriptions") == 2
    await publish(gateway, "news:a")
    await next_tick()
    assert offsets(messages + peer.take()) == [1, 2]


async def test_resubscribe_with_recover_replays_the_personal_channel(gateway: Gateway) -> None:
    """Re-subscribing the automatic personal channel with ``recover`` replays events
    published before the connection, then continues live, with no duplicate."""
    results = await publish(gateway, "user:user-1", 3)
    epoch = results[0].epoch
    peer = await connect_peer(gateway)
    peer.take()

    async def race(channel: str) -> None:
        await publish(gateway, channel, 2)
        await next_tick()

    wrapped(gateway).hooks["history_before"] = race
    await command(
        gateway,
        peer,
        "subscribe",
        {"channel": "user:user-1", "recover": {"offset": 0, "epoch": epoch}},
        id="p",
    )
    wrapped(gateway).hooks.clear()
    await next_tick()
    messages = peer.take()
    assert messages[0]["type"] == "subscribed" and messages[0]["id"] == "p"
    assert messages[0]["data"] == {
        "channel": "user:user-1",
        "offset": 3,
        "epoch": epoch,
        "recovered": True,
    }
    assert offsets(messages) == [1, 2, 3, 4, 5]
    assert wrapped(gateway).subscribes["user:user-1"] == 1
    assert gateway.hub.channel_counts()["user:user-1"] == 1
    await publish(gateway, "user:user-1")
    await next_tick()
    assert offsets(peer.take()) == [6]


async def test_resubscribe_with_another_epoch_replays_the_current_one(gateway: Gateway) -> None:
    """A live subscription that sent nothing past its start, recovered with an old epoch,
    answers ``recovered: false`` with ``since: 0``, replays the current epoch up to its
    start, then stays live."""
    results = await publish(gateway, "user:user-1", 2)
    peer = await connect_peer(gateway)
    peer.take()
    await command(
        gateway,
        peer,
        "subscribe",
        {"channel": "user:user-1", "recover": {"offset": 7, "epoch": "other"}},
    )
    messages = peer.take()
    assert messages[0]["data"] == {
        "channel": "user:user-1",
        "offset": 2,
        "epoch": results[0].epoch,
        "recovered": False,
        "since": 0,
    }
    assert offsets(messages) == [1, 2]
    assert [m["id"] for m in messages[1:]] == [r.id for r in results]
    await publish(gateway, "user:user-1")
    await next_tick()
    assert offsets(peer.take()) == [3]


async def test_resubscribe_with_another_epoch_after_live_events_replays_nothing(
    gateway: Gateway,
) -> None:
    """Once a live event went out, the current epoch's older events cannot follow it:
    ``recovered: false`` without a replay (and without ``since``)."""
    await publish(gateway, "news:a", 2)
    peer = await connect_peer(gateway)
    await command(gateway, peer, "subscribe", {"channel": "news:a"})
    await publish(gateway, "news:a")
    await next_tick()
    assert offsets(peer.take()) == [3]
    await command(
        gateway, peer, "subscribe", {"channel": "news:a", "recover": {"offset": 9, "epoch": "old"}}
    )
    reply = only(peer.take())
    assert reply["data"]["recovered"] is False and reply["data"]["offset"] == 3
    assert "since" not in reply["data"]


async def test_resubscribe_without_an_epoch_replays_nothing(gateway: Gateway) -> None:
    """A ``recover`` with an empty epoch (a client's first subscription) asks for a
    baseline: ``recovered: false`` at the live start, no replay."""
    await publish(gateway, "user:user-1", 2)
    peer = await connect_peer(gateway)
    peer.take()
    await command(
        gateway,
        peer,
        "subscribe",
        {"channel": "user:user-1", "recover": {"offset": 0, "epoch": ""}},
    )
    reply = only(peer.take())
    assert reply["data"]["recovered"] is False and reply["data"]["offset"] == 2
    assert "since" not in reply["data"]
    await publish(gateway, "user:user-1")
    await next_tick()
    assert offsets(peer.take()) == [3]


@pytest.mark.parametrize("old_epoch", [True, False], ids=["old-epoch", "same-epoch"])
async def test_repeated_recover_never_resends_an_offset(gateway: Gateway, old_epoch: bool) -> None:
    """A second ``recover`` naming the same point on a live subscription sends nothing the
    first one (replay or live) already sent."""
    results = await publish(gateway, "user:user-1", 2)
    peer = await connect_peer(gateway)
    peer.take()
    recover = {"offset": 0, "epoch": "old" if old_epoch else results[0].epoch}
    for attempt in range(2):
        await command(gateway, peer, "subscribe", {"channel": "user:user-1", "recover": recover})
        await next_tick()
        messages = peer.take()
        assert messages[0]["type"] == "subscribed"
        assert messages[0]["data"]["recovered"] is not old_epoch
        assert offsets(messages) == ([1, 2] if attempt == 0 else [])
    await publish(gateway, "user:user-1")
    await next_tick()
    assert offsets(peer.take()) == [3]


async def test_recover_after_a_replay_cannot_resend_it(gateway: Gateway) -> None:
    """After a new subscription's replay, a recover from an earlier offset is refused
    rather than sending the replayed offsets again (or the earlier one out of order)."""
    results = await publish(gateway, "news:a", 3)
    peer = await connect_peer(gateway)
    peer.take()
    epoch = results[0].epoch
    await command(
        gateway, peer, "subscribe", {"channel": "news:a", "recover": {"offset": 1, "epoch": epoch}}
    )
    assert offsets(peer.take()) == [2, 3]
    await command(
        gateway, peer, "subscribe", {"channel": "news:a", "recover": {"offset": 0, "epoch": epoch}}
    )
    reply = only(peer.take())
    assert reply["data"]["recovered"] is False and reply["data"]["offset"] == 3


async def test_continuity_lost_during_a_resubscribe_fails_it(gateway: Gateway) -> None:
    """Continuity lost while a live subscription reads history for its ``recover`` answers
    ``unsubscribed`` then an error, never a ``subscribed`` for the dropped subscription."""
    peer = await connect_peer(gateway)
    await command(gateway, peer, "subscribe", {"channel": "news:a"})
    peer.take()

    async def lost(channel: str) -> None:
        gateway.delivery.on_continuity_lost(channel)

    wrapped(gateway).hooks["history_after"] = lost
    await command(
        gateway,
        peer,
        "subscribe",
        {"channel": "news:a", "recover": {"offset": 0, "epoch": "old"}},
        id="r",
    )
    messages = peer.take()
    assert [m["type"] for m in messages] == ["unsubscribed", "error"]
    assert messages[1]["id"] == "r"
    assert messages[1]["data"]["code"] == "subscription_failed"
    assert "news:a" not in set(gateway.hub.channels_of(peer))


async def test_unsubscribe_stops_events_and_is_idempotent(gateway: Gateway) -> None:
    """``unsubscribe`` answers ``unsubscribed`` (also when not subscribed) and stops events."""
    peer = await connect_peer(gateway)
    await command(gateway, peer, "subscribe", {"channel": "news:a"})
    peer.take()
    await command(gateway, peer, "unsubscribe", {"channel": "news:a"}, id="u1")
    await command(gateway, peer, "unsubscribe", {"channel": "news:a"}, id="u2")
    replies = peer.take()
    assert [(m["type"], m["id"], m["data"]) for m in replies] == [
        ("unsubscribed", "u1", {"channel": "news:a"}),
        ("unsubscribed", "u2", {"channel": "news:a"}),
    ]
    await publish(gateway, "news:a")
    await next_tick()
    assert peer.take() == []
    assert set(gateway.hub.channels_of(peer)) == {"user:user-1"}


# -- node subscriptions -------------------------------------------------------------


async def test_one_broker_subscription_per_channel_per_node(gateway: Gateway) -> None:
    """The broker is subscribed once per channel and released after the last local
    subscriber leaves, by unsubscribe or by disconnect."""
    broker = wrapped(gateway)
    first = await connect_peer(gateway, "user-1")
    second = await connect_peer(gateway, "user-2")
    for peer in (first, second):
        await command(gateway, peer, "subscribe", {"channel": "news:a"})
    assert broker.subscribes["news:a"] == 1
    await command(gateway, first, "unsubscribe", {"channel": "news:a"})
    await settle(gateway)
    assert broker.unsubscribes["news:a"] == 0
    gateway.disconnect(second)
    await broker.wait_unsubscribed("news:a")
    await broker.wait_unsubscribed("user:user-2")
    assert broker.unsubscribes == {"news:a": 1, "user:user-2": 1}
    await command(gateway, first, "subscribe", {"channel": "news:a"})
    assert broker.subscribes["news:a"] == 2
    await command(gateway, first, "unsubscribe", {"channel": "news:a"})
    await broker.wait_unsubscribed("news:a", 2)
    assert broker.subscribes == {"user:user-1": 1, "user:user-2": 1, "news:a": 2}


async def test_concurrent_first_subscribers_share_one_broker_subscription(gateway: Gateway) -> None:
    """Two connections subscribing a new channel at once make one broker subscription."""
    broker = wrapped(gateway)
    entered = asyncio.Event()
    proceed = asyncio.Event()

    async def slow(channel: str) -> None:
        if channel == "news:a":
            entered.set()
            await proceed.wait()

    broker.hooks["subscribe"] = slow
    peers = [await connect_peer(gateway, f"user-{i}") for i in range(3)]
    tasks = [
        asyncio.create_task(command(gateway, p, "subscribe", {"channel": "news:a"})) for p in peers
    ]
    await asyncio.wait_for(entered.wait(), WAIT)
    proceed.set()
    await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    assert broker.subscribes["news:a"] == 1
    await publish(gateway, "news:a")
    await next_tick()
    for peer in peers:
        assert offsets(peer.take(), "news:a") == [1]


@pytest.mark.parametrize("where", ["subscribe", "position", "history_before"])
async def test_broker_failure_during_subscribe_rolls_back(gateway: Gateway, where: str) -> None:
    """``BrokerUnavailable`` while subscribing answers ``subscription_failed`` and leaves no
    membership, node subscription or event behind; a retry then works."""
    broker = wrapped(gateway)

    async def down(channel: str) -> None:
        if channel == "news:a":
            raise BrokerUnavailable("broker down")

    broker.hooks[where] = down
    peer = await connect_peer(gateway)
    peer.take()
    data: dict[str, Any] = {"channel": "news:a"}
    if where == "history_before":
        data["recover"] = {"offset": 0, "epoch": "e"}
    await command(gateway, peer, "subscribe", data, id="f")
    error = only(peer.take())
    assert error["type"] == "error" and error["id"] == "f"
    assert error["data"]["code"] == "subscription_failed"
    assert error["data"]["channel"] == "news:a"
    assert not gateway.hub.has_channel("news:a")
    assert not gateway.hub.is_subscribed(peer, "news:a")
    assert set(gateway.hub.channels_of(peer)) == {"user:user-1"}
    assert gauge(gateway, "tidings_subscriptions") == 1
    if where != "subscribe":  # the node had subscribed: it lets go again
        await broker.wait_unsubscribed("news:a")
    await settle(gateway)
    assert "news:a" not in broker.inner._subscribed
    await publish(gateway, "news:a")
    await next_tick()
    assert peer.take() == []
    assert peer.closes == []
    broker.hooks.clear()
    await command(gateway, peer, "subscribe", {"channel": "news:a"})
    assert only(peer.take())["type"] == "subscribed"
    await publish(gateway, "news:a")
    await next_tick()
    assert offsets(peer.take()) == [2]


async def test_unexpected_exception_in_subscribe_is_internal_error(gateway: Gateway) -> None:
    """An unexpected fault answers ``internal_error``; the connection stays usable."""

    async def bug(channel: str) -> None:
        if channel == "news:a":
            raise RuntimeError("boom")

    wrapped(gateway).hooks["position"] = bug
    peer = await connect_peer(gateway)
    peer.take()
    await command(gateway, peer, "subscribe", {"channel": "news:a"}, id="x")
    error = only(peer.take())
    assert error["type"] == "error" and error["id"] == "x"
    assert error["data"]["code"] == "internal_error"
    assert "boom" not in error["data"]["message"]
    assert peer.closes == []
    assert gateway.hub.is_connected(peer)
    assert not gateway.hub.has_channel("news:a")
    await command(gateway, peer, "ping", id="p")
    assert only(peer.take())["type"] == "pong"
    await command(gateway, peer, "subscribe", {"channel": "news:b"})
    assert only(peer.take())["type"] == "subscribed"


async def test_disconnect_while_subscribing_leaves_nothing(gateway: Gateway) -> None:
    """A connection that goes away while its subscribe waits on the broker gets no reply
    and leaves neither membership nor node subscription."""
    broker = wrapped(gateway)
    peer = await connect_peer(gateway)
    peer.take()

    async def vanish(channel: str) -> None:
        if channel == "news:a":
            gateway.disconnect(peer)

    broker.hooks["subscribe"] = vanish
    await command(gateway, peer, "subscribe", {"channel": "news:a"})
    assert peer.take() == []
    assert not gateway.hub.has_channel("news:a")
    await broker.wait_unsubscribed("news:a")
    assert gateway.hub.connection_count() == 0


# -- broker signals -----------------------------------------------------------------


async def test_continuity_lost_unsubscribes_with_resubscribe_advice(gateway: Gateway) -> None:
    """On lost continuity every local subscriber gets a server ``unsubscribed`` and stops
    receiving the channel until it subscribes again."""
    broker = wrapped(gateway)
    first = await connect_peer(gateway, "user-1")
    second = await connect_peer(gateway, "user-2")
    bystander = await connect_peer(gateway, "user-3")
    for peer in (first, second):
        await command(gateway, peer, "subscribe", {"channel": "news:a"})
    for peer in (first, second, bystander):
        peer.take()
    gateway.delivery.on_continuity_lost("news:a")
    for peer in (first, second):
        assert only(peer.take()) == {
            "type": "unsubscribed",
            "timestamp": peer.messages()[-1]["timestamp"],
            "data": {"channel": "news:a", "reason": "insufficient_state", "resubscribe": True},
        }
        assert set(gateway.hub.channels_of(peer)) == {peer.session.personal}
    assert bystander.take() == []
    assert not gateway.hub.has_channel("news:a")
    assert gauge(gateway, "tidings_subscriptions") == 3
    await broker.wait_unsubscribed("news:a")
    results = await publish(gateway, "news:a")
    await next_tick()
    assert first.take() == [] and second.take() == []
    await command(
        gateway,
        first,
        "subscribe",
        {"channel": "news:a", "recover": {"offset": 0, "epoch": results[0].epoch}},
    )
    messages = first.take()
    assert messages[0]["data"]["recovered"] is True
    assert offsets(messages) == [1]


async def test_disconnect_user_closes_that_users_connections_with_4403(gateway: Gateway) -> None:
    """``disconnect_user`` closes every connection of that user with 4403, no other."""
    mine = [await connect_peer(gateway, "user-1") for _ in range(2)]
    other = await connect_peer(gateway, "user-2")
    await gateway.broker.disconnect_user("user-1", "banned")
    for peer in mine:
        assert peer.closes == [(4403, "banned")]
    assert other.closes == []
    await gateway.broker.disconnect_user("user-2", "")
    code, reason = other.closes[0]
    assert code == 4403 and reason


async def test_max_connections_per_user(make_gateway: MakeGateway) -> None:
    """Past ``max_connections_per_user`` connect raises ``TooManyConnections``."""
    gateway = await make_gateway({"limits": {"max_connections_per_user": 2}})
    first = await connect_peer(gateway, "user-1")
    await connect_peer(gateway, "user-1")
    with pytest.raises(TooManyConnections) as caught:
        await connect_peer(gateway, "user-1")
    assert caught.value.code == "rate_limited"
    assert gateway.hub.user_connection_count("user-1") == 2
    assert gauge(gateway, "tidings_connections") == 2
    await connect_peer(gateway, "user-2")
    gateway.disconnect(first)
    again = await connect_peer(gateway, "user-1")
    assert only(again.take())["type"] == "connected"


async def test_begin_drain_closes_everyone_with_1001(gateway: Gateway) -> None:
    """Draining fails readiness, closes every connection with 1001 and goes idle once they
    are gone."""
    peers = [await connect_peer(gateway, f"user-{i}") for i in range(3)]
    assert not gateway.draining
    assert await gateway.wait_idle(0.01) is False  # a configured, tiny limit
    gateway.begin_drain()
    assert gateway.draining
    for peer in peers:
        assert peer.closes and peer.closes[0][0] == 1001
    for peer in peers:
        gateway.disconnect(peer)
    assert await gateway.wait_idle(WAIT) is True
    assert gauge(gateway, "tidings_connections") == 0
    assert gauge(gateway, "tidings_subscriptions") == 0


# The sweeps below are driven by hand on a FakeClock: the gateway's own sweep loop runs
# too, but at that fake time it finds nothing due, so every ping and close happens
# exactly at the explicit ``sweep(now)`` the test makes (the real loop is proven over
# real sockets in test_ws_lifecycle.py).
HEARTBEAT = {"server": {"heartbeat_interval": 25, "heartbeat_timeout": 10}}


async def test_a_failing_session_is_closed_1011_and_the_sweep_goes_on(
    make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """A session whose tick raises is closed with 1011 and logged; the sweep goes on to
    the other peers, which are still pinged and then closed for their silence (4408)."""
    clock = FakeClock()
    gateway = await make_gateway(HEARTBEAT, clock=clock)
    broken = await connect_peer(gateway, "user-1")
    other = await connect_peer(gateway, "user-2")

    class Failing:
        """The session, except that its tick raises."""

        def __init__(self, session: object) -> None:
            self._session = session

        def __getattr__(self, name: str) -> object:
            return getattr(self._session, name)

        def tick(self, now: float) -> list[object]:
            raise RuntimeError("a bug in one session")

    broken.session = Failing(broken.session)
    clock.advance(25)
    gateway.sweeper.sweep(clock())
    assert broken.closes == [(1011, "internal error")]
    assert other.pings == 1 and other.closes == []
    clock.advance(10)
    gateway.sweeper.sweep(clock())
    code, reason = other.closes[0]
    assert code == 4408 and "heartbeat" in reason
    assert any("heartbeat or expiry check failed" in r.getMessage() for r in caplog.records)
    assert gateway.supervisor.healthy


async def test_sweeper_pings_then_closes_a_silent_peer_with_4408(make_gateway: MakeGateway) -> None:
    """A silent peer is pinged one interval after connect and closed with 4408 one
    timeout after that ping, while a peer that answers pings stays open."""
    clock = FakeClock()
    gateway = await make_gateway(HEARTBEAT, clock=clock)
    silent = await connect_peer(gateway, "user-1")
    lively = await connect_peer(gateway, "user-2")
    clock.advance(24.9)
    gateway.sweeper.sweep(clock())
    assert silent.pings == 0 and lively.pings == 0
    clock.advance(0.1)
    gateway.sweeper.sweep(clock())
    assert silent.pings == 1 and lively.pings == 1
    lively.session.saw_frame(clock())  # its pong
    clock.advance(9.9)
    gateway.sweeper.sweep(clock())
    assert silent.closes == []
    clock.advance(0.1)
    gateway.sweeper.sweep(clock())
    code, reason = silent.closes[0]
    assert code == 4408 and "heartbeat" in reason
    assert silent.pings == 1
    assert lively.closes == []
    for _ in range(4):  # answering every ping keeps it open interval after interval
        clock.advance(25)
        gateway.sweeper.sweep(clock())
        lively.session.saw_frame(clock())
    assert lively.pings >= 4
    assert lively.closes == []


async def test_sweep_closes_at_token_expiry_with_4401(make_gateway: MakeGateway) -> None:
    """The sweep closes a connection with ``unauthorized`` then 4401 once its token's
    expiry (plus leeway) has passed on the clock, not a moment before."""
    clock = FakeClock()
    gateway = await make_gateway({**HEARTBEAT, "auth": {"leeway": 5}}, clock=clock)
    identity = Identity("user-1", gateway.wall_clock() + 60, ())
    peer = FakePeer(gateway.new_session(identity))
    await gateway.connect(peer)
    peer.take()
    clock.advance(64)
    gateway.sweeper.sweep(clock())
    assert peer.closes == []
    clock.advance(1.5)
    gateway.sweeper.sweep(clock())
    messages = peer.take()
    assert [m["type"] for m in messages] == ["error"]
    assert messages[0]["data"]["code"] == "unauthorized"
    assert "expired" in messages[0]["data"]["message"]
    assert peer.closes and peer.closes[0][0] == 4401


# -- refresh and metrics ------------------------------------------------------------


async def test_refresh_accepts_the_same_user_and_closes_on_another(gateway: Gateway) -> None:
    """``refresh`` with a token for the same user answers ``refreshed``; another user's
    token gets ``unauthorized`` and close 4401."""
    peer = await connect_peer(gateway, "user-1")
    peer.take()
    await command(gateway, peer, "refresh", {"token": token("user-1")}, id="r1")
    reply = only(peer.take())
    assert reply["type"] == "refreshed" and reply["id"] == "r1"
    assert reply["data"]["expires_at"].endswith("Z")
    await command(gateway, peer, "refresh", {"token": token("user-2")}, id="r2")
    error = only(peer.take())
    assert error["data"]["code"] == "unauthorized" and error["id"] == "r2"
    assert peer.closes == [(4401, "unauthorized")]


async def test_metrics_count_connections_subscriptions_and_events(gateway: Gateway) -> None:
    """Publishing and delivering update the counters that ``render()`` exposes."""
    service = ApiService(gateway.settings, gateway.broker, gateway.metrics)
    peers = [await connect_peer(gateway, f"user-{i}") for i in range(2)]
    for peer in peers:
        await command(gateway, peer, "subscribe", {"channel": "news:a"})
    await command(gateway, peers[0], "subscribe", {"channel": "vault:x"})
    await service.publish(
        {"channel": "news:a", "type": "notification", "data": {"message": "hi", "level": "info"}}
    )
    await next_tick()
    assert gauge(gateway, "tidings_connections") == 2
    assert gauge(gateway, "tidings_subscriptions") == 4
    assert gauge(gateway, "tidings_events_published_total", type="notification") == 1
    assert gauge(gateway, "tidings_events_delivered_total", type="notification") == 2
    assert gauge(gateway, "tidings_errors_total", code="unauthorized") == 1
    assert gauge(gateway, "tidings_command_seconds_count", command="subscribe") == 3
    text = gateway.metrics.render().decode()
    assert 'tidings_events_published_total{type="notification"} 1.0' in text
    assert 'tidings_events_delivered_total{type="notification"} 2.0' in text
    gateway.disconnect(peers[0])
    assert gauge(gateway, "tidings_connections") == 1
    assert gauge(gateway, "tidings_subscriptions") == 2


async def test_unexpected_error_during_connect_leaves_no_connection(gateway: Gateway) -> None:
    """A fault while connecting registers nothing: no connection, channel or user slot."""
    broker = wrapped(gateway)

    async def bug(channel: str) -> None:
        raise RuntimeError("boom")

    broker.hooks["position"] = bug
    with pytest.raises(RuntimeError):
        await connect_peer(gateway, "user-1")
    assert gateway.hub.connection_count() == 0
    assert gateway.hub.user_connection_count("user-1") == 0
    assert not gateway.hub.has_channel("user:user-1")
    assert gauge(gateway, "tidings_connections") == 0
    assert gauge(gateway, "tidings_subscriptions") == 0
    assert await gateway.wait_idle(WAIT)
    await broker.wait_unsubscribed("user:user-1")
    broker.hooks.clear()
    peer = await connect_peer(gateway, "user-1")
    assert only(peer.take())["data"]["channels"] == ["user:user-1"]


async def test_resubscribe_recovery_never_sends_offsets_out_of_order(gateway: Gateway) -> None:
    """Recovery on a live subscription never sends an offset lower than one already sent."""
    results = await publish(gateway, "user:user-1", 3)
    peer = await connect_peer(gateway)
    await publish(gateway, "user:user-1")
    await next_tick()
    await command(
        gateway,
        peer,
        "subscribe",
        {"channel": "user:user-1", "recover": {"offset": 0, "epoch": results[0].epoch}},
    )
    await publish(gateway, "user:user-1")
    await next_tick()
    messages = peer.take()
    received = offsets(messages)
    assert received == sorted(set(received)), received
    reply = next(m for m in messages if m["type"] == "subscribed")
    assert reply["data"]["recovered"] is False


async def test_refresh_revokes_channels_the_new_token_no_longer_allows(gateway: Gateway) -> None:
    """A refresh whose token drops a channel claim ends that subscription with ``revoked``."""
    peer = await connect_peer(gateway, "user-1", channels=("team:*", "chat:*"))
    await command(gateway, peer, "subscribe", {"channel": "team:a"})
    await command(gateway, peer, "subscribe", {"channel": "chat:b"})
    peer.take()
    new = token("user-1", ("chat:*",))
    await command(gateway, peer, "refresh", {"token": new}, id="r")
    messages = peer.take()
    assert [m["type"] for m in messages] == ["refreshed", "unsubscribed"]
    assert messages[1]["data"] == {"channel": "team:a", "reason": "revoked", "resubscribe": False}
    assert set(gateway.hub.channels_of(peer)) == {"user:user-1", "chat:b"}
    await publish(gateway, "team:a")
    await next_tick()
    assert peer.take() == []


async def test_continuity_lost_during_setup_fails_the_subscribe(gateway: Gateway) -> None:
    """Continuity lost while a subscribe is set up answers that command with an error."""
    peer = await connect_peer(gateway, "user-1")
    peer.take()

    async def lost(channel: str) -> None:
        gateway.delivery.on_continuity_lost(channel)

    wrapped(gateway).hooks["position"] = lost
    await command(gateway, peer, "subscribe", {"channel": "news:a"}, id="s1")
    messages = peer.take()
    assert [m["type"] for m in messages] == ["unsubscribed", "error"]
    assert messages[1]["id"] == "s1"
    assert messages[1]["data"]["code"] == "subscription_failed"
    assert "news:a" not in set(gateway.hub.channels_of(peer))


async def test_personal_channel_holds_live_events_until_the_first_command(
    make_gateway: MakeGateway,
) -> None:
    """Personal events published right after connect wait for the client's first command."""
    gateway = await make_gateway({"auth": {"personal_channel_hold": 30}})
    peer = await connect_peer(gateway, "user-1")
    peer.take()
    await publish(gateway, "user:user-1", 2)
    await next_tick()
    assert peer.take() == []
    await command(gateway, peer, "ping")
    assert [m["type"] for m in peer.take()] == ["notification", "notification", "pong"]


async def test_personal_recover_right_after_connect_replays_in_order(
    make_gateway: MakeGateway,
) -> None:
    """A recover of the personal channel sent right after connect replays what was missed
    before connect, then the events published since, in order and exactly once."""
    gateway = await make_gateway({"auth": {"personal_channel_hold": 30}})
    results = await publish(gateway, "user:user-1", 3)
    peer = await connect_peer(gateway, "user-1")
    peer.take()
    await publish(gateway, "user:user-1", 2)  # live, while the client is about to recover
    await next_tick()
    await command(
        gateway,
        peer,
        "subscribe",
        {"channel": "user:user-1", "recover": {"offset": 1, "epoch": results[0].epoch}},
        id="r",
    )
    messages = peer.take()
    assert messages[0]["type"] == "subscribed" and messages[0]["data"]["recovered"] is True
    assert offsets(messages) == [2, 3, 4, 5]
    await publish(gateway, "user:user-1")
    await next_tick()
    assert offsets(peer.take()) == [6]


async def test_events_delivered_counts_frames_written_not_frames_held(
    make_gateway: MakeGateway,
) -> None:
    """``tidings_events_delivered_total`` counts event frames written to connections:
    nothing for frames a held subscriber keeps, each one once released or replayed."""
    gateway = await make_gateway({"auth": {"personal_channel_hold": 30}})

    def delivered() -> float:
        return gauge(gateway, "tidings_events_delivered_total", type="notification") or 0

    first = await publish(gateway, "user:user-1")
    peers = [await connect_peer(gateway, "user-1") for _ in range(2)]
    for peer in peers:
        peer.take()
    await publish(gateway, "user:user-1", 2)
    await next_tick()
    assert [peer.take() for peer in peers] == [[], []]
    assert delivered() == 0
    await command(gateway, peers[0], "ping")
    assert offsets(peers[0].take()) == [2, 3]
    assert delivered() == 2
    await command(
        gateway,
        peers[1],
        "subscribe",
        {"channel": "user:user-1", "recover": {"offset": 0, "epoch": first[0].epoch}},
    )
    assert offsets(peers[1].take()) == [1, 2, 3]
    assert delivered() == 5
    await publish(gateway, "user:user-1")
    await next_tick()
    assert [offsets(peer.take()) for peer in peers] == [[4], [4]]
    assert delivered() == 7


# Payloads of about 110, 210 and 70,110 bytes: 7-bit, 16-bit and 64-bit lengths.
@pytest.mark.parametrize("pad", [0, 100, 70_000], ids=["7-bit", "16-bit", "64-bit"])
def test_delivered_metric_reads_the_type_behind_every_frame_header(pad: int) -> None:
    """The event type counted for a written frame is read past each length form."""
    payload = encode_message(
        "chat_message", {"pad": "x" * pad}, channel="news:a", offset=1, timestamp=0.0
    )
    assert _frame_event_type(text_frame(payload)) == "chat_message"
    assert _frame_event_type(text_frame(b'{"no":"type"}')) == "unknown"


async def test_personal_hold_ends_on_its_own(make_gateway: MakeGateway) -> None:
    """A client that sends nothing still gets its personal events once the hold expires."""
    gateway = await make_gateway({"auth": {"personal_channel_hold": 0.05}})
    peer = await connect_peer(gateway, "user-1")
    peer.take()
    await publish(gateway, "user:user-1")
    got = await asyncio.wait_for(peer.next_message(), WAIT)
    assert got["type"] == "notification" and got["offset"] == 1


async def test_personal_subscribe_again_does_not_count_towards_the_limit(
    make_gateway: MakeGateway,
) -> None:
    """Unsubscribing and subscribing the personal channel again keeps it outside
    max_subscriptions."""
    gateway = await make_gateway({"limits": {"max_subscriptions": 1}})
    peer = await connect_peer(gateway, "user-1")
    await command(gateway, peer, "unsubscribe", {"channel": "user:user-1"})
    await command(gateway, peer, "subscribe", {"channel": "user:user-1"}, id="p")
    await command(gateway, peer, "subscribe", {"channel": "news:a"}, id="n")
    replies = [m for m in peer.take() if m.get("id") in ("p", "n")]
    assert [m["type"] for m in replies] == ["subscribed", "subscribed"]


async def test_the_subscription_limit_lets_a_held_channel_through(
    make_gateway: MakeGateway,
) -> None:
    """At ``max_subscriptions`` a subscribe of a channel already held is answered as an
    idempotent subscribe (the hub knows it is held); a new channel is refused without
    asking the policy or the broker."""
    gateway = await make_gateway({"limits": {"max_subscriptions": 1}})
    peer = await connect_peer(gateway)
    await command(gateway, peer, "subscribe", {"channel": "news:a"}, id="1")
    peer.take()
    await command(gateway, peer, "subscribe", {"channel": "news:a"}, id="2")
    assert only(peer.take())["type"] == "subscribed"
    await command(gateway, peer, "subscribe", {"channel": "news:b"}, id="3")
    refused = only(peer.take())
    assert refused["type"] == "error" and refused["id"] == "3"
    assert refused["data"]["code"] == "subscription_failed"
    assert "news:b" not in wrapped(gateway).subscribes
    assert gateway.hub.channels_of(peer) == ["user:user-1", "news:a"]


async def test_the_hub_counts_only_confirmed_subscriptions(gateway: Gateway) -> None:
    """A subscription under setup is held in the hub but not counted, nor listed as the
    connection's: the count and the list change when the reply is sent."""
    peer = await connect_peer(gateway)
    sub, _ = gateway.hub.subscribe(peer, "news:setup", hold=True)
    assert gateway.hub.is_subscribed(peer, "news:setup")
    assert gateway.hub.channels_of(peer) == ["user:user-1"]
    assert gateway.hub.subscription_count() == 1
    gateway.hub.confirm(sub)
    gateway.hub.confirm(sub)  # idempotent
    assert gateway.hub.subscription_count() == 2
    assert gateway.hub.drop(peer, "news:setup") == (True, True)
    assert gateway.hub.subscription_count() == 1
    gateway.disconnect(peer)
    assert gateway.hub.subscription_count() == 0
