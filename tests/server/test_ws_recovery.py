"""Recovery, subscriptions and the envelope end to end (protocol sections 2, 4 and 5).

A real server on port 0, events published through the server API, a real WebSocket
client. "Nothing else arrived" is proved with a sentinel: the next message after the
expected ones is a live event published afterwards, or the ``pong`` to a ``ping``.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from helpers import (
    TIMEOUT,
    Client,
    connect,
    publish,
    serve,
    token,
    ws_assert_open,
    ws_checked,
)

NEWS = ("news:*",)


async def _recv_raw(client: Client) -> tuple[str, dict[str, Any]]:
    """The next text message as sent on the wire, and decoded."""
    msg = await client.ws.receive(timeout=TIMEOUT)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    return msg.data, ws_checked(msg.data)


async def _event(client: Client, offset: int, channel: str = "news:r") -> dict[str, Any]:
    """The next message, which must be the event at ``offset`` of ``channel``."""
    message = ws_checked(json.dumps(await client.recv()))
    assert message.get("channel") == channel, message
    assert message.get("offset") == offset, message
    return message


async def _subscribed_at(server: Any, channel: str, events: int = 0) -> tuple[int, str]:
    """Subscribe once, receive ``events`` published events, return (offset, epoch)."""
    async with connect(server, token("reader", NEWS)) as client:
        reply = await client.subscribe(channel)
        assert reply["type"] == "subscribed", reply
        epoch: str = reply["data"]["epoch"]
        offset: int = reply["data"]["offset"]
        for _ in range(events):
            offset = (await publish(server, channel))["offset"]
            await _event(client, offset, channel)
        return offset, epoch


async def test_recover_replays_missed_events_in_order_then_live() -> None:
    """Reconnecting with ``recover`` gets ``recovered: true``, exactly the missed events
    in order, and then live events."""
    async with serve() as server:
        offset, epoch = await _subscribed_at(server, "news:r", events=1)
        assert offset == 1
        missed = [
            await publish(server, "news:r", data={"message": f"m{i}", "level": "info"})
            for i in range(3)
        ]
        async with connect(server, token("reader", NEWS)) as client:
            reply = await client.subscribe("news:r", recover={"offset": offset, "epoch": epoch})
            assert reply == {
                "type": "subscribed",
                "id": "s",
                "timestamp": reply["timestamp"],
                "data": {"channel": "news:r", "offset": 4, "epoch": epoch, "recovered": True},
            }
            for index, result in enumerate(missed):
                event = await _event(client, result["offset"])
                assert event["id"] == result["id"]
                assert event["data"]["message"] == f"m{index}"
            live = await publish(server, "news:r")
            assert (await _event(client, 5))["id"] == live["id"]


async def test_recover_with_nothing_missed_replays_nothing() -> None:
    """A ``recover`` at the latest offset is ``recovered: true`` with nothing replayed."""
    async with serve() as server:
        offset, epoch = await _subscribed_at(server, "news:r", events=2)
        async with connect(server, token("reader", NEWS)) as client:
            reply = await client.subscribe("news:r", recover={"offset": offset, "epoch": epoch})
            assert reply["data"] == {
                "channel": "news:r",
                "offset": 2,
                "epoch": epoch,
                "recovered": True,
            }
            await publish(server, "news:r")
            await _event(client, 3)


async def test_recover_while_subscribed_sends_no_duplicates() -> None:
    """A repeated ``subscribe`` with ``recover`` on a live subscription never resends an
    event the connection already received."""
    async with serve() as server, connect(server, token("u", NEWS)) as client:
        reply = await client.subscribe("news:r")
        epoch = reply["data"]["epoch"]
        for offset in (1, 2):
            await publish(server, "news:r")
            await _event(client, offset)
        again = await client.subscribe("news:r", id="again", recover={"offset": 0, "epoch": epoch})
        assert again["type"] == "subscribed"
        assert again["data"]["recovered"] is True
        await publish(server, "news:r")
        await _event(client, 3)


async def test_recover_beyond_history_is_not_recovered() -> None:
    """An offset older than the history window gives ``recovered: false`` and no replay."""
    async with serve({"history": {"size": 2}}) as server:
        offset, epoch = await _subscribed_at(server, "news:r")
        assert offset == 0
        for _ in range(3):
            await publish(server, "news:r")
        async with connect(server, token("reader", NEWS)) as client:
            reply = await client.subscribe("news:r", recover={"offset": offset, "epoch": epoch})
            assert reply["type"] == "subscribed"
            assert reply["data"] == {
                "channel": "news:r",
                "offset": 3,
                "epoch": epoch,
                "recovered": False,
            }
            await publish(server, "news:r")
            await _event(client, 4)


async def test_recover_with_another_epoch_replays_the_current_one() -> None:
    """A ``recover`` naming another epoch gives ``recovered: false`` with ``since: 0``,
    then the current epoch's events from offset 1, then live events."""
    async with serve() as server:
        offset, epoch = await _subscribed_at(server, "news:r", events=1)
        await publish(server, "news:r")
        async with connect(server, token("reader", NEWS)) as client:
            reply = await client.subscribe(
                "news:r", recover={"offset": offset, "epoch": "other-" + epoch}
            )
            assert reply["data"] == {
                "channel": "news:r",
                "offset": 2,
                "epoch": epoch,
                "recovered": False,
                "since": 0,
            }
            await _event(client, 1)
            await _event(client, 2)
            await publish(server, "news:r")
            await _event(client, 3)


async def test_recover_after_server_restart_replays_the_new_epoch() -> None:
    """After an in-memory server restarts, ``recover`` with the old epoch gives
    ``recovered: false`` under the new epoch, and the new epoch's events from offset 1
    (still in history) are replayed, in order, before live ones."""
    async with serve() as first:
        offset, old_epoch = await _subscribed_at(first, "news:r", events=3)
    async with serve() as second:
        published = [await publish(second, "news:r") for _ in range(2)]
        async with connect(second, token("reader", NEWS)) as client:
            reply = await client.subscribe("news:r", recover={"offset": offset, "epoch": old_epoch})
            assert reply["type"] == "subscribed"
            assert reply["data"]["recovered"] is False
            assert reply["data"]["offset"] == 2 and reply["data"]["since"] == 0
            assert reply["data"]["epoch"] != old_epoch
            for result in published:
                assert (await _event(client, result["offset"]))["id"] == result["id"]
            await publish(second, "news:r")
            await _event(client, 3)


async def test_recover_after_server_restart_past_history_replays_nothing() -> None:
    """When the restarted server's history no longer starts at offset 1, ``recover``
    with the old epoch gives ``recovered: false`` and live events only."""
    async with serve({"history": {"size": 2}}) as first:
        offset, old_epoch = await _subscribed_at(first, "news:r", events=1)
    async with serve({"history": {"size": 2}}) as second:
        for _ in range(5):
            await publish(second, "news:r")
        async with connect(second, token("reader", NEWS)) as client:
            reply = await client.subscribe("news:r", recover={"offset": offset, "epoch": old_epoch})
            assert reply["data"]["recovered"] is False and reply["data"]["offset"] == 5
            assert "since" not in reply["data"]
            await publish(second, "news:r")
            await _event(client, 6)


@pytest.mark.parametrize("sub", ["alice", "auth0|abc"])
async def test_personal_channel_is_automatic(sub: str) -> None:
    """``connected`` lists the personal channel and its events arrive without subscribing."""
    async with serve() as server, connect(server, token(sub), welcome=False) as client:
        hello = ws_checked(json.dumps(await client.recv()))
        assert hello["type"] == "connected"
        assert hello["data"]["user_id"] == sub
        assert hello["data"]["channels"] == [f"user:{sub}"]
        result = await publish(
            server, f"user:{sub}", data={"message": "for you", "level": "success"}
        )
        event = await _event(client, result["offset"], f"user:{sub}")
        assert event["type"] == "notification"
        assert event["data"] == {"message": "for you", "level": "success"}


async def test_sub_outside_name_grammar_has_no_personal_channel() -> None:
    """A ``sub`` that does not fit the channel name grammar gets no personal channel."""
    async with serve() as server, connect(server, token("has space"), welcome=False) as client:
        hello = ws_checked(json.dumps(await client.recv()))
        assert hello["data"]["user_id"] == "has space"
        assert hello["data"]["channels"] == []
        await ws_assert_open(client)


async def test_subscribe_twice_is_idempotent() -> None:
    """A second ``subscribe`` to the same channel succeeds and events still arrive once."""
    async with serve() as server, connect(server, token("u", NEWS)) as client:
        first = await client.subscribe("news:r", id="one")
        second = await client.subscribe("news:r", id="two")
        assert (first["type"], first["id"]) == ("subscribed", "one")
        assert (second["type"], second["id"]) == ("subscribed", "two")
        assert first["data"] == second["data"]
        await publish(server, "news:r")
        await publish(server, "news:r")
        await _event(client, 1)
        await _event(client, 2)
        await ws_assert_open(client)


async def test_unsubscribe_stops_delivery() -> None:
    """After ``unsubscribed`` no further event of that channel is delivered."""
    async with serve() as server, connect(server, token("u", NEWS)) as client:
        assert (await client.subscribe("news:r"))["type"] == "subscribed"
        await publish(server, "news:r")
        await _event(client, 1)
        await client.send("unsubscribe", {"channel": "news:r"}, id="u1")
        reply = ws_checked(json.dumps(await client.recv()))
        assert (reply["type"], reply["id"], reply["data"]) == (
            "unsubscribed",
            "u1",
            {"channel": "news:r"},
        )
        await publish(server, "news:r")
        await ws_assert_open(client)


async def test_unsubscribe_not_subscribed_succeeds() -> None:
    """``unsubscribe`` from a channel never subscribed answers ``unsubscribed``."""
    async with serve() as server, connect(server, token("u", NEWS)) as client:
        await client.send("unsubscribe", {"channel": "news:never"}, id="u1")
        reply = ws_checked(json.dumps(await client.recv()))
        assert (reply["type"], reply["id"], reply["data"]) == (
            "unsubscribed",
            "u1",
            {"channel": "news:never"},
        )
        await ws_assert_open(client)


async def test_every_message_has_object_data_and_no_null() -> None:
    """Every kind of server message has an object ``data`` and no JSON ``null``; a reply
    to a command without ``id`` has no ``id`` key."""
    async with serve() as server, connect(server, token("u", NEWS), welcome=False) as client:
        seen: dict[str, str] = {}

        async def take(expected: str) -> dict[str, Any]:
            text, message = await _recv_raw(client)
            assert "null" not in text, text
            assert message["type"] == expected, message
            seen[expected] = text
            return message

        await take("connected")
        await client.send("ping")
        assert "id" not in await take("pong")
        await client.send("subscribe", {"channel": "news:r"})
        assert "id" not in await take("subscribed")
        await publish(
            server,
            "news:r",
            "chat_message",
            {"conversation_id": "c", "sender_id": "s", "content": "hi"},
        )
        await take("chat_message")
        await client.send(
            "subscribe", {"channel": "news:r", "recover": {"offset": 0, "epoch": "x"}}
        )
        await take("subscribed")
        await client.send("subscribe", {"channel": "secret:x"})
        assert "id" not in await take("error")
        await client.send("refresh", {"token": token("u", NEWS)})
        assert "id" not in await take("refreshed")
        await client.send("unsubscribe", {"channel": "news:r"})
        assert "id" not in await take("unsubscribed")
        await client.ws.send_str("not json")
        await take("error")
        assert set(seen) == {
            "connected",
            "pong",
            "subscribed",
            "chat_message",
            "error",
            "refreshed",
            "unsubscribed",
        }


async def test_personal_channel_recovers_in_order_despite_live_events_at_connect() -> None:
    """With the connect-time hold, a personal-channel recover sent right after ``connected``
    replays the missed events before a live event published in between, exactly once."""
    async with serve({"auth": {"personal_channel_hold": 10}}) as server:
        async with connect(server, token("pat")) as first:
            reply = await first.subscribe("user:pat", recover={"offset": 0, "epoch": ""})
            epoch, seen = reply["data"]["epoch"], reply["data"]["offset"]
        for _ in range(3):
            await publish(server, "user:pat")
        async with connect(server, token("pat")) as client:
            await publish(server, "user:pat")  # live, before the client's first command
            again = await client.subscribe("user:pat", recover={"offset": seen, "epoch": epoch})
            assert again["data"]["recovered"] is True
            got = [(await client.recv())["offset"] for _ in range(4)]
            assert got == [seen + 1, seen + 2, seen + 3, seen + 4]
            await publish(server, "user:pat")
            assert (await client.recv())["offset"] == seen + 5
