"""The Redis broker (one primary, Sentinel or Redis Cluster); see ``broker``.

This package is the only part of Tidings that imports ``redis``. Its ``urls`` and
``scripts`` modules are pure: importing them (configuration checks the broker URL)
does not import ``redis``, so the names below are loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tidings.brokers.redis.broker import RedisBroker
    from tidings.brokers.redis.urls import redact_url

__all__ = ["RedisBroker", "redact_url"]


def __getattr__(name: str) -> Any:
    if name == "RedisBroker":
        from tidings.brokers.redis.broker import RedisBroker

        return RedisBroker
    if name == "redact_url":
        from tidings.brokers.redis.urls import redact_url

        return redact_url
    raise AttributeError(name)
