"""The server API's operations, independent of HTTP: validate, then call the broker."""

from __future__ import annotations

import difflib
import functools
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import msgspec

from tidings.brokers.base import Broker, PublishRequest
from tidings.config import Settings
from tidings.errors import InvalidRequest
from tidings.events import validate_event
from tidings.metrics import Metrics
from tidings.protocol.names import parse_channel
from tidings.telemetry import Publish, Telemetry

__all__ = ["ApiService"]

MAX_HISTORY_LIMIT = 1000
MAX_IDEMPOTENCY_KEY = 256
MAX_CHANNELS_PER_PUBLISH = 100

#: The fields of a publish body, and of a batch body. Any other is refused (400) rather
#: than ignored: a misspelt ``idempotency_key`` would otherwise publish without dedup.
PUBLISH_FIELDS = frozenset({"channel", "channels", "type", "data", "idempotency_key"})
BATCH_FIELDS = frozenset({"events"})


def _check_fields(body: Mapping[str, Any], known: Collection[str], where: str = "") -> None:
    """Raise ``InvalidRequest`` naming the first field of ``body`` not in ``known``."""
    for name in body:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise InvalidRequest(
                f"{where}unknown field {str(name)[:64]!r}{hint}; expected "
                f"{', '.join(sorted(known))}"
            )


class ApiService:
    """Publish, history, channels, presence and disconnect.

    Raises ``PeerError`` subclasses for bad input and ``BrokerUnavailable`` when the
    broker cannot complete an operation; a publish that raised may be retried with the
    same idempotency key.
    """

    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        metrics: Metrics,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._settings = settings
        self._broker = broker
        self._metrics = metrics
        # Bound once: with tracing off a publish calls the broker directly.
        self._publish_events: Publish = broker.publish
        if telemetry is not None and telemetry.enabled:
            self._publish_events = functools.partial(telemetry.publish, broker.publish)

    def _requests(self, body: Any, where: str = "") -> list[PublishRequest]:
        if not isinstance(body, dict):
            raise InvalidRequest(f"{where}body must be a JSON object")
        if not body.keys() <= PUBLISH_FIELDS:
            _check_fields(body, PUBLISH_FIELDS, where)
        has_one, has_many = "channel" in body, "channels" in body
        if has_one == has_many:
            raise InvalidRequest(f"{where}give exactly one of 'channel' or 'channels'")
        channels = [body["channel"]] if has_one else body["channels"]
        if not isinstance(channels, list) or not channels:
            raise InvalidRequest(f"{where}'channels' must be a non-empty list")
        if len(channels) > MAX_CHANNELS_PER_PUBLISH:
            raise InvalidRequest(f"{where}at most {MAX_CHANNELS_PER_PUBLISH} channels per event")
        for channel in channels:
            try:
                parse_channel(channel)
            except InvalidRequest as exc:
                raise InvalidRequest(f"{where}{exc.message}", channel=exc.channel) from None
        try:
            kind, data = validate_event(
                body.get("type"), body.get("data", {}), self._settings.events.allowed_types
            )
        except InvalidRequest as exc:
            raise InvalidRequest(f"{where}{exc.message}") from None
        key = body.get("idempotency_key")
        if key is not None and not (isinstance(key, str) and 0 < len(key) <= MAX_IDEMPOTENCY_KEY):
            raise InvalidRequest(
                f"{where}idempotency_key must be a string of 1-{MAX_IDEMPOTENCY_KEY} characters"
            )
        unique = list(dict.fromkeys(channels))
        return [PublishRequest(channel, kind, data, key) for channel in unique]

    async def _publish(self, requests: Sequence[PublishRequest], started: float) -> dict[str, Any]:
        results = await self._publish_events(requests)
        # tidings_publish_seconds: from the request (``started``) to the acknowledgement.
        self._metrics.publish_acknowledged(time.perf_counter() - started)
        for request in requests:
            self._metrics.published(request.type)
        # "duplicate" only where true: a fresh publish answers exactly as it always has.
        return {
            "results": [
                {"channel": r.channel, "offset": r.offset, "id": r.id, "duplicate": True}
                if r.duplicate
                else {"channel": r.channel, "offset": r.offset, "id": r.id}
                for r in results
            ]
        }

    async def publish(self, body: Any) -> dict[str, Any]:
        started = time.perf_counter()
        return await self._publish(self._requests(body), started)

    async def batch(self, body: Any) -> dict[str, Any]:
        started = time.perf_counter()
        if not isinstance(body, dict) or not isinstance(body.get("events"), list):
            raise InvalidRequest("body must be an object with an 'events' list")
        if len(body) > 1:
            _check_fields(body, BATCH_FIELDS)
        events = body["events"]
        if not events:
            raise InvalidRequest("'events' must not be empty")
        if len(events) > self._settings.api.max_batch:
            raise InvalidRequest(f"at most {self._settings.api.max_batch} events per batch")
        requests: list[PublishRequest] = []
        for index, event in enumerate(events):
            requests.extend(self._requests(event, f"events[{index}]: "))
        return await self._publish(requests, started)

    async def channels(self, prefix: str) -> dict[str, Any]:
        found = await self._broker.channels(prefix)
        return {
            "channels": [
                {"channel": name, "subscribers": count} for name, count in sorted(found.items())
            ]
        }

    async def history(self, channel: str, since: str | None, limit: str | None) -> dict[str, Any]:
        parse_channel(channel)
        after = _int_param("since", since, 0, 0)
        count = _int_param("limit", limit, self._settings.history.size or 1, 1, MAX_HISTORY_LIMIT)
        page = await self._broker.history(channel, after, count)
        return {
            "channel": channel,
            "epoch": page.position.epoch,
            "offset": page.position.offset,
            # Stored events are already encoded: embed them without re-encoding.
            "events": [msgspec.Raw(event.payload) for event in page.events],
        }

    async def presence(self, channel: str) -> dict[str, Any]:
        parse_channel(channel)
        users = await self._broker.presence(channel)
        return {
            "channel": channel,
            "users": [
                {"user_id": user, "connections": count} for user, count in sorted(users.items())
            ],
        }

    async def disconnect(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise InvalidRequest("body must be a JSON object")
        user_id, reason = body.get("user_id"), body.get("reason", "")
        if not isinstance(user_id, str) or not user_id:
            raise InvalidRequest("user_id must be a non-empty string")
        if not isinstance(reason, str):
            raise InvalidRequest("reason must be a string")
        await self._broker.disconnect_user(user_id, reason[:100])
        return {"user_id": user_id}


def _int_param(name: str, raw: str | None, default: int, low: int, high: int | None = None) -> int:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer") from None
    if value < low or (high is not None and value > high):
        bound = f" and at most {high}" if high is not None else ""
        raise InvalidRequest(f"{name} must be at least {low}{bound}")
    return value
