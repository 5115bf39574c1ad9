"""Presence webhooks: payloads, signatures and the sender.

Each presence transition this node observed (``BrokerHandler.on_presence_change``:
exactly one node in the cluster gets each) becomes up to two webhook events:
``user_joined``/``user_left``, and ``channel_occupied``/``channel_vacated`` when the
transition emptied or first filled the channel. Each is POSTed as JSON to
``webhooks.url`` with

* ``Tidings-Idempotency-Key``: the same for every attempt, deterministic per transition
  and event (``presence_table.idempotency_key``), also in the body as ``id``;
* ``Tidings-Timestamp`` (Unix seconds) and ``Tidings-Signature``:
  ``v1=<hex HMAC-SHA256 of "<timestamp>.<body>" under webhooks.secret>``.

Delivery: one queue of at most ``queue_size`` events (a full queue drops the new event
and counts it in ``tidings_webhooks_dropped_total{reason="queue_full"}``); 5xx, 429,
timeouts and connection errors are retried with exponential backoff up to
``max_attempts`` (then dropped, ``reason="attempts"``); other 4xx are dropped at once
(``reason="rejected"``). Events are sent one at a time, in order. Nothing is persisted:
a node that stops loses its queue (documented).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from tidings.brokers.presence_table import PresenceChange, idempotency_key
from tidings.config import WebhooksSettings

__all__ = ["Post", "WebhookEvent", "WebhookSender", "events_of", "sign", "verify"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """One event to POST: its name, idempotency key and JSON body (bytes)."""

    name: str
    key: str
    body: bytes


def events_of(change: PresenceChange, wanted: frozenset[str], wall: float) -> list[WebhookEvent]:
    """The webhook events of one transition, among ``wanted``, in sending order (a
    channel is occupied before its first user joined, vacated after its last left)."""
    names = ["user_joined" if change.kind == "join" else "user_left"]
    if change.occupancy == "occupied":
        names.insert(0, "channel_occupied")
    elif change.occupancy == "vacated":
        names.append("channel_vacated")
    out = []
    for name in names:
        if name not in wanted:
            continue
        key = idempotency_key(change, name)
        data: dict[str, Any] = {"channel": change.channel}
        if name.startswith("user_"):
            data["user_id"] = change.user_id
        body = json.dumps(
            {"id": key, "event": name, "time": round(wall, 3), "data": data}, separators=(",", ":")
        ).encode()
        out.append(WebhookEvent(name, key, body))
    return out


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``Tidings-Signature`` header value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    """Whether ``signature`` is ``sign(secret, timestamp, body)`` (constant time)."""
    try:
        expected = sign(secret, int(timestamp), body)
    except ValueError:
        return False
    return hmac.compare_digest(expected, signature)


class Post(Protocol):
    """Sends one POST; returns the status; raises ``aiohttp.ClientError`` or
    ``TimeoutError`` when no answer came."""

    def __call__(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> Awaitable[int]: ...


class WebhookSender:
    """The bounded queue and its sender loop (``run``, supervised by the gateway).

    ``on_drop(reason)`` counts a dropped event; ``sleep`` and ``wall_clock`` are
    injectable (tests use short delays).
    """

    def __init__(
        self,
        settings: WebhooksSettings,
        *,
        on_drop: Callable[[str], None],
        post: Post | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._wanted = frozenset(settings.events)
        self._on_drop = on_drop
        self._post = post or self._aiohttp_post
        self._sleep = sleep
        self._wall_clock = wall_clock
        self._queue: deque[WebhookEvent] = deque()
        self._ready = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None

    def submit(self, change: PresenceChange) -> None:
        """Queue the events of ``change`` without blocking (a full queue drops)."""
        for event in events_of(change, self._wanted, self._wall_clock()):
            if len(self._queue) >= self._settings.queue_size:
                self._on_drop("queue_full")
                continue
            self._queue.append(event)
            self._ready.set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def run(self) -> None:
        """Send queued events forever, one at a time, retrying as the docstring says."""
        while True:
            await self._ready.wait()
            while self._queue:
                await self._deliver(self._queue[0])
                self._queue.popleft()
            self._ready.clear()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _deliver(self, event: WebhookEvent) -> None:
        settings = self._settings
        for attempt in range(1, settings.max_attempts + 1):
            timestamp = int(self._wall_clock())
            headers = {
                "Content-Type": "application/json",
                "Tidings-Event": event.name,
                "Tidings-Idempotency-Key": event.key,
                "Tidings-Timestamp": str(timestamp),
                "Tidings-Signature": sign(settings.secret, timestamp, event.body),
            }
            try:
                status = await self._post(settings.url, event.body, headers, settings.timeout)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                reason = type(exc).__name__
            else:
                if 200 <= status < 300:
                    return
                if 400 <= status < 500 and status != 429:
                    logger.warning(
                        "presence webhook %s rejected with %d; not retried", event.name, status
                    )
                    self._on_drop("rejected")
                    return
                reason = f"status {status}"
            if attempt == settings.max_attempts:
                break
            delay = min(settings.max_retry_delay, settings.retry_delay * 2 ** (attempt - 1))
            logger.info(
                "presence webhook %s failed (%s); retry %d in %gs",
                event.name,
                reason,
                attempt,
                delay,
            )
            await self._sleep(delay)
        logger.warning(
            "presence webhook %s dropped after %d attempts", event.name, settings.max_attempts
        )
        self._on_drop("attempts")

    async def _aiohttp_post(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        timeout: float,  # noqa: ASYNC109 (the Post protocol)
    ) -> int:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        async with (
            asyncio.timeout(timeout),
            self._session.post(url, data=body, headers=dict(headers)) as response,
        ):
            return response.status
