"""Driving a reader too slow for the server: the send-buffer cap and an overflow."""

from __future__ import annotations

import ssl
from collections.abc import Mapping

from helpers import api
from tidings.server import RunningServer
from tls_support import https_api

__all__ = ["BATCH", "CAP", "ONE_WRITE", "SLOW", "metric", "overflow", "slow_closes"]

#: The send buffer of SLOW, in bytes.
CAP = 16384
SLOW = {"limits": {"send_buffer_bytes": CAP}}


def metric(server: RunningServer, name: str, labels: Mapping[str, str] | None = None) -> float:
    """The value of one of the server's metric samples (0 when absent)."""
    value = server.gateway.metrics.registry.get_sample_value(name, dict(labels or {}))
    return value or 0.0


def slow_closes(server: RunningServer) -> float:
    """How many connections the server has closed as too slow."""
    return metric(server, "tidings_slow_consumer_closes_total")


#: Events per publish in ``overflow``, and an upper bound on the bytes of one server
#: write of them (the hub joins a tick's frames into one write): 1 KB of data plus the
#: envelope per event.
BATCH = 8
ONE_WRITE = BATCH * 1200


async def overflow(
    server: RunningServer, channel: str, context: ssl.SSLContext | None = None
) -> int:
    """Publish 1 KB events to ``channel`` until a subscriber is closed as too slow;
    return how many were published (over https with ``context``)."""
    event = {"channel": channel, "type": "blob", "data": {"blob": "x" * 1000}}
    body = {"events": [event] * BATCH}
    published = 0
    for _ in range(4000):
        if context is None:
            status, answer = await api(server, "POST", "/api/batch", body)
        else:
            status, answer = await https_api(server, context, "POST", "/api/batch", body)
        assert status == 200, answer
        published += BATCH
        if slow_closes(server) >= 1:
            return published
    raise AssertionError("the reader was never closed as too slow")
