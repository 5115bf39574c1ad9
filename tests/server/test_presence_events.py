"""Presence events through the real server with the memory broker, and the pure table."""

from __future__ import annotations

import asyncio
from typing import Any

from helpers import Client, api, connect, publish, serve, token
from tidings.brokers.presence_table import PresenceTable, idempotency_key
from tidings.client import Presence
from tidings.client import connect as client_connect
from timeouts import TIMEOUT


def _presence(ttl: float) -> dict[str, Any]:
    return {
        "namespaces": {
            "default": {"rule": "public"},
            "room": {"rule": "public", "presence_events": True, "presence_ttl": ttl},
        }
    }


async def _next_other(client: Client, me: str) -> dict[str, Any]:
    """The next message that is not about ``me`` joining (own join comes first)."""
    while True:
        message = await client.recv()
        if message["type"] == "join" and message["data"]["user_id"] == me:
            continue
        return message


def test_table_debounces_leaves_and_counts_occupancy() -> None:
    """The table joins once per user, hides a return within the ttl and leaves after it."""
    table = PresenceTable("g")
    (join,) = table.arrive("room:a", "u1")
    assert (join.kind, join.occupancy) == ("join", "occupied")
    assert table.arrive("room:a", "u1") == []
    table.depart("room:a", "u1", 10.0)
    table.depart("room:a", "u1", 10.0)
    assert table.arrive("room:a", "u1") == []  # back before the deadline: nothing
    table.depart("room:a", "u1", 20.0)
    assert table.expire(19.9) == []
    (leave,) = table.expire(20.0)
    assert (leave.kind, leave.occupancy, leave.seq) == ("leave", "vacated", 2)
    assert table.next_deadline() is None and table.present("room:a") == []


def test_idempotency_keys_differ_per_transition_and_event() -> None:
    """Keys are stable for one transition and event, and differ otherwise."""
    table = PresenceTable("g")
    (join,) = table.arrive("room:a", "u1")
    assert idempotency_key(join, "user_joined") == idempotency_key(join, "user_joined")
    assert idempotency_key(join, "user_joined") != idempotency_key(join, "channel_occupied")
    table.depart("room:a", "u1", 0.0)
    assert [c.kind for c in table.expire(0.0)] == ["leave"]
    (again,) = table.arrive("room:a", "u1")
    assert idempotency_key(again, "user_joined") != idempotency_key(join, "user_joined")
    assert "u1" not in idempotency_key(again, "user_joined")


async def test_join_and_leave_reach_another_subscriber() -> None:
    """A subscriber sees another user join and, after the ttl, leave; no offset, no id."""
    async with serve(_presence(0.2)) as server, connect(server, token("alice")) as alice:
        await alice.subscribe("room:a")
        async with connect(server, token("bob")) as bob:
            await bob.subscribe("room:a")
            join = await _next_other(alice, "alice")
            assert join["type"] == "join" and join["channel"] == "room:a"
            assert join["data"] == {"user_id": "bob"}
            assert "offset" not in join and "id" not in join and "timestamp" in join
        leave = await _next_other(alice, "alice")
        assert leave["type"] == "leave" and leave["data"] == {"user_id": "bob"}


async def test_reconnect_within_ttl_causes_neither_leave_nor_join() -> None:
    """A user who drops and resubscribes within the ttl causes no presence message."""
    async with serve(_presence(30)) as server, connect(server, token("alice")) as alice:
        await alice.subscribe("room:a")
        async with connect(server, token("bob")) as bob:
            await bob.subscribe("room:a")
            assert (await _next_other(alice, "alice"))["type"] == "join"
            await server.gateway.presence_events.settled()
        async with connect(server, token("bob")) as bob:
            await bob.subscribe("room:a")
            await server.gateway.presence_events.settled()
            await publish(server, "room:a")
            marker = await _next_other(alice, "alice")
            assert marker["type"] == "notification", marker


async def test_second_connection_of_a_user_is_not_a_join() -> None:
    """A second connection of a present user and its end cause no message."""
    async with serve(_presence(0.2)) as server, connect(server, token("alice")) as alice:
        await alice.subscribe("room:a")
        async with connect(server, token("bob")) as bob:
            await bob.subscribe("room:a")
            assert (await _next_other(alice, "alice"))["type"] == "join"
            async with connect(server, token("bob")) as second:
                await second.subscribe("room:a")
            await server.gateway.presence_events.settled()
            await publish(server, "room:a")
            assert (await _next_other(alice, "alice"))["type"] == "notification"


async def test_namespace_without_presence_events_gets_none() -> None:
    """Channels of a namespace without ``presence_events`` get no join or leave."""
    async with serve(_presence(0.2)) as server, connect(server, token("alice")) as alice:
        await alice.subscribe("lobby:a")
        async with connect(server, token("bob")) as bob:
            await bob.subscribe("lobby:a")
        await server.gateway.presence_events.settled()
        await publish(server, "lobby:a")
        assert (await alice.recv())["type"] == "notification"


async def test_presence_types_cannot_be_published() -> None:
    """``join`` and ``leave`` are reserved: the API refuses them as event types."""
    async with serve(_presence(0.2)) as server:
        status, answer = await api(
            server,
            "POST",
            "/api/publish",
            {"channel": "room:a", "type": "join", "data": {"user_id": "x"}},
        )
        assert status == 400, answer


async def test_python_sdk_surfaces_joins_and_leaves() -> None:
    """``Client.subscribe(on_presence=...)`` gets a ``Presence`` per join and leave."""
    seen: asyncio.Queue[Presence] = asyncio.Queue()
    async with (
        serve(_presence(0.2)) as server,
        client_connect(server.ws_url, token=token("alice")) as client,
    ):
        sub = await client.subscribe("room:sdk", on_presence=seen.put_nowait)
        async with connect(server, token("bob")) as bob:
            await bob.subscribe("room:sdk")
            got = [await _next_presence(seen)]
            while got[-1].user_id != "bob":
                got.append(await _next_presence(seen))
        leave = await _next_presence(seen)
        assert got[-1] == Presence("room:sdk", "join", "bob")
        assert leave == Presence("room:sdk", "leave", "bob")
        assert sub.qsize() == 0  # presence is not an item of the event stream


async def _next_presence(queue: asyncio.Queue[Presence]) -> Presence:
    async with asyncio.timeout(TIMEOUT):
        return await queue.get()
