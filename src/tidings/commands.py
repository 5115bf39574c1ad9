"""Carrying out a session's effects on one node: ``Sender`` writes what needs no waiting
(replies stamped with the wall clock, replays, closes, pings), ``Commands`` runs the
client's commands (subscribe, unsubscribe, refresh and the revocations after it), each
failure answered with the session's error reply, each timed."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from tidings.auth import Authenticator
from tidings.errors import PeerError, ServerError, Unauthorized
from tidings.event_types import event_type
from tidings.metrics import Metrics
from tidings.personal import PersonalChannels
from tidings.ports import Peer
from tidings.protocol.messages import ErrorReply, encode
from tidings.protocol.wire import text_frame
from tidings.session import (
    CheckGrants,
    Close,
    Effect,
    Send,
    SendEvents,
    SendPing,
    StartRefresh,
    StartSubscribe,
    StartUnsubscribe,
)
from tidings.subscriptions import Subscriptions

__all__ = ["Commands", "Sender"]

logger = logging.getLogger("tidings.gateway")


class Sender:
    """The effects that need no waiting."""

    def __init__(self, metrics: Metrics, wall_clock: Callable[[], float]) -> None:
        self._metrics = metrics
        self._wall_clock = wall_clock

    def apply(self, peer: Peer, effects: list[Effect]) -> None:
        """Carry out ``effects`` in order (``CheckGrants`` is ``Commands``')."""
        for effect in effects:
            if isinstance(effect, Send):
                self.send(peer, effect)
            elif isinstance(effect, SendEvents):
                self._send_events(peer, effect.payloads)
            elif isinstance(effect, Close):
                peer.close(effect.code, effect.reason)
            elif isinstance(effect, SendPing):
                peer.send_ping()

    def send(self, peer: Peer, effect: Send) -> None:
        message = effect.message
        if isinstance(message, ErrorReply):
            self._metrics.error(message.code)
        peer.send(text_frame(encode(message, self._wall_clock())))

    def _send_events(self, peer: Peer, payloads: Sequence[bytes]) -> None:
        """Stored events (a replay) as text frames, counted as delivered."""
        peer.send(b"".join(text_frame(payload) for payload in payloads))
        delivered = self._metrics.delivered
        for payload in payloads:
            delivered(event_type(payload), 1)


class Commands:
    """The client's commands; see the module docstring."""

    def __init__(
        self,
        sender: Sender,
        subscriptions: Subscriptions,
        personal: PersonalChannels,
        authenticator: Authenticator,
        metrics: Metrics,
        warn: Callable[[str, str], None],
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
    ) -> None:
        self._apply = sender.apply
        self._subscriptions = subscriptions
        self._personal = personal
        self._authenticator = authenticator
        self._metrics = metrics
        self._warn = warn
        self._clock = clock
        self._wall_clock = wall_clock

    async def handle(self, peer: Peer, effects: list[Effect]) -> None:
        """Carry out a session's effects; command failures become error replies."""
        self._personal.on_command(peer, effects)
        for effect in effects:
            if not isinstance(effect, StartSubscribe | StartUnsubscribe | StartRefresh):
                self._apply(peer, [effect])
                continue
            started = self._clock()
            command = effect.command
            name = type(command).__name__.lower()
            try:
                if isinstance(effect, StartSubscribe):
                    await self._subscriptions.subscribe(peer, effect)
                elif isinstance(effect, StartUnsubscribe):
                    self._subscriptions.unsubscribe(peer, effect.command.channel, effect.command.id)
                else:
                    await self._refresh(peer, effect.command.token, effect.command.id)
            except (PeerError, ServerError) as exc:
                if isinstance(exc, ServerError):
                    # A broker or authorizer outage fails every such command: rate-limited.
                    self._warn(f"{name} failed", exc.message)
                channel = getattr(command, "channel", None)
                self._apply(peer, peer.session.fail(exc, command.id, channel))
            except Exception:
                logger.exception("unexpected error handling %s", name)
                fault = ServerError("internal server error")
                self._apply(peer, peer.session.fail(fault, command.id))
            finally:
                self._metrics.command(name, self._clock() - started)

    async def _refresh(self, peer: Peer, token: str, command_id: str | None) -> None:
        try:
            identity = await self._authenticator.authenticate(token)
        except Unauthorized as exc:
            logger.info("refresh rejected: %s", exc.message)
            self._apply(peer, peer.session.unauthorized(exc.message, command_id))
            return
        effects = peer.session.refreshed(identity, command_id, self._clock(), self._wall_clock())
        self._apply(peer, effects)
        if any(isinstance(e, CheckGrants) for e in effects) and not peer.session.closed:
            await self._subscriptions.check_grants(peer)
