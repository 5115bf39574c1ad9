"""The server API over real HTTP: publish, batch, history, channels, presence, probes."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import pytest
import yarl
from prometheus_client.parser import text_string_to_metric_families

from helpers import (
    API_KEY,
    TIMEOUT,
    api,
    connect,
    publish,
    serve,
    token,
    ws_assert_open,
    ws_bare,
    ws_until_close,
)
from tidings.brokers.base import PublishRequest, PublishResult
from tidings.brokers.memory import MemoryBroker
from tidings.errors import BrokerUnavailable
from tidings.server import RunningServer

NOTE = {"message": "hello", "level": "info"}
CHAT = {"conversation_id": "conv-1", "sender_id": "user-1", "content": "Hi there"}
STATUS = {"entity_type": "order", "entity_id": "o-7", "status": "shipped"}


async def call(
    server: RunningServer,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    key: str | None = API_KEY,
) -> tuple[int, str, Any]:
    """One raw request; the path is sent exactly as given (no re-quoting)."""
    hdrs = dict(headers or {})
    if key is not None:
        hdrs.setdefault("Authorization", f"Bearer {key}")
    url = yarl.URL(server.http_url + path, encoded=True)
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.request(method, url, data=body, headers=hdrs) as response,
    ):
        text = await response.text()
        try:
            parsed: Any = json.loads(text)
        except ValueError:
            parsed = text
        return response.status, response.content_type, parsed


def assert_error(
    status: int, answer: Any, expected_status: int, code: str, fragment: str = ""
) -> None:
    """The answer is the API's JSON error shape with this status and code."""
    assert status == expected_status, answer
    assert isinstance(answer, dict) and set(answer) == {"error"}, answer
    error = answer["error"]
    assert set(error) == {"code", "message"}, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    assert fragment.lower() in error["message"].lower(), error


def body(
    channel: str, kind: str = "notification", data: Mapping[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    return {"channel": channel, "type": kind, "data": dict(NOTE if data is None else data), **extra}


async def history(server: RunningServer, channel: str, query: str = "") -> dict[str, Any]:
    status, answer = await api(server, "GET", f"/api/channels/{channel}/history{query}")
    assert status == 200, answer
    assert isinstance(answer, dict)
    return answer


# -- publish -----------------------------------------------------------------------------


async def test_publish_single_channel_returns_one_result() -> None:
    """A publish to one channel answers one result with the channel, offset 1 and an id."""
    async with serve() as server:
        status, answer = await api(server, "POST", "/api/publish", body("news:a"))
        assert status == 200, answer
        assert list(answer) == ["results"]
        [result] = answer["results"]
        assert result["channel"] == "news:a"
        assert result["offset"] == 1
        assert isinstance(result["id"], str) and result["id"]
        again = await publish(server, "news:a")
        assert again["offset"] == 2
        assert again["id"] != result["id"]


async def test_publish_to_several_channels_answers_per_channel() -> None:
    """``channels: [...]`` publishes to each channel and answers one result per channel."""
    async with serve() as server, connect(server, token("u1", ("news:*",))) as client:
        await publish(server, "news:b")
        assert (await client.subscribe("news:b"))["type"] == "subscribed"
        status, answer = await api(
            server,
            "POST",
            "/api/publish",
            {"channels": ["news:a", "news:b", "news:c"], "type": "notification", "data": NOTE},
        )
        assert status == 200, answer
        results = answer["results"]
        assert [r["channel"] for r in results] == ["news:a", "news:b", "news:c"]
        assert [r["offset"] for r in results] == [1, 2, 1]
        event = await client.recv()
        assert (event["channel"], event["offset"], event["id"]) == ("news:b", 2, results[1]["id"])
        for result in results:
            page = await history(server, result["channel"])
            assert [e["id"] for e in page["events"]][-1] == result["id"]


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        ("notification", NOTE),
        ("notification", {"message": "done", "level": "success"}),
        ("notification", {"message": "careful", "level": "warning"}),
        ("notification", {"message": "broken", "level": "error", "extra": {"n": 1}}),
        ("chat_message", CHAT),
        ("chat_message", {**CHAT, "attachments": ["a.png"]}),
        ("status_update", STATUS),
        ("status_update", {**STATUS, "progress": 0.5}),
    ],
)
async def test_builtin_types_accept_valid_data(kind: str, data: dict[str, Any]) -> None:
    """Each built-in type with its required fields is published, extra fields passed through."""
    async with serve() as server:
        status, answer = await api(server, "POST", "/api/publish", body("news:a", kind, data))
        assert status == 200, answer
        [event] = (await history(server, "news:a"))["events"]
        assert event["type"] == kind
        assert event["data"] == data


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        ("notification", {"level": "info"}),
        ("notification", {"message": "", "level": "info"}),
        ("notification", {"message": 5, "level": "info"}),
        ("notification", {"message": "x"}),
        ("notification", {"message": "x", "level": "debug"}),
        ("notification", {"message": "x", "level": None}),
        ("chat_message", {"sender_id": "u", "content": "c"}),
        ("chat_message", {"conversation_id": "c", "content": "c"}),
        ("chat_message", {"conversation_id": "c", "sender_id": "u"}),
        ("chat_message", {**CHAT, "sender_id": 42}),
        ("status_update", {"entity_id": "1", "status": "s"}),
        ("status_update", {"entity_type": "t", "status": "s"}),
        ("status_update", {"entity_type": "t", "entity_id": "1"}),
        ("status_update", {**STATUS, "status": ["shipped"]}),
    ],
)
async def test_builtin_types_reject_invalid_data(kind: str, data: dict[str, Any]) -> None:
    """A built-in type missing a required field or with a bad value answers 400."""
    async with serve() as server:
        status, answer = await api(server, "POST", "/api/publish", body("news:a", kind, data))
        assert_error(status, answer, 400, "invalid_request")
        assert (await history(server, "news:a"))["offset"] == 0


@pytest.mark.parametrize(
    "request_body",
    [
        {"channel": "news:a", "data": NOTE},
        {"channel": "news:a", "type": "Bad-Type", "data": NOTE},
        {"channel": "news:a", "type": "", "data": NOTE},
        {"channel": "news:a", "type": 7, "data": NOTE},
        {"channel": "news:a", "type": "x" * 65, "data": NOTE},
        {"channel": "news:a", "type": "notification", "data": ["not", "an", "object"]},
        {"channel": "news:a", "type": "custom_thing", "data": "text"},
        {"type": "notification", "data": NOTE},
        {"channel": "news:a", "channels": ["news:b"], "type": "notification", "data": NOTE},
        {"channels": [], "type": "notification", "data": NOTE},
        {"channels": "news:a", "type": "notification", "data": NOTE},
        {"channel": "nocolon", "type": "notification", "data": NOTE},
        {"channel": "News:a", "type": "notification", "data": NOTE},
        {"channel": 12, "type": "notification", "data": NOTE},
        {"channels": ["news:a", "bad channel"], "type": "notification", "data": NOTE},
        {"channel": "news:a", "type": "notification", "data": NOTE, "idempotency_key": ""},
        {"channel": "news:a", "type": "notification", "data": NOTE, "idempotency_key": 5},
        ["not", "an", "object"],
    ],
)
async def test_malformed_publish_is_invalid_request(request_body: Any) -> None:
    """Missing/bad type, channel, data or idempotency key answers 400 invalid_request."""
    async with serve() as server:
        status, answer = await api(server, "POST", "/api/publish", request_body)
        assert_error(status, answer, 400, "invalid_request")
        assert (await history(server, "news:a"))["offset"] == 0


@pytest.mark.parametrize(
    ("path", "request_body", "fragment"),
    [
        (
            "/api/publish",
            body("news:a", idempotencykey="k-1"),
            "unknown field 'idempotencykey' (did you mean 'idempotency_key'?)",
        ),
        (
            "/api/publish",
            {"chanel": "news:a", "type": "notification", "data": NOTE},
            "unknown field 'chanel' (did you mean 'channel'?)",
        ),
        (
            "/api/publish",
            body("news:a", priority="high"),
            "unknown field 'priority'; expected channel, channels, data, idempotency_key, type",
        ),
        (
            "/api/batch",
            {"events": [body("news:b"), body("news:a", idempotencyKey="k")]},
            "events[1]: unknown field 'idempotencyKey'",
        ),
        (
            "/api/batch",
            {"events": [body("news:a")], "idempotency_key": "k"},
            "unknown field 'idempotency_key'; expected events",
        ),
    ],
)
async def test_unknown_fields_are_refused_by_name(
    path: str, request_body: Any, fragment: str
) -> None:
    """A publish or batch with a field the API does not know (a typo of
    ``idempotency_key`` would publish without deduplication) answers 400 naming it, and
    publishes nothing."""
    async with serve() as server:
        status, answer = await api(server, "POST", path, request_body)
        assert_error(status, answer, 400, "invalid_request", fragment)
        assert (await history(server, "news:a"))["offset"] == 0
        assert (await history(server, "news:b"))["offset"] == 0


async def test_custom_type_is_published_and_delivered() -> None:
    """A well-formed custom type with any data object is accepted and delivered as is."""
    data = {"order": {"id": 7, "items": [1, 2]}, "note": None}
    async with serve() as server, connect(server, token("u1", ("orders:*",))) as client:
        await client.subscribe("orders:7")
        result = await publish(server, "orders:7", "order_shipped", data)
        event = await client.recv()
        assert event["type"] == "order_shipped"
        assert event["data"] == data
        assert event["offset"] == result["offset"] == 1


@pytest.mark.parametrize(
    "kind",
    [
        "connected",
        "subscribe",
        "subscribed",
        "unsubscribe",
        "unsubscribed",
        "ping",
        "pong",
        "refresh",
        "refreshed",
        "error",
        "join",
        "leave",
    ],
)
async def test_reserved_type_is_rejected(kind: str) -> None:
    """Every command and reply name is reserved and cannot be published."""
    async with serve() as server:
        status, answer = await api(server, "POST", "/api/publish", body("news:a", kind, {"x": 1}))
        assert_error(status, answer, 400, "invalid_request", "reserved")


async def test_allowed_types_restricts_publishing() -> None:
    """With events.allowed_types set, only those types are accepted."""
    overrides = {"events": {"allowed_types": ["notification", "order_shipped"]}}
    async with serve(overrides) as server:
        assert (await publish(server, "news:a"))["offset"] == 1
        assert (await publish(server, "news:a", "order_shipped", {"id": 1}))["offset"] == 2
        for kind, data in (
            ("chat_message", CHAT),
            ("status_update", STATUS),
            ("order_cancelled", {"id": 1}),
        ):
            status, answer = await api(server, "POST", "/api/publish", body("news:a", kind, data))
            assert_error(status, answer, 400, "invalid_request", kind)
        assert (await history(server, "news:a"))["offset"] == 2


# -- batch -------------------------------------------------------------------------------


async def test_batch_keeps_order() -> None:
    """A batch answers results in request order and publishes the events in that order."""
    events = [
        body("news:a", data={"message": "one", "level": "info"}),
        body("news:b", "chat_message", CHAT),
        body("news:a", data={"message": "two", "level": "info"}),
        {"channels": ["news:b", "news:c"], "type": "custom", "data": {"n": 3}},
    ]
    async with serve() as server:
        status, answer = await api(server, "POST", "/api/batch", {"events": events})
        assert status == 200, answer
        got = [(r["channel"], r["offset"]) for r in answer["results"]]
        assert got == [("news:a", 1), ("news:b", 1), ("news:a", 2), ("news:b", 2), ("news:c", 1)]
        page = await history(server, "news:a")
        assert [e["data"]["message"] for e in page["events"]] == ["one", "two"]
        assert [e["id"] for e in page["events"]] == [
            answer["results"][0]["id"],
            answer["results"][2]["id"],
        ]
        page = await history(server, "news:b")
        assert [e["type"] for e in page["events"]] == ["chat_message", "custom"]


@pytest.mark.parametrize(
    ("index", "bad"),
    [
        (0, {"channel": "news:a", "type": "notification", "data": {"message": "x"}}),
        (1, {"channel": "bad", "type": "notification", "data": NOTE}),
        (2, {"channel": "news:a", "type": "subscribed", "data": {}}),
        (2, "not an object"),
    ],
)
async def test_batch_validates_every_element(index: int, bad: Any) -> None:
    """An invalid element anywhere answers 400 naming its index and publishes nothing."""
    events: list[Any] = [body("news:a"), body("news:b"), body("news:c")]
    events[index] = bad
    async with serve() as server:
        status, answer = await api(server, "POST", "/api/batch", {"events": events})
        assert_error(status, answer, 400, "invalid_request", f"events[{index}]")
        for channel in ("news:a", "news:b", "news:c"):
            assert (await history(server, channel))["offset"] == 0


@pytest.mark.parametrize(
    "request_body",
    [
        {"events": []},
        {"events": "x"},
        {},
        {"events": [body("news:a")] * 3},
        [body("news:a")],
    ],
)
async def test_batch_rejects_bad_envelopes(request_body: Any) -> None:
    """An empty, missing or over-long events list answers 400 (api.max_batch is 2 here)."""
    async with serve({"api": {"max_batch": 2}}) as server:
        status, answer = await api(server, "POST", "/api/batch", request_body)
        assert_error(status, answer, 400, "invalid_request")
        assert (await history(server, "news:a"))["offset"] == 0


# -- idempotency -------------------------------------------------------------------------


async def test_idempotency_key_deduplicates_publish() -> None:
    """The same key twice answers the first offset and id without publishing again."""
    async with serve() as server, connect(server, token("u1", ("news:*",))) as client:
        await client.subscribe("news:a")
        first = await publish(server, "news:a", idempotency_key="k-1")
        second = await publish(server, "news:a", idempotency_key="k-1")
        assert (
            (second["offset"], second["id"]) == (first["offset"], first["id"]) == (1, first["id"])
        )
        # The repeat says it was deduplicated; the first answer has no such field.
        assert "duplicate" not in first
        assert second == {**first, "duplicate": True}
        page = await history(server, "news:a")
        assert page["offset"] == 1
        assert [e["id"] for e in page["events"]] == [first["id"]]
        third = await publish(server, "news:a", idempotency_key="k-2")
        assert third["offset"] == 2 and third["id"] != first["id"]
        plain = await publish(server, "news:a")
        assert plain["offset"] == 3
        # The subscriber saw each published event exactly once, in order.
        offsets = [(await client.recv())["offset"] for _ in range(3)]
        assert offsets == [1, 2, 3]
        assert (await history(server, "news:a"))["offset"] == 3


async def test_idempotency_key_is_per_channel_in_batch() -> None:
    """A key reused for another channel publishes there; repeated in a batch it dedupes."""
    async with serve() as server:
        a = await publish(server, "news:a", idempotency_key="same")
        b = await publish(server, "news:b", idempotency_key="same")
        assert (a["offset"], b["offset"]) == (1, 1)
        status, answer = await api(
            server,
            "POST",
            "/api/batch",
            {
                "events": [
                    body("news:a", idempotency_key="same"),
                    body("news:a", idempotency_key="new"),
                ]
            },
        )
        assert status == 200, answer
        assert answer["results"][0] == {**a, "duplicate": True}
        assert answer["results"][1]["offset"] == 2 and "duplicate" not in answer["results"][1]
        assert (await history(server, "news:a"))["offset"] == 2


# -- channels, history, presence ---------------------------------------------------------


async def test_channels_lists_subscribed_channels_with_counts() -> None:
    """GET /api/channels lists channels with subscribers and their counts, by prefix."""
    async with (
        serve() as server,
        connect(server, token("alice", ("news:*",))) as alice,
        connect(server, token("bob", ("news:*",))) as bob,
    ):
        await publish(server, "news:nobody")
        assert (await alice.subscribe("news:a"))["type"] == "subscribed"
        assert (await alice.subscribe("news:b", id="2"))["type"] == "subscribed"
        assert (await bob.subscribe("news:a"))["type"] == "subscribed"
        status, answer = await api(server, "GET", "/api/channels")
        assert status == 200, answer
        assert answer == {
            "channels": [
                {"channel": "news:a", "subscribers": 2},
                {"channel": "news:b", "subscribers": 1},
                {"channel": "user:alice", "subscribers": 1},
                {"channel": "user:bob", "subscribers": 1},
            ]
        }
        status, answer = await api(server, "GET", "/api/channels?prefix=news:")
        assert status == 200, answer
        assert [c["channel"] for c in answer["channels"]] == ["news:a", "news:b"]
        status, answer = await api(server, "GET", "/api/channels?prefix=user%3Aal")
        assert answer == {"channels": [{"channel": "user:alice", "subscribers": 1}]}
        status, answer = await api(server, "GET", "/api/channels?prefix=zzz")
        assert (status, answer) == (200, {"channels": []})
        await bob.send("unsubscribe", {"channel": "news:a"}, id="u")
        assert (await bob.recv())["type"] == "unsubscribed"
        status, answer = await api(server, "GET", "/api/channels?prefix=news:a")
        assert answer == {"channels": [{"channel": "news:a", "subscribers": 1}]}


async def test_history_since_and_limit() -> None:
    """History answers the oldest ``limit`` events after ``since``, in order, with position."""
    async with serve() as server, connect(server, token("u1", ("news:*",))) as client:
        ids = []
        for n in range(1, 6):
            result = await publish(server, "news:h", data={"message": f"m{n}", "level": "info"})
            ids.append(result["id"])
        reply = await client.subscribe("news:h")
        page = await history(server, "news:h", "?since=1&limit=2")
        assert page["channel"] == "news:h"
        assert page["offset"] == 5
        assert isinstance(page["epoch"], str) and page["epoch"]
        assert page["epoch"] == reply["data"]["epoch"]
        events = page["events"]
        assert [e["offset"] for e in events] == [2, 3]
        assert [e["id"] for e in events] == ids[1:3]
        assert [e["data"]["message"] for e in events] == ["m2", "m3"]
        assert all(e["channel"] == "news:h" and e["type"] == "notification" for e in events)
        everything = await history(server, "news:h")
        assert [e["offset"] for e in everything["events"]] == [1, 2, 3, 4, 5]
        assert [e["offset"] for e in (await history(server, "news:h", "?since=3"))["events"]] == [
            4,
            5,
        ]
        assert (await history(server, "news:h", "?since=5"))["events"] == []
        assert (await history(server, "news:h", "?limit=1"))["events"][0]["offset"] == 1
        empty = await history(server, "news:empty")
        assert (empty["offset"], empty["events"]) == (0, [])


async def test_history_keeps_the_newest_events() -> None:
    """With history.size 3, history after 0 starts at the oldest event still kept."""
    async with serve({"history": {"size": 3}}) as server:
        for _ in range(5):
            await publish(server, "news:h")
        page = await history(server, "news:h", "?since=0")
        assert page["offset"] == 5
        assert [e["offset"] for e in page["events"]] == [3, 4, 5]
        page = await history(server, "news:h", "?since=3&limit=1")
        assert [e["offset"] for e in page["events"]] == [4]


@pytest.mark.parametrize(
    "query",
    [
        "?since=abc",
        "?since=-1",
        "?since=1.5",
        "?limit=0",
        "?limit=abc",
        "?limit=100000",
    ],
)
async def test_history_rejects_bad_parameters(query: str) -> None:
    """A non-integer or out-of-range since/limit answers 400 invalid_request."""
    async with serve() as server:
        await publish(server, "news:h")
        status, answer = await api(server, "GET", f"/api/channels/news:h/history{query}")
        assert_error(status, answer, 400, "invalid_request")


@pytest.mark.parametrize(
    "path",
    [
        "/api/channels/news%3Ax/history",
        "/api/channels/news:x/history",
        "/api/channels/news%3ax/history",
    ],
)
async def test_history_channel_encoded_or_raw(path: str) -> None:
    """The channel in the path may be percent-encoded or given as is."""
    async with serve() as server:
        result = await publish(server, "news:x")
        status, _, answer = await call(server, "GET", path)
        assert status == 200, answer
        assert answer["channel"] == "news:x"
        assert [e["id"] for e in answer["events"]] == [result["id"]]


@pytest.mark.parametrize(
    "path",
    [
        "/api/channels/news%3Ax/presence",
        "/api/channels/news:x/presence",
    ],
)
async def test_presence_channel_encoded_or_raw(path: str) -> None:
    """Presence accepts the channel percent-encoded or raw."""
    async with serve() as server, connect(server, token("u1", ("news:*",))) as client:
        await client.subscribe("news:x")
        status, _, answer = await call(server, "GET", path)
        assert status == 200, answer
        assert answer == {"channel": "news:x", "users": [{"user_id": "u1", "connections": 1}]}


@pytest.mark.parametrize(
    "path",
    [
        "/api/channels/nocolon/history",
        "/api/channels/Bad%3Ax/presence",
        "/api/channels/news%3Awith%20space/history",
    ],
)
async def test_invalid_channel_in_path_is_rejected(path: str) -> None:
    """A malformed channel in the path answers 400 invalid_request."""
    async with serve() as server:
        status, _, answer = await call(server, "GET", path)
        assert_error(status, answer, 400, "invalid_request")


async def test_presence_counts_connections_per_user() -> None:
    """Presence lists each subscribed user with its number of connections."""
    async with (
        serve() as server,
        connect(server, token("alice", ("room:*",))) as a1,
        connect(server, token("alice", ("room:*",))) as a2,
        connect(server, token("bob", ("room:*",))) as b1,
        connect(server, token("carol", ("room:*",))),
    ):
        for client in (a1, a2, b1):
            assert (await client.subscribe("room:1"))["type"] == "subscribed"
        status, answer = await api(server, "GET", "/api/channels/room:1/presence")
        assert status == 200, answer
        assert answer == {
            "channel": "room:1",
            "users": [
                {"user_id": "alice", "connections": 2},
                {"user_id": "bob", "connections": 1},
            ],
        }
        status, answer = await api(server, "GET", "/api/channels/user%3Aalice/presence")
        assert answer["users"] == [{"user_id": "alice", "connections": 2}]
        status, answer = await api(server, "GET", "/api/channels/room:2/presence")
        assert (status, answer) == (200, {"channel": "room:2", "users": []})


# -- disconnect --------------------------------------------------------------------------


async def test_disconnect_closes_only_that_users_connections() -> None:
    """POST /api/disconnect closes every connection of the user with 4403, no others."""
    async with (
        serve() as server,
        connect(server, token("alice")) as a1,
        connect(server, token("alice")) as a2,
        connect(server, token("bob")) as bob,
    ):
        status, answer = await api(
            server, "POST", "/api/disconnect", {"user_id": "alice", "reason": "logged out"}
        )
        assert (status, answer) == (200, {"user_id": "alice"})
        for client in (a1, a2):
            messages, code = await ws_until_close(client.ws)
            assert (messages, code) == ([], 4403)
        await ws_assert_open(bob)
        status, answer = await api(server, "GET", "/api/channels/user:alice/presence")
        assert answer["users"] == []
        status, answer = await api(server, "GET", "/api/channels/user:bob/presence")
        assert answer["users"] == [{"user_id": "bob", "connections": 1}]


async def test_disconnect_of_unknown_user_is_ok() -> None:
    """Disconnecting a user with no connection succeeds and closes nobody."""
    async with serve() as server, connect(server, token("bob")) as bob:
        status, answer = await api(server, "POST", "/api/disconnect", {"user_id": "nobody"})
        assert (status, answer) == (200, {"user_id": "nobody"})
        await ws_assert_open(bob)


async def test_disconnect_completes_the_closing_handshake() -> None:
    """After the 4403 close frame the server waits for the client's closing reply."""
    async with serve() as server, ws_bare(server, token("alice"), autoclose=False) as ws:
        assert (await ws.receive(timeout=TIMEOUT)).json()["type"] == "connected"
        await api(server, "POST", "/api/disconnect", {"user_id": "alice"})
        frame = await ws.receive(timeout=TIMEOUT)
        assert (frame.type, frame.data) == (aiohttp.WSMsgType.CLOSE, 4403)
        # The client answers only now; the server must still be there to take the reply.
        await ws.close()
        assert ws.close_code == 4403


@pytest.mark.parametrize(
    "request_body",
    [
        {},
        {"user_id": ""},
        {"user_id": 5},
        {"user_id": "a", "reason": 3},
        ["alice"],
    ],
)
async def test_disconnect_rejects_bad_bodies(request_body: Any) -> None:
    """A disconnect without a usable user_id or with a non-string reason answers 400."""
    async with serve() as server:
        status, answer = await api(server, "POST", "/api/disconnect", request_body)
        assert_error(status, answer, 400, "invalid_request")


# -- authentication ----------------------------------------------------------------------

ENDPOINTS: Sequence[tuple[str, str, bytes | None]] = [
    ("POST", "/api/publish", json.dumps(body("news:a")).encode()),
    ("POST", "/api/batch", json.dumps({"events": [body("news:a")]}).encode()),
    ("POST", "/api/disconnect", b'{"user_id": "alice"}'),
    ("GET", "/api/channels", None),
    ("GET", "/api/channels/news:a/history", None),
    ("GET", "/api/channels/news:a/presence", None),
]


@pytest.mark.parametrize(("method", "path", "payload"), ENDPOINTS)
@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer wrong-key",
        f"Basic {API_KEY}",
        f"Token {API_KEY}",
        f"{API_KEY}",
        "Bearer",
        f"Bearer {API_KEY}x",
        f"Bearer {API_KEY[:-1]}",
    ],
)
async def test_api_requires_the_key(
    method: str, path: str, payload: bytes | None, authorization: str | None
) -> None:
    """No header, a wrong key or a wrong scheme answers 401 unauthorized, doing nothing."""
    headers = {"Authorization": authorization} if authorization is not None else {}
    async with serve() as server:
        status, content_type, answer = await call(
            server, method, path, body=payload, headers=headers, key=None
        )
        assert content_type == "application/json"
        assert_error(status, answer, 401, "unauthorized")
        assert (await history(server, "news:a"))["offset"] == 0


async def test_bearer_scheme_is_case_insensitive() -> None:
    """``bearer`` in lower case is the same scheme."""
    async with serve() as server:
        status, _, answer = await call(
            server, "GET", "/api/channels", headers={"Authorization": f"bearer {API_KEY}"}
        )
        assert status == 200, answer


async def test_any_configured_key_is_accepted() -> None:
    """Every key in api.keys authenticates."""
    async with serve({"api": {"keys": ["first-key-0123456789", API_KEY]}}) as server:
        assert (await api(server, "GET", "/api/channels", key="first-key-0123456789"))[0] == 200
        assert (await api(server, "GET", "/api/channels"))[0] == 200
        assert (await api(server, "GET", "/api/channels", key="other"))[0] == 401


async def test_api_disabled_without_keys() -> None:
    """With api.keys empty every API call answers 401 saying the API is disabled."""
    async with serve({"api": {"keys": []}}) as server:
        for method, path, payload in ENDPOINTS:
            status, _, answer = await call(server, method, path, body=payload)
            assert_error(status, answer, 401, "unauthorized", "disabled")
        status, _, answer = await call(server, "GET", "/healthz", key=None)
        assert status == 200


# -- HTTP errors -------------------------------------------------------------------------


async def test_unknown_path_is_json_404() -> None:
    """An unknown path answers 404 with the JSON error shape."""
    async with serve() as server:
        for path in ("/nope", "/api/nope", "/api/channels/news:a/nope"):
            status, content_type, answer = await call(server, "GET", path)
            assert content_type == "application/json"
            assert_error(status, answer, 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/publish"),
        ("PUT", "/api/batch"),
        ("DELETE", "/api/channels"),
        ("POST", "/api/channels/news:a/history"),
        ("POST", "/healthz"),
    ],
)
async def test_wrong_method_is_json_405(method: str, path: str) -> None:
    """A known path with the wrong method answers 405 with the JSON error shape."""
    async with serve() as server:
        status, content_type, answer = await call(server, method, path)
        assert content_type == "application/json"
        assert_error(status, answer, 405, "method_not_allowed")


async def test_body_over_limit_is_json_413() -> None:
    """A body over api.max_body_bytes answers 413 and publishes nothing."""
    async with serve({"api": {"max_body_bytes": 1024}}) as server:
        big = body("news:a", data={"message": "x" * 2000, "level": "info"})
        status, content_type, answer = await call(
            server, "POST", "/api/publish", body=json.dumps(big).encode()
        )
        assert content_type == "application/json"
        assert_error(status, answer, 413, "payload_too_large")
        small = body("news:a", data={"message": "x" * 100, "level": "info"})
        status, _, answer = await call(
            server, "POST", "/api/publish", body=json.dumps(small).encode()
        )
        assert status == 200, answer
        assert (await history(server, "news:a"))["offset"] == 1


@pytest.mark.parametrize("payload", [b"{not json", b"", b"\xff\xfe", b'{"channel": "news:a",'])
async def test_invalid_json_body_is_400(payload: bytes) -> None:
    """A body that is not JSON answers 400 invalid_request."""
    async with serve() as server:
        for path in ("/api/publish", "/api/batch", "/api/disconnect"):
            status, _, answer = await call(server, "POST", path, body=payload)
            assert_error(status, answer, 400, "invalid_request")


def deep_data(levels: int) -> bytes:
    """A publish body whose ``data`` brings the whole body to ``levels`` levels of
    nesting (the body itself is the first)."""
    inner = b"[" * (levels - 2) + b"]" * (levels - 2)
    return b'{"channel":"news:a","type":"deep_thing","data":{"x":' + inner + b"}}"


async def test_json_nested_past_the_limit_is_400_without_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 2 KB body nesting 1,000 levels (and one of 65) answers 400 invalid_request on
    publish, batch and disconnect, logs no traceback, and 64 levels still publish."""
    caplog.set_level(logging.DEBUG)
    deep = deep_data(1000)
    assert len(deep) < 2100
    batch = b'{"events":[' + deep_data(1000) + b"]}"
    async with serve() as server:
        for path, payload in (
            ("/api/publish", deep),
            ("/api/publish", deep_data(65)),
            ("/api/batch", batch),
            ("/api/disconnect", deep),
        ):
            status, _, answer = await call(server, "POST", path, body=payload)
            assert_error(status, answer, 400, "invalid_request", "deeper than 64 levels")
        status, _, answer = await call(server, "POST", "/api/publish", body=deep_data(64))
        assert status == 200, answer
        assert len((await history(server, "news:a"))["events"]) == 1
    failures = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not failures, [r.getMessage() for r in failures]
    assert "Traceback" not in caplog.text and "RecursionError" not in caplog.text


# -- probes and metrics ------------------------------------------------------------------


async def test_health_and_readiness() -> None:
    """/healthz and /readyz answer 200 without a key; /readyz answers 503 once draining."""
    async with serve() as server:
        status, _, answer = await call(server, "GET", "/healthz", key=None)
        assert status == 200, answer
        status, _, answer = await call(server, "GET", "/readyz", key=None)
        assert status == 200, answer
        server.gateway.begin_drain()
        status, _, answer = await call(server, "GET", "/readyz", key=None)
        assert status == 503, answer
        status, _, answer = await call(server, "GET", "/healthz", key=None)
        assert status == 200, answer


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_are_prometheus_text() -> None:
    """/metrics exposes connections, publishes, deliveries, errors, closes and latencies."""
    async with serve() as server:
        async with connect(server, token("u1", ("news:*",))) as client:
            await client.subscribe("news:a")
            await publish(server, "news:a")
            assert (await client.recv())["type"] == "notification"
            await client.send("no_such_command", id="bad")
            assert (await client.recv())["data"]["code"] == "invalid_request"
            async with connect(server, "not-a-token", welcome=False) as rejected:
                assert (await rejected.recv())["data"]["code"] == "unauthorized"
                assert await rejected.expect_close() == 4401
            status, content_type, text = await call(server, "GET", "/metrics", key=None)
        assert status == 200
        assert content_type == "text/plain"
        assert isinstance(text, str)
        samples = _samples(text)
        assert samples[("tidings_connections", ())] == 1
        assert samples[("tidings_events_published_total", (("type", "notification"),))] == 1
        assert samples[("tidings_events_delivered_total", (("type", "notification"),))] == 1
        assert samples[("tidings_errors_total", (("code", "invalid_request"),))] == 1
        assert samples[("tidings_errors_total", (("code", "unauthorized"),))] == 1
        assert samples[("tidings_closes_total", (("code", "4401"),))] == 1
        assert samples[("tidings_slow_consumer_closes_total", ())] == 0
        subscribe = (("command", "subscribe"),)
        assert samples[("tidings_command_seconds_count", subscribe)] == 1
        buckets = {
            labels: value
            for (name, labels), value in samples.items()
            if name == "tidings_command_seconds_bucket"
        }
        assert buckets[(("command", "subscribe"), ("le", "+Inf"))] == 1
        assert len([labels for labels in buckets if ("command", "subscribe") in labels]) > 5
        assert "# TYPE tidings_command_seconds histogram" in text
        status, _, text = await call(server, "GET", "/metrics", key=None)
        assert _samples(text)[("tidings_connections", ())] == 0


# -- broker failures ---------------------------------------------------------------------


class FlakyBroker:
    """A memory broker whose publish fails with BrokerUnavailable while ``down``."""

    def __init__(self) -> None:
        self.inner = MemoryBroker()
        self.down = True
        self.is_ready = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def publish(self, requests: Sequence[PublishRequest]) -> list[PublishResult]:
        if self.down:
            raise BrokerUnavailable("broker timed out")
        return await self.inner.publish(requests)

    async def ready(self) -> bool:
        return self.is_ready


async def test_broker_unavailable_is_json_503_and_retry_is_safe() -> None:
    """A publish the broker cannot complete answers 503; a retry with the key succeeds once."""
    broker = FlakyBroker()
    async with serve(broker=broker) as server:
        for path, payload in (
            ("/api/publish", body("news:a", idempotency_key="k")),
            ("/api/batch", {"events": [body("news:a")]}),
        ):
            status, answer = await api(server, "POST", path, payload)
            assert_error(status, answer, 503, "broker_unavailable")
        broker.down = False
        first = await publish(server, "news:a", idempotency_key="k")
        again = await publish(server, "news:a", idempotency_key="k")
        assert again == {**first, "duplicate": True}
        assert first["offset"] == 1
        assert (await history(server, "news:a"))["offset"] == 1


async def test_readiness_fails_when_broker_is_not_ready() -> None:
    """/readyz answers 503 while the broker reports it is unreachable."""
    broker = FlakyBroker()
    async with serve(broker=broker) as server:
        assert (await call(server, "GET", "/readyz", key=None))[0] == 200
        broker.is_ready = False
        status, _, answer = await call(server, "GET", "/readyz", key=None)
        assert status == 503, answer
        broker.is_ready = True
        assert (await call(server, "GET", "/readyz", key=None))[0] == 200


async def test_readiness_fails_while_a_critical_loop_is_down() -> None:
    """/readyz answers 503 while a critical background loop has failed and waits for
    its restart, and 200 again once it runs."""
    async with serve() as server:
        supervisor = server.gateway.supervisor
        release = asyncio.Event()
        running = asyncio.Event()
        waiting = asyncio.Event()

        async def held_restart(delay: float) -> None:
            waiting.set()
            await release.wait()

        supervisor._sleep = held_restart
        runs = 0

        async def loop() -> None:
            nonlocal runs
            runs += 1
            if runs == 1:
                raise RuntimeError("a bug in a background loop")
            running.set()
            await asyncio.Event().wait()

        supervisor.spawn("probe", loop, critical=True)
        await asyncio.wait_for(waiting.wait(), TIMEOUT)
        status, _, answer = await call(server, "GET", "/readyz", key=None)
        assert status == 503 and answer == {"status": "background loop down"}, answer
        release.set()
        await asyncio.wait_for(running.wait(), TIMEOUT)
        assert (await call(server, "GET", "/readyz", key=None))[0] == 200
