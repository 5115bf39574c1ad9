"""First rung of integration: a real server on port 0 and a real WebSocket client."""

from __future__ import annotations

from helpers import connect, publish, serve, token


async def test_event_reaches_subscriber() -> None:
    """An event published through the API reaches a subscribed connection."""
    async with serve() as server, connect(server, token("u1", ("news:*",))) as client:
        reply = await client.subscribe("news:today")
        assert reply["type"] == "subscribed"
        assert reply["data"] == {
            "channel": "news:today",
            "offset": 0,
            "epoch": reply["data"]["epoch"],
        }
        result = await publish(server, "news:today")
        event = await client.recv()
        assert event["type"] == "notification"
        assert event["offset"] == result["offset"] == 1
        assert event["id"] == result["id"]
