"""The Python client over the SSE transport, against a real server."""

from __future__ import annotations

import asyncio

from helpers import TIMEOUT, publish, serve, token
from tidings.client import Backoff, Client, Event
from tidings.protocol import CloseCode


async def test_client_over_sse_subscribes_receives_and_recovers() -> None:
    """``transport="sse"``: subscribe via POST, events from the stream, and after the
    stream ends the client reconnects and recovers what it missed, in order."""
    async with serve() as server:
        client = Client(
            server.ws_url,
            token=token("u1", ("news:*",)),
            transport="sse",
            backoff=Backoff(initial=0.01, cap=0.05, random=lambda: 0.5),
        )
        async with client:
            sub = await client.subscribe("news:a")
            first = await publish(server, "news:a")
            item = await asyncio.wait_for(anext(sub), TIMEOUT)
            assert isinstance(item, Event) and item.offset == first["offset"]
            assert client.connection_id is not None and client.connection_id.startswith("c_")
            peer = server.gateway.hub.peer(client.connection_id)
            assert peer is not None
            peer.close(CloseCode.GOING_AWAY, "test: stream ended")
            # Published while the client is away (its stream was just ended).
            missed = [await publish(server, "news:a") for _ in range(3)]
            items = [await asyncio.wait_for(anext(sub), TIMEOUT) for _ in missed]
            assert [i.offset for i in items if isinstance(i, Event)] == [
                m["offset"] for m in missed
            ]
            assert client.connection_id != peer.conn_id
            await client.unsubscribe("news:a")
