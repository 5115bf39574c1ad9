"""Brokers: the ``Broker`` protocol and its implementations."""

from __future__ import annotations

from tidings.brokers.base import (
    Broker,
    BrokerHandler,
    HistoryPage,
    PublishRequest,
    PublishResult,
    StoredEvent,
    StreamPosition,
)

__all__ = [
    "Broker",
    "BrokerHandler",
    "HistoryPage",
    "PublishRequest",
    "PublishResult",
    "StoredEvent",
    "StreamPosition",
]
