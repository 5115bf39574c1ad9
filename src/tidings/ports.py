"""What the edges need from a node, as narrow Protocols instead of the concrete Gateway.

``ConnectionHost`` is the transports' view (transport/websocket.py, transport/sse.py,
transport/sse_commands.py), ``HealthHost`` the HTTP layer's (api/http.py), ``Peer`` a
connection as the node sees it. ``tidings.gateway.Gateway`` satisfies both hosts; a
transport or route can be tested against a fake that has only these members.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

from tidings.auth import Identity
from tidings.config import Settings
from tidings.hub import Outbound
from tidings.metrics import Metrics
from tidings.outages import OutageLog
from tidings.protocol import CloseCode
from tidings.session import Effect, Session

__all__ = ["ConnectionHost", "HealthHost", "Peer", "new_connection_id"]


def new_connection_id() -> str:
    """A connection id: ``c_`` and 96 random bits from the OS (24 hex digits).

    Unguessable, so that one user cannot name another's connection (ids show up in
    support requests and logs), and unique across nodes and restarts without a node tag:
    nothing routes by an id's content. ``os.urandom`` directly, as ``secrets.token_hex``
    only adds call overhead to every handshake.
    """
    return "c_" + os.urandom(12).hex()


class Peer(Outbound, Protocol):
    """A connection as the node sees it: the hub's view plus session and close."""

    @property
    def session(self) -> Session: ...

    def close(self, code: CloseCode, reason: str) -> None:
        """Start closing with ``code``; idempotent, never blocks."""

    def send_ping(self) -> None:
        """Send a WebSocket ping frame."""


class HealthHost(Protocol):
    """What the health, readiness and metrics routes read."""

    @property
    def draining(self) -> bool:
        """True once shutdown began: readiness fails."""

    @property
    def healthy(self) -> bool:
        """False while a critical background loop is down (readiness fails)."""

    @property
    def metrics(self) -> Metrics: ...

    @property
    def outages(self) -> OutageLog:
        """Where expected outages are logged: one rate-limited line per kind."""

    async def check_broker(self) -> bool:
        """Whether the broker answers now."""


class ConnectionHost(HealthHost, Protocol):
    """What a transport needs to run connections on a node."""

    @property
    def settings(self) -> Settings: ...

    @property
    def clock(self) -> Callable[[], float]:
        """Monotonic seconds, as sessions count them."""

    @property
    def wall_clock(self) -> Callable[[], float]:
        """Epoch seconds, the ``timestamp`` of the messages sent."""

    async def authenticate(self, token: str | None) -> Identity:
        """Verify a token; raises ``Unauthorized``."""

    def verify_now(self, token: str | None) -> Identity | None:
        """Verify a token without waiting: None when its key must be fetched first."""

    def new_session(self, identity: Identity, conn_id: str | None = None) -> Session:
        """A session for ``identity``."""

    async def connect(self, peer: Peer) -> None:
        """Register ``peer`` and send ``connected``; raises ``TooManyConnections`` or
        ``PersonalChannelUnavailable`` (then nothing stays registered)."""

    def disconnect(self, peer: Peer) -> None:
        """Forget a connection that has closed."""

    async def handle(self, peer: Peer, effects: list[Effect]) -> None:
        """Carry out a session's effects."""

    def peer(self, conn_id: str) -> Peer | None:
        """The local connection with this id, if any."""
