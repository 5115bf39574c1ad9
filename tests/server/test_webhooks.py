"""Presence webhooks: signing, payloads, retries and the bounded queue, to a real receiver."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import pytest

from helpers import TIMEOUT, connect, serve, token
from tidings.brokers.presence_table import PresenceChange
from tidings.config import WebhooksSettings, load_settings
from tidings.errors import ConfigError
from tidings.webhooks import WebhookSender, events_of, sign, verify
from webhook_receiver import SECRET, receiver


def _change(kind: str = "join", occupancy: str | None = "occupied", seq: int = 1) -> PresenceChange:
    return PresenceChange("room:a", "alice", kind, "g", seq, occupancy)  # type: ignore[arg-type]


def test_signature_covers_timestamp_and_body() -> None:
    """A signature verifies for its timestamp and body only."""
    signature = sign(SECRET, 1700000000, b'{"a":1}')
    assert verify(SECRET, "1700000000", b'{"a":1}', signature)
    assert not verify(SECRET, "1700000001", b'{"a":1}', signature)
    assert not verify(SECRET, "1700000000", b'{"a":2}', signature)
    assert not verify("other", "1700000000", b'{"a":1}', signature)
    assert not verify(SECRET, "soon", b'{"a":1}', signature)


def test_events_of_a_transition_in_order_and_filtered() -> None:
    """Occupied precedes the join, vacated follows the leave; unwanted events are left out."""
    every = frozenset({"channel_occupied", "channel_vacated", "user_joined", "user_left"})
    assert [e.name for e in events_of(_change(), every, 0)] == ["channel_occupied", "user_joined"]
    left = events_of(_change("leave", "vacated", 2), every, 0)
    assert [e.name for e in left] == ["user_left", "channel_vacated"]
    assert json.loads(left[1].body)["data"] == {"channel": "room:a"}
    assert [e.name for e in events_of(_change(), frozenset({"user_joined"}), 0)] == ["user_joined"]


async def test_server_posts_signed_events_and_retries_a_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Joins and leaves reach the receiver signed; a 500 is retried with the same key;
    the secret is never logged."""
    caplog.set_level(logging.DEBUG)
    async with (
        receiver(500) as hooks,
        serve(
            {
                "namespaces": {
                    "room": {"rule": "public", "presence_events": True, "presence_ttl": 0.2}
                },
                "webhooks": {"url": hooks.url, "secret": SECRET, "retry_delay": 0.01},
            }
        ) as server,
    ):
        async with connect(server, token("alice")) as alice:
            await alice.subscribe("room:a")
            headers, occupied = await hooks.next()
            assert occupied["event"] == "channel_occupied"
            assert occupied["data"] == {"channel": "room:a"}
            first, _ = hooks.requests[0]
            assert first["Tidings-Idempotency-Key"] == headers["Tidings-Idempotency-Key"]
            assert occupied["id"] == headers["Tidings-Idempotency-Key"]
            _, joined = await hooks.next()
            assert (joined["event"], joined["data"]) == (
                "user_joined",
                {"channel": "room:a", "user_id": "alice"},
            )
        _, left = await hooks.next()
        _, vacated = await hooks.next()
        assert (left["event"], vacated["event"]) == ("user_left", "channel_vacated")
        assert len({occupied["id"], joined["id"], left["id"], vacated["id"]}) == 4
        assert len(hooks.requests) == 5
    assert SECRET not in caplog.text


def test_webhooks_config_is_strict() -> None:
    """A URL needs a secret; unknown keys, event names and badly typed presence keys
    are refused; the secret is not in the settings' repr."""
    base = {"server": {"mode": "development"}}
    for bad, key in (
        ({"url": "http://h/x"}, "webhooks.secret"),
        ({"url": "ftp://h/x", "secret": "s"}, "webhooks.url"),
        ({"events": ["user_waved"]}, "webhooks.events"),
        ({"retries": 3}, "webhooks.retries"),
    ):
        with pytest.raises(ConfigError) as info:
            load_settings(None, {**base, "webhooks": bad}, environ={})
        assert key in str(info.value)
    for namespace, key in (
        ({"presence_events": "yes"}, "presence_events"),
        ({"presence_ttl": 0}, "presence_ttl"),
        ({"presence": True}, "presence"),
    ):
        with pytest.raises(ConfigError) as info:
            load_settings(None, {**base, "namespaces": {"room": namespace}}, environ={})
        assert f"namespaces.room.{key}" in str(info.value)
    assert SECRET not in repr(WebhooksSettings(url="http://h/x", secret=SECRET))


async def test_client_errors_are_not_retried_and_drops_are_counted() -> None:
    """A 400 drops the event at once; a full queue drops new events; both are counted."""
    drops: list[str] = []
    async with receiver(400) as hooks:
        sender = WebhookSender(
            WebhooksSettings(url=hooks.url, secret=SECRET, queue_size=2, retry_delay=0.01),
            on_drop=drops.append,
        )
        sender.submit(_change())  # occupied + joined fill the queue
        sender.submit(_change("leave", "vacated", 2))  # both dropped
        assert drops == ["queue_full", "queue_full"] and sender.queued == 2
        task = asyncio.create_task(sender.run())
        try:
            _, joined = await hooks.next()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await sender.close()
        assert joined["event"] == "user_joined"
        assert len(hooks.requests) == 2 and drops[-1] == "rejected"


async def test_retries_stop_after_max_attempts() -> None:
    """An endpoint that keeps failing gets max_attempts tries, then the event is dropped."""
    drops: list[str] = []
    dropped = asyncio.Event()

    def on_drop(reason: str) -> None:
        drops.append(reason)
        dropped.set()

    async with receiver(503, 503, 503) as hooks:
        sender = WebhookSender(
            WebhooksSettings(
                url=hooks.url,
                secret=SECRET,
                max_attempts=3,
                retry_delay=0.01,
                events=("user_joined",),
            ),
            on_drop=on_drop,
        )
        sender.submit(_change())
        task = asyncio.create_task(sender.run())
        try:
            async with asyncio.timeout(TIMEOUT):
                await dropped.wait()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await sender.close()
        assert drops == ["attempts"] and len(hooks.requests) == 3
        keys = {headers["Tidings-Idempotency-Key"] for headers, _ in hooks.requests}
        assert len(keys) == 1
