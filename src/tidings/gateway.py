"""The composition root of a node: wires auth, policy, hub and broker, and coordinates.

The gateway hands the broker its handler (``delivery``: events in, continuity and
disconnect signals), checks the broker's ``health``, registers connections (``personal``
subscribes their personal channel), hands session effects to ``commands``
(``subscriptions`` sets subscriptions up, recovers and revokes them; the hub owns who
holds what), runs the heartbeat ``sweep``, and drains on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from tidings.auth import Authenticator, Identity
from tidings.brokers.base import Broker
from tidings.channels import ChannelPolicy
from tidings.commands import Commands, Sender
from tidings.config import Settings
from tidings.delivery import Delivery
from tidings.errors import TooManyConnections
from tidings.event_types import frame_counter
from tidings.health import BrokerHealth
from tidings.hub import Hub
from tidings.metrics import Metrics
from tidings.nodesubs import NodeSubscriptions
from tidings.outages import OutageLog
from tidings.personal import PersonalChannels
from tidings.ports import Peer, new_connection_id
from tidings.presence_events import PresenceEvents
from tidings.protocol import CloseCode
from tidings.session import Effect, Session
from tidings.subscriptions import Subscriptions
from tidings.supervisor import Supervisor
from tidings.sweep import Sweeper, sweep_period
from tidings.telemetry import Telemetry
from tidings.webhooks import WebhookSender

__all__ = ["Gateway"]

logger = logging.getLogger(__name__)


class Gateway:
    """One node's coordinator; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        *,
        broker: Broker,
        authenticator: Authenticator,
        policy: ChannelPolicy,
        metrics: Metrics | None = None,
        telemetry: Telemetry | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.telemetry = telemetry or Telemetry()
        self.broker = broker
        self.authenticator = authenticator
        self.policy = policy
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.wall_clock = wall_clock
        self.hub: Hub[Peer] = Hub(
            on_pending_overflow=self._pending_overflow,
            on_written=frame_counter(self.metrics),
            on_fanned_out=self.metrics.fanned_out,
        )
        self.draining = False
        self.outages = OutageLog(logger)
        self.node_subscriptions = NodeSubscriptions(
            broker, self.hub.has_channel, outages=self.outages
        )
        self.presence_events = PresenceEvents(broker, settings.namespaces, outages=self.outages)
        #: Told of each presence transition this node observed (``[webhooks]``).
        self.webhooks: WebhookSender | None = None
        if settings.webhooks.url:
            dropped = self.metrics.webhooks_dropped
            self.webhooks = WebhookSender(
                settings.webhooks, on_drop=lambda reason: dropped.labels(reason).inc()
            )
        #: The background loops (sweep: critical; health checks); ``healthy`` is part
        #: of readiness.
        self.supervisor = Supervisor()
        self._idle = asyncio.Event()
        self._idle.set()
        # Read at scrape time, from the hub (which owns both counts): a Gauge.inc per
        # handshake costs more than the handshake's own bookkeeping of the same numbers.
        # Called after either count changes; does nothing unless the metrics are shared
        # between workers.
        self._counts_changed = self.metrics.bind_counts(
            self.hub.connection_count, self.hub.subscription_count
        )
        self.sender = Sender(self.metrics, wall_clock)
        self.subscriptions = Subscriptions(
            self.hub,
            broker,
            policy,
            self.node_subscriptions,
            self.presence_events,
            self.metrics,
            history_size=settings.history.size,
            apply=self.sender.apply,
            counts_changed=self._counts_changed,
        )
        self.personal = PersonalChannels(
            self.hub,
            broker,
            self.node_subscriptions,
            self._warn,
            enabled=settings.auth.personal_channel,
            hold=settings.auth.personal_channel_hold,
            release_held=self.subscriptions.release_held,
        )
        self.commands = Commands(
            self.sender,
            self.subscriptions,
            self.personal,
            authenticator,
            self.metrics,
            self._warn,
            clock,
            wall_clock,
        )
        self.sweeper = Sweeper(self.hub, self.sender.apply, clock)
        #: The broker's handler on this node.
        self.delivery = Delivery(self.hub, self.subscriptions, self.telemetry, self.webhooks)
        self.health = BrokerHealth(broker, self.metrics, settings.broker.timeout)
        # Settings read on every handshake, looked up once.
        server, auth = settings.server, settings.auth
        self._session_settings = (
            settings.limits,
            server.heartbeat_interval,
            server.heartbeat_timeout,
            auth.leeway,
        )
        self._max_connections_per_user = settings.limits.max_connections_per_user

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        await self.broker.start(self.delivery)
        server = self.settings.server
        period = sweep_period(server.heartbeat_interval, server.heartbeat_timeout)
        self.supervisor.spawn("gateway-sweep", lambda: self.sweeper.run(period), critical=True)
        await self.check_broker()
        self.supervisor.spawn("gateway-health", self.health.run)
        self.supervisor.spawn("presence-events", self.presence_events.run)
        if self.webhooks is not None:
            self.supervisor.spawn("presence-webhooks", self.webhooks.run)

    def _warn(self, what: str, detail: str) -> None:
        """An expected outage, rate-limited (``self.outages`` may be replaced)."""
        self.outages.warn(what, detail)

    @property
    def healthy(self) -> bool:
        """False while a critical background loop (the sweep) is down."""
        return self.supervisor.healthy

    def peer(self, conn_id: str) -> Peer | None:
        """The local connection with this id, if any."""
        return self.hub.peer(conn_id)

    async def check_broker(self) -> bool:
        """Whether the broker answers now (``BrokerHealth.check``)."""
        return await self.health.check()

    def begin_drain(self, reason: str = "server shutting down") -> None:
        """Fail readiness and close every connection with 1001."""
        self.draining = True
        self.close_all(reason)

    def close_all(self, reason: str = "server shutting down") -> None:
        """Close every connection with 1001 (readiness must already fail)."""
        for peer in self.hub.connections():
            peer.close(CloseCode.GOING_AWAY, reason)

    async def wait_idle(self, limit: float) -> bool:
        """Wait until no connection is left; False when ``limit`` seconds ran out first."""
        try:
            async with asyncio.timeout(limit):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        self.personal.close()
        # Logs whatever a loop raised; the broker, authenticator and policy still close.
        await self.supervisor.close()
        if self.webhooks is not None:
            await self.webhooks.close()
        await self.node_subscriptions.settle()
        await self.broker.close()
        await self.authenticator.close()
        await self.policy.close()

    # -- connections -----------------------------------------------------------------

    async def authenticate(self, token: str | None) -> Identity:
        """Verify a token; raises ``Unauthorized``."""
        return await self.authenticator.authenticate(token)

    def verify_now(self, token: str | None) -> Identity | None:
        """Verify a token without waiting: None when its key must be fetched first (then
        use ``authenticate``); raises ``Unauthorized``."""
        return self.authenticator.verify_now(token)

    def new_session(self, identity: Identity, conn_id: str | None = None) -> Session:
        """A session for ``identity``; ``conn_id`` defaults to ``new_connection_id()``."""
        limits, interval, timeout, leeway = self._session_settings
        return Session(
            identity,
            conn_id=conn_id or new_connection_id(),
            limits=limits,
            heartbeat_interval=interval,
            heartbeat_timeout=timeout,
            leeway=leeway,
            now=self.clock(),
            wall=self.wall_clock(),
        )

    async def connect(self, peer: Peer) -> None:
        """Register ``peer``, subscribe its personal channel and send ``connected``.

        Raises ``TooManyConnections`` when the user is at the limit and
        ``PersonalChannelUnavailable`` when the broker cannot subscribe the personal
        channel; either way nothing stays registered.
        """
        limit = self._max_connections_per_user
        if self.hub.user_connection_count(peer.user_id) >= limit:
            raise TooManyConnections(f"too many connections for this user (at most {limit})")
        self.hub.add_connection(peer)
        self._idle.clear()
        channels, positions, sub, after = await self.personal.open(peer, self.disconnect)
        self._counts_changed()
        self.sender.send(peer, peer.session.welcome(channels, positions))
        if sub is not None:
            self.personal.go_live(peer, sub, after)

    def disconnect(self, peer: Peer) -> None:
        """Forget a connection that has closed."""
        self.personal.forget(peer)
        for channel in self.hub.channels_of(peer):
            self.presence_events.closed(channel, peer.user_id)
        for channel in self.hub.remove_connection(peer):
            self.node_subscriptions.release_soon(channel)
        self._counts_changed()
        if not self.hub.connection_count():
            self._idle.set()

    async def handle(self, peer: Peer, effects: list[Effect]) -> None:
        """Carry out a session's effects; command failures become error replies."""
        await self.commands.handle(peer, effects)

    def _pending_overflow(self, peer: Peer) -> None:
        self.metrics.slow_consumer_closes.inc()
        logger.warning(
            "closing slow consumer %s (user %s) with 1013: too many events "
            "held while its subscription was being set up",
            peer.conn_id,
            peer.user_id,
        )
        peer.close(CloseCode.TRY_AGAIN_LATER, "subscriber too slow")
