"""The composition root of a node: wires auth, policy, hub and broker, and coordinates.

The gateway is the broker's handler (events in, continuity and disconnect signals),
registers connections (``personal`` subscribes their personal channel), hands session
effects to ``commands`` (``subscriptions`` sets subscriptions up, recovers and revokes
them; the hub owns who holds what), runs the heartbeat ``sweep``, and drains on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from tidings.auth import Authenticator, Identity
from tidings.brokers.base import Broker
from tidings.brokers.presence_table import PresenceChange
from tidings.channels import ChannelPolicy
from tidings.commands import Commands, Sender
from tidings.config import Settings
from tidings.errors import TidingsError, TooManyConnections
from tidings.event_types import frame_counter
from tidings.hub import Hub
from tidings.metrics import Metrics
from tidings.nodesubs import NodeSubscriptions
from tidings.outages import OutageLog
from tidings.personal import PersonalChannels
from tidings.ports import Peer, new_connection_id
from tidings.presence_events import PresenceEvents
from tidings.protocol import CloseCode
from tidings.protocol.wire import text_frame
from tidings.session import Effect, Session
from tidings.subscriptions import Subscriptions
from tidings.supervisor import Supervisor
from tidings.sweep import Sweeper, sweep_period
from tidings.telemetry import Telemetry
from tidings.webhooks import WebhookSender

__all__ = ["Gateway"]

logger = logging.getLogger(__name__)

#: Seconds between two checks of the broker for ``tidings_broker_up`` (a scrape also
#: checks), which is also how often a worker copies its periodic metrics.
HEALTH_INTERVAL = 5.0


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
        self.hub: Hub[Peer] = Hub(on_pending_overflow=self._pending_overflow,
                                  on_written=frame_counter(self.metrics),
                                  on_fanned_out=self.metrics.fanned_out)
        self.draining = False
        self.outages = OutageLog(logger)
        self.node_subscriptions = NodeSubscriptions(broker, self.hub.has_channel,
                                                    outages=self.outages)
        self.presence_events = PresenceEvents(broker, settings.namespaces,
                                              outages=self.outages)
        #: Told of each presence transition this node observed (``[webhooks]``).
        self.webhooks: WebhookSender | None = None
        if settings.webhooks.url:
            dropped = self.metrics.webhooks_dropped
            self.webhooks = WebhookSender(
                settings.webhooks, on_drop=lambda reason: dropped.labels(reason).inc())
        #: The background loops (sweep: critical; health checks); ``healthy`` is part
        #: of readiness.
        self.supervisor = Supervisor()
        self._idle = asyncio.Event()
        self._idle.set()
        # Read at scrape time, from the hub (which owns both counts): a Gauge.inc per
        # handshake costs more than the handshake's own bookkeeping of the same numbers.
        # Called after either count changes; does nothing unless the metrics are shared
        # between workers.
        self._counts_changed = self.metrics.bind_counts(self.hub.connection_count,
                                                        self.hub.subscription_count)
        self.sender = Sender(self.metrics, wall_clock)
        self.subscriptions = Subscriptions(
            self.hub, broker, policy, self.node_subscriptions, self.presence_events,
            self.metrics, history_size=settings.history.size, apply=self.sender.apply,
            counts_changed=self._counts_changed)
        self.personal = PersonalChannels(
            self.hub, broker, self.node_subscriptions, self._warn,
            enabled=settings.auth.personal_channel,
            hold=settings.auth.personal_channel_hold,
            release_held=self.subscriptions.release_held)
        self.commands = Commands(self.sender, self.subscriptions, self.personal,
                                 authenticator, self.metrics, self._warn, clock, wall_clock)
        self.sweeper = Sweeper(self.hub, self.sender.apply, clock)
        # Settings read on every handshake, looked up once.
        server, auth = settings.server, settings.auth
        self._session_settings = (settings.limits, server.heartbeat_interval,
                                  server.heartbeat_timeout, auth.leeway)
        self._max_connections_per_user = settings.limits.max_connections_per_user

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        await self.broker.start(self)
        server = self.settings.server
        period = sweep_period(server.heartbeat_interval, server.heartbeat_timeout)
        self.supervisor.spawn("gateway-sweep", lambda: self.sweeper.run(period),
                              critical=True)
        await self.check_broker()
        self.supervisor.spawn("gateway-health", self._health_forever)
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
        """Whether the broker answers now (within ``broker.timeout``), as ``/readyz`` and
        ``tidings_broker_up`` report it."""
        try:
            async with asyncio.timeout(self.settings.broker.timeout + 1):
                up = await self.broker.ready()
        except (TidingsError, TimeoutError):
            up = False
        self.metrics.broker_up.set(1 if up else 0)
        return up

    async def _health_forever(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL)
            try:
                await self.check_broker()
                self.metrics.sync()
            except Exception:
                # A fault of ours: the gauges keep their last values, the checks go on.
                logger.exception("periodic health check failed")

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

    # -- BrokerHandler ---------------------------------------------------------------

    def on_event(self, channel: str, offset: int, epoch: str, payload: bytes,
                 trace: str | None = None) -> None:
        if trace is not None:  # a traced publish: its delivery gets a span
            self.telemetry.deliver(channel, offset, trace,
                                   lambda: self._fan_out(channel, offset, payload))
            return
        # Counted when written (hub's on_written), not here: a subscriber under setup
        # holds the frame, and one that already had the offset skips it. The hub times
        # the fan-out too (tidings_fanout_seconds), up to the write at the end of the tick.
        self.hub.deliver(channel, offset, text_frame(payload))

    def _fan_out(self, channel: str, offset: int, payload: bytes) -> int:
        """``on_event``'s work, for a traced event: the local subscriber count."""
        return self.hub.deliver(channel, offset, text_frame(payload))

    def on_continuity_lost(self, channel: str) -> None:
        self.subscriptions.continuity_lost(channel)

    def on_disconnect_user(self, user_id: str, reason: str) -> None:
        for peer in self.hub.connections_of(user_id):
            peer.close(CloseCode.FORBIDDEN, reason or "disconnected by the application")

    def on_presence(self, channel: str, payload: bytes) -> None:
        self.hub.deliver_now(channel, text_frame(payload))

    def on_presence_change(self, change: PresenceChange) -> None:
        if self.webhooks is None:
            return
        try:
            self.webhooks.submit(change)
        except Exception:
            # The broker's delivery must go on (BrokerHandler: must not raise).
            logger.exception("queueing a presence webhook failed")

    def local_channels(self) -> dict[str, int]:
        return dict(self.hub.channel_counts())

    def local_presence(self, channel: str) -> dict[str, int]:
        return dict(self.hub.presence(channel))

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
        return Session(identity, conn_id=conn_id or new_connection_id(), limits=limits,
                       heartbeat_interval=interval, heartbeat_timeout=timeout,
                       leeway=leeway, now=self.clock(), wall=self.wall_clock())

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
        logger.warning("closing slow consumer %s (user %s) with 1013: too many events "
                       "held while its subscription was being set up", peer.conn_id,
                       peer.user_id)
        peer.close(CloseCode.TRY_AGAIN_LATER, "subscriber too slow")
