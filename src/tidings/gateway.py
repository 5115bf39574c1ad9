"""The composition root of a node: wires auth, policy, hub and broker, and coordinates.

The gateway is the broker's handler (events in, continuity and disconnect signals), runs
the gateway side of every session effect (subscribe with recovery, unsubscribe,
refresh), keeps one broker subscription per channel per node, ticks every session for
heartbeats and token expiry, and drains connections on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from tidings.auth import Authenticator, Identity
from tidings.brokers.base import Broker, HistoryPage
from tidings.brokers.presence_table import PresenceChange
from tidings.channels import ChannelPolicy
from tidings.config import Settings
from tidings.deadlines import Deadlines
from tidings.errors import (
    PeerError,
    PersonalChannelUnavailable,
    ServerError,
    SubscriptionFailed,
    TidingsError,
    TooManyConnections,
    Unauthorized,
)
from tidings.hub import Hub, Subscriber
from tidings.metrics import Metrics
from tidings.nodesubs import NodeSubscriptions
from tidings.outages import OutageLog
from tidings.ports import Peer, new_connection_id
from tidings.presence_events import PresenceEvents
from tidings.protocol import CloseCode, Recover, Subscribe, personal_channel
from tidings.protocol.messages import ErrorReply, encode
from tidings.protocol.wire import text_frame
from tidings.recovery import Replay, history_since, recover_live, recover_new
from tidings.session import (
    CheckGrants,
    Close,
    Effect,
    Send,
    SendEvents,
    SendPing,
    Session,
    StartRefresh,
    StartSubscribe,
    StartUnsubscribe,
)
from tidings.supervisor import Supervisor
from tidings.telemetry import Telemetry
from tidings.webhooks import WebhookSender

__all__ = ["Gateway"]

logger = logging.getLogger(__name__)

#: Seconds between two checks of the broker for ``tidings_broker_up`` (a scrape also
#: checks), which is also how often a worker copies its periodic metrics.
HEALTH_INTERVAL = 5.0


def _live_point(sub: Subscriber[Peer]) -> int:
    """The offset up to which a subscription has sent, or stands at, its events."""
    return max(sub.after, sub.start)


def _event_type(payload: bytes, start: int = 0) -> str:
    """The ``type`` of the event JSON in ``payload`` from ``start`` on."""
    # Every event payload is encoded with "type" as its first key (protocol.wire).
    if not payload.startswith(b'{"type":"', start):
        return "unknown"
    end = payload.find(b'"', start + 9)
    return payload[start + 9:end].decode() if end > 0 else "unknown"


def _frame_event_type(frame: bytes) -> str:
    """The ``type`` of the event in a server text frame (``protocol.wire.text_frame``)."""
    # Unmasked server frame: a 7-bit length, or 126/127 then a 16/64-bit one (RFC 6455 5.2).
    length = frame[1] & 0x7F
    return _event_type(frame, 2 if length < 126 else 4 if length == 126 else 10)


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
                                  on_written=self._count_frames)
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
        # conn_id -> peer whose personal channel is held (auth.personal_channel_hold).
        self._personal_holds: Deadlines[str, Peer] = Deadlines(
            settings.auth.personal_channel_hold, self._send_personal)
        #: The background loops (sweep: critical; health checks); ``healthy`` is part
        #: of readiness.
        self.supervisor = Supervisor()
        self._idle = asyncio.Event()
        self._idle.set()
        # Read at scrape time: a Gauge.inc per handshake costs more than the handshake's
        # own bookkeeping of the same numbers.
        self._subscription_count = 0
        # Called after either count changes; does nothing unless the metrics are shared
        # between workers.
        self._counts_changed = self.metrics.bind_counts(self.hub.connection_count,
                                                        lambda: self._subscription_count)
        self._fanned_out = self.metrics.fanned_out
        # Settings read on every handshake, looked up once.
        server, auth = settings.server, settings.auth
        self._session_settings = (settings.limits, server.heartbeat_interval,
                                  server.heartbeat_timeout, auth.leeway)
        self._max_connections_per_user = settings.limits.max_connections_per_user
        self._personal_channels = auth.personal_channel
        self._personal_hold = auth.personal_channel_hold > 0

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        await self.broker.start(self)
        server = self.settings.server
        period = max(0.01, min(1.0, server.heartbeat_interval / 4, server.heartbeat_timeout / 4))
        self.supervisor.spawn("gateway-sweep", lambda: self._sweep_forever(period),
                              critical=True)
        await self.check_broker()
        self.supervisor.spawn("gateway-health", self._health_forever)
        self.supervisor.spawn("presence-events", self.presence_events.run)
        if self.webhooks is not None:
            self.supervisor.spawn("presence-webhooks", self.webhooks.run)

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
        self._personal_holds.close()
        # Logs whatever a loop raised; the broker, authenticator and policy still close.
        await self.supervisor.close()
        if self.webhooks is not None:
            await self.webhooks.close()
        await self.node_subscriptions.settle()
        await self.broker.close()
        await self.authenticator.close()
        await self.policy.close()

    async def _sweep_forever(self, period: float) -> None:
        """Heartbeats, timeouts and token expiry for every connection, every ``period``.

        This loop must outlive any fault of ours: if it ended, no connection on the node
        would be pinged, timed out or closed at token expiry again. One session whose
        tick (or what it asks for) raises is closed with 1011 and the others go on; a
        fault of the sweep itself is logged and the next sweep runs.
        """
        while True:
            await asyncio.sleep(period)
            try:
                self.sweep(self.clock())
            except Exception:
                logger.exception("connection sweep failed; sweeping again in %ss", period)

    def sweep(self, now: float) -> None:
        """One sweep at ``now``; see ``_sweep_forever``."""
        for peer in self.hub.connections():
            try:
                effects = peer.session.tick(now)
                if effects:
                    self._apply_sync(peer, effects)
            except Exception:
                logger.exception("a connection's heartbeat or expiry check failed; "
                                 "closing it")
                peer.close(CloseCode.INTERNAL_ERROR, "internal error")

    # -- BrokerHandler ---------------------------------------------------------------

    def on_event(self, channel: str, offset: int, epoch: str, payload: bytes,
                 trace: str | None = None) -> None:
        if trace is not None:  # a traced publish: its delivery gets a span
            self.telemetry.deliver(channel, offset, trace,
                                   lambda: self._fan_out(channel, offset, payload))
            return
        # Counted when written (hub's on_written), not here: a subscriber under setup
        # holds the frame, and one that already had the offset skips it. Timed once per
        # event, never per subscriber.
        started = time.perf_counter()
        self.hub.deliver(channel, offset, text_frame(payload))
        self._fanned_out(time.perf_counter() - started)

    def _fan_out(self, channel: str, offset: int, payload: bytes) -> int:
        """``on_event``'s work, for a traced event: the local subscriber count."""
        started = time.perf_counter()
        subscribers = self.hub.deliver(channel, offset, text_frame(payload))
        self._fanned_out(time.perf_counter() - started)
        return subscribers

    def on_continuity_lost(self, channel: str) -> None:
        for peer in self.hub.subscribers(channel):
            self._end_subscription(peer, channel, peer.session.continuity_lost)

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
        identity = peer.session.identity
        limit = self._max_connections_per_user
        if self.hub.user_connection_count(identity.user_id) >= limit:
            raise TooManyConnections(f"too many connections for this user (at most {limit})")
        self.hub.add_connection(peer)
        self._idle.clear()
        channels: list[str] = []
        positions: dict[str, tuple[int, str]] = {}
        personal = personal_channel(identity.user_id) if self._personal_channels else None
        sub: Subscriber[Peer] | None = None
        after = 0
        if personal is not None:
            sub, _ = self.hub.subscribe(peer, personal, hold=True)
            try:
                await self.node_subscriptions.ensure(personal)
                after, epoch = await self.broker.position(personal)
            except TidingsError as exc:
                # Expected during a broker outage: one line, no traceback, rate-limited.
                self.outages.warn("personal channel unavailable at connect; refusing the "
                                  "connection with 1013", exc.message)
                self.disconnect(peer)
                raise PersonalChannelUnavailable(
                    "personal channel unavailable; try again later") from None
            except BaseException:
                # Unexpected fault or cancellation: register nothing (the caller never
                # reaches its disconnect), or the user's slot and the channel would leak.
                self.disconnect(peer)
                raise
            else:
                peer.session.subscribed(personal, personal=True)
                self._subscription_count += 1
                channels.append(personal)
                # Every event after `after` reaches this connection: announce it as the
                # baseline, so that a client losing this connection before its first
                # reply still recovers from here (no gap from 0, nothing missed).
                positions[personal] = (after, epoch)
        self._counts_changed()
        self._send(peer, peer.session.welcome(channels, positions))
        if sub is not None:
            # The live events wait (auth.personal_channel_hold) for the client's first
            # command: a subscribe with recover sent right after `connected` can then
            # replay what was missed before any live event goes out.
            sub.start = after
            if self._personal_hold:
                self._personal_holds.add(peer.conn_id, peer)
            else:
                self._send_held(peer, sub, after)

    def _release_personal(self, peer: Peer) -> None:
        """End the connect-time hold of the personal channel early."""
        if self._personal_holds.pop(peer.conn_id) is not None:
            self._send_personal(peer)

    def _send_personal(self, peer: Peer) -> None:
        """The connect-time hold is over: send what it held, then go live."""
        personal = peer.session.personal
        sub = self.hub.subscriber(peer, personal) if personal is not None else None
        if sub is not None and sub.pending is not None:
            self._send_held(peer, sub, _live_point(sub))

    def disconnect(self, peer: Peer) -> None:
        """Forget a connection that has closed."""
        self._personal_holds.pop(peer.conn_id)
        was_known = self.hub.is_connected(peer)
        count = len(peer.session.subscriptions)
        for channel in self.hub.remove_connection(peer):
            self.node_subscriptions.release_soon(channel)
        if was_known:
            self._subscription_count -= count
            for channel in peer.session.subscriptions:
                self.presence_events.closed(channel, peer.user_id)
        self._counts_changed()
        if not self.hub.connection_count():
            self._idle.set()

    # -- effects ---------------------------------------------------------------------

    def _apply_sync(self, peer: Peer, effects: list[Effect]) -> None:
        """Carry out the effects that need no waiting (``CheckGrants`` is ``_refresh``'s)."""
        for effect in effects:
            if isinstance(effect, Send):
                self._send(peer, effect)
            elif isinstance(effect, SendEvents):
                self._send_events(peer, effect.payloads)
            elif isinstance(effect, Close):
                peer.close(effect.code, effect.reason)
            elif isinstance(effect, SendPing):
                peer.send_ping()

    def _send(self, peer: Peer, effect: Send) -> None:
        message = effect.message
        if isinstance(message, ErrorReply):
            self.metrics.error(message.code)
        peer.send(text_frame(encode(message, self.wall_clock())))

    async def handle(self, peer: Peer, effects: list[Effect]) -> None:
        """Carry out a session's effects; command failures become error replies."""
        if peer.conn_id in self._personal_holds:
            self._end_personal_hold(peer, effects)
        for effect in effects:
            if not isinstance(effect, StartSubscribe | StartUnsubscribe | StartRefresh):
                self._apply_sync(peer, [effect])
                continue
            started = self.clock()
            command = effect.command
            name = type(command).__name__.lower()
            try:
                if isinstance(effect, StartSubscribe):
                    await self._subscribe(peer, effect.command)
                elif isinstance(effect, StartUnsubscribe):
                    self._unsubscribe(peer, effect.command.channel, effect.command.id)
                elif isinstance(effect, StartRefresh):
                    await self._refresh(peer, effect.command.token, effect.command.id)
            except (PeerError, ServerError) as exc:
                if isinstance(exc, ServerError):
                    # A broker or authorizer outage fails every such command: rate-limited.
                    self.outages.warn(f"{name} failed", exc.message)
                channel = getattr(command, "channel", None)
                self._apply_sync(peer, peer.session.fail(exc, command.id, channel))
            except Exception:
                logger.exception("unexpected error handling %s", name)
                fault = ServerError("internal server error")
                self._apply_sync(peer, peer.session.fail(fault, command.id))
            finally:
                self.metrics.command(name, self.clock() - started)

    def _end_personal_hold(self, peer: Peer, effects: list[Effect]) -> None:
        """The client's first command ends the connect-time hold; a recover of the
        personal channel itself takes the hold over and releases it after its replay."""
        first = effects[0] if effects else None
        takes_over = (isinstance(first, StartSubscribe)
                      and first.command.channel == peer.session.personal
                      and first.command.recover is not None)
        if takes_over:
            self._personal_holds.pop(peer.conn_id)
        else:
            self._release_personal(peer)

    # -- subscriptions ---------------------------------------------------------------

    async def _subscribe(self, peer: Peer, command: Subscribe) -> None:
        channel = command.channel
        session = peer.session
        await self.policy.authorize(session.identity, channel)
        if not self.hub.is_connected(peer):
            return
        existing = self.hub.subscriber(peer, channel)
        if existing is not None:
            await self._resubscribe(peer, existing, command)
            return
        sub, _ = self.hub.subscribe(peer, channel, hold=True)
        try:
            await self.node_subscriptions.ensure(channel)
            if command.recover is not None:
                page = await self._recovery_page(channel, command.recover)
                position, replay = page.position, recover_new(command.recover, page)
            else:
                position, replay = await self.broker.position(channel), Replay(False)
        except BaseException:
            self._drop_subscription(peer, channel)
            raise
        if self.hub.subscriber(peer, channel) is not sub:
            if self.hub.is_connected(peer):
                # Continuity was lost while we set up (the client was told to resubscribe).
                raise SubscriptionFailed("subscription interrupted; subscribe again",
                                         channel=channel)
            return  # the connection closed while we waited
        self._apply_sync(peer, session.subscribe_done(
            command, position.offset, position.epoch,
            replay if command.recover is not None else None, new=True))
        self._subscription_count += 1
        self.presence_events.opened(channel, session.identity.user_id)
        self._counts_changed()
        self._send_held(peer, sub, position.offset)
        if replay.since is not None:
            # The replay sent what follows `since`: a later recover must not send it again.
            sub.start = min(sub.start, replay.since)

    async def _resubscribe(self, peer: Peer, sub: Subscriber[Peer], command: Subscribe) -> None:
        """Idempotent subscribe; with ``recover`` it replays what the connection missed
        before its subscription went live (offsets up to ``sub.start``).

        That replay is only possible while no live event beyond ``sub.start`` has been
        sent: offsets must reach the connection in increasing order. Otherwise the answer
        is ``recovered: false`` (this is how the personal channel, subscribed at connect,
        is recovered: clients send the recover right after ``connected``)."""
        channel = command.channel
        recover = command.recover
        if recover is None:
            position = await self.broker.position(channel)
            self._apply_sync(peer, peer.session.subscribe_done(
                command, position.offset, position.epoch, None, new=False))
            return
        # The release below moves `start` up to the live point, but the offsets between
        # the two were sent: `start` is put back (or lowered to where a replay began), so
        # that a later recover cannot send them a second time.
        start = sub.start
        self.hub.hold(sub)
        try:
            page = await self._recovery_page(channel, recover)
        except BaseException:
            self._send_held(peer, sub, _live_point(sub))
            sub.start = start
            raise
        if self.hub.subscriber(peer, channel) is not sub:
            if self.hub.is_connected(peer):
                # Continuity was lost during the read (the client was told to resubscribe).
                raise SubscriptionFailed("subscription interrupted; subscribe again",
                                         channel=channel)
            return  # the connection closed while we waited
        replay = recover_live(recover, page, start, sub.after)
        self._apply_sync(peer, peer.session.subscribe_done(
            command, _live_point(sub), page.position.epoch, replay, new=False))
        self._send_held(peer, sub, _live_point(sub))
        sub.start = start if replay.since is None else min(start, replay.since)

    async def _recovery_page(self, channel: str, recover: Recover) -> HistoryPage:
        """The history that decides ``recover``: after the client's offset, or, when the
        channel turns out to be in another epoch, after 0 (``recovery.history_since``)."""
        limit = self._recovery_limit()
        page = await self.broker.history(channel, recover.offset, limit)
        since = history_since(recover, page.position.epoch)
        if since != recover.offset:
            # The epoch changed (a rare path): read again rather than make every recover
            # learn the epoch first.
            page = await self.broker.history(channel, since, limit)
        return page

    def _recovery_limit(self) -> int:
        # Streams may hold a little more than history.size (approximate trimming).
        return max(1, self.settings.history.size) * 2

    def _send_events(self, peer: Peer, payloads: Sequence[bytes]) -> None:
        peer.send(b"".join(text_frame(payload) for payload in payloads))
        delivered = self.metrics.delivered
        for payload in payloads:
            delivered(_event_type(payload), 1)

    def _send_held(self, peer: Peer, sub: Subscriber[Peer], after: int) -> None:
        frames = self.hub.release(sub, after)
        if frames:
            peer.send(b"".join(frames))
            self._count_frames(frames, 1)

    def _count_frames(self, frames: Sequence[bytes], connections: int) -> None:
        """``tidings_events_delivered_total``: each event frame of ``frames`` was written
        to ``connections`` connections."""
        delivered = self.metrics.delivered
        for frame in frames:
            delivered(_frame_event_type(frame), connections)

    def _unsubscribe(self, peer: Peer, channel: str, command_id: str | None) -> None:
        self._end_subscription(peer, channel,
                               lambda name: peer.session.unsubscribe_done(name, command_id))

    def _end_subscription(self, peer: Peer, channel: str,
                          ending: Callable[[str], list[Effect]]) -> None:
        """End ``channel`` for ``peer`` with the session's ``ending`` (which drops the
        session's side and makes the replies), then the node's side, then the replies."""
        was_subscribed = peer.session.is_subscribed(channel)
        effects = ending(channel)
        self._release(peer, channel, was_subscribed)
        self._apply_sync(peer, effects)

    def _drop_subscription(self, peer: Peer, channel: str) -> None:
        """End ``channel`` for ``peer`` without a reply (a subscribe that failed)."""
        was_subscribed = peer.session.is_subscribed(channel)
        peer.session.unsubscribed(channel)
        self._release(peer, channel, was_subscribed)

    def _release(self, peer: Peer, channel: str, was_subscribed: bool) -> None:
        """The node's side of an ended subscription: counts, presence, the hub, the
        broker subscription."""
        if was_subscribed:
            self._subscription_count -= 1
            self._counts_changed()
            self.presence_events.closed(channel, peer.user_id)
        if self.hub.unsubscribe(peer, channel):
            self.node_subscriptions.release_soon(channel)

    def _pending_overflow(self, peer: Peer) -> None:
        self.metrics.slow_consumer_closes.inc()
        logger.warning("closing slow consumer %s (user %s) with 1013: too many events "
                       "held while its subscription was being set up", peer.conn_id,
                       peer.user_id)
        peer.close(CloseCode.TRY_AGAIN_LATER, "subscriber too slow")

    # -- refresh ---------------------------------------------------------------------

    async def _refresh(self, peer: Peer, token: str, command_id: str | None) -> None:
        try:
            identity = await self.authenticator.authenticate(token)
        except Unauthorized as exc:
            logger.info("refresh rejected: %s", exc.message)
            self._apply_sync(peer, peer.session.unauthorized(exc.message, command_id))
            return
        effects = peer.session.refreshed(identity, command_id, self.clock(), self.wall_clock())
        self._apply_sync(peer, effects)
        for effect in effects:
            if isinstance(effect, CheckGrants) and not peer.session.closed:
                await self._check_grants(peer, effect.channels)

    async def _check_grants(self, peer: Peer, channels: Sequence[str]) -> None:
        """After a refresh, end subscriptions the new token no longer allows (``revoked``).

        An authorizer that is unavailable keeps the subscription: an outage of the
        application's backend must not unsubscribe everybody.
        """
        session = peer.session
        for channel in channels:
            try:
                await self.policy.authorize(session.identity, channel)
            except Unauthorized:
                self._end_subscription(peer, channel, session.revoke)
            except TidingsError:
                continue
