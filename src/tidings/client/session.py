"""The client's protocol state and decisions, without I/O (the sans-I/O core).

``Session`` decides everything the client does that needs no socket, task or timer. The
asyncio shell (``tidings.client.connection`` and ``tidings.client.link``) feeds it the
server's text frames (``receive``) and tells it when a connection opens, is lost or ends;
the session answers synchronously with effects (``tidings.client.effects``) for the shell
to carry out:

* ``Deliver``/``Confirm``/``Recovered``/``End``/``Added``: items for a subscription's queue
  (from its channel's ``ChannelTracker``), a confirmed subscription, a recovered one, a
  subscription that is over, a subscription to create for an automatically subscribed
  (personal) channel;
* ``Connected``: the connection is up;
* ``Resubscribe``/``SubscribeNow``/``RetrySubscribe``/``RecoverFresh``: subscribe commands
  to send, paced after a reconnect, at once, after a delay, or after an unsubscribe (the
  messages are built by ``subscribe_message`` when the shell sends them);
* ``StartRefresh``: start the token refresh loop of this connection;
* ``Reply``/``Failed``: the reply to a command the shell waits for.

When a connection ends, ``connection_ended`` decides from the close code
(``tidings.client.policy``) whether to reconnect after a backoff delay or stop. The
session owns the per-channel bookkeeping (``ChannelState``), the connection generation,
the automatic channels, the token (``TokenSource``, whose provider the shell calls) with
the timing of its refresh, and the ``Backoff``. Clocks are injected callables; the session
never awaits.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any

from tidings.client.backoff import Backoff
from tidings.client.effects import (
    Added,
    ChannelState,
    Confirm,
    Connected,
    Deliver,
    Effect,
    End,
    Failed,
    Outcome,
    PresenceSeen,
    Reconnect,
    Recovered,
    RecoverFresh,
    Reply,
    Resubscribe,
    RetrySubscribe,
    StartRefresh,
    Stop,
    SubscribeNow,
)
from tidings.client.errors import AuthenticationFailed, ConnectionClosed, SubscriptionError
from tidings.client.models import Event, Item, Presence, Recovery
from tidings.client.policy import Action, decide
from tidings.client.tokens import TokenProvider, TokenSource
from tidings.client.tracker import ProtocolViolation
from tidings.protocol import loads
from tidings.protocol.messages import Connected as Welcome
from tidings.protocol.messages import (
    ErrorReply,
    MalformedMessage,
    Pong,
    Refreshed,
    Subscribed,
    Unsubscribed,
    decode_reply,
)

__all__ = ["FATAL_SUBSCRIBE_ERRORS", "FIRST_RECOVER", "Session"]

logger = logging.getLogger("tidings.client")

#: Recovery point for an automatically subscribed channel (the personal channel) seen for
#: the first time, from a server whose ``connected`` announces no position for it: no
#: epoch matches it, so the server answers ``recovered: false`` with the offset at which
#: this connection's subscription went live: the baseline of its events.
FIRST_RECOVER = {"offset": 0, "epoch": ""}

#: Error codes after which a failed subscription is given up instead of retried.
FATAL_SUBSCRIBE_ERRORS = frozenset({"unauthorized", "invalid_request"})


class Session:
    """The client's state and decisions; see the module docstring.

    ``clock`` is monotonic seconds (backoff reset), ``wall_clock`` epoch seconds (token
    expiry). The other options are those of ``Client``.
    """

    def __init__(
        self,
        *,
        token: str | None,
        token_provider: TokenProvider | None,
        backoff: Backoff,
        refresh_margin: float,
        liveness_timeout: float,
        connect_timeout: float,
        resubscribe_burst: int,
        resubscribe_rate: float,
        max_auth_failures: int,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
    ) -> None:
        self.tokens = TokenSource(
            token, token_provider, refresh_margin=refresh_margin, wall_clock=wall_clock
        )
        self.backoff = backoff
        self._liveness_timeout = liveness_timeout
        self._connect_timeout = connect_timeout
        self._burst = resubscribe_burst
        self._rate = resubscribe_rate
        self._max_auth_failures = max_auth_failures
        self._clock = clock
        self._wall = wall_clock

        #: Every subscription the application has (or the server made), by channel.
        self.channels: dict[str, ChannelState] = {}
        #: Incremented by each ``connected``: commands for an older connection are dropped.
        self.gen = 0
        #: A connection is up and was welcomed (``connected``), until it is lost.
        self.connected = False
        #: The current (or last) connection received ``connected``.
        self.welcomed = False
        #: From the last ``connected`` message.
        self.connection_id: str | None = None
        self.user_id: str | None = None
        self.heartbeat_interval: float | None = None
        self._auto: set[str] = set()
        self._unwanted: set[str] = set()
        self._sub_ids: dict[str, ChannelState] = {}
        self._ids = itertools.count(1)
        self._last_unauthorized = ""
        self._auth_failures = 0

    # -- the subscription table ------------------------------------------------------

    @property
    def automatic(self) -> frozenset[str]:
        """Channels the server subscribed automatically (the personal channel)."""
        return frozenset(self._auto)

    def want(self, channel: str) -> None:
        """The application subscribes ``channel``: an automatic channel it had dropped is
        no longer unsubscribed at connect."""
        self._unwanted.discard(channel)

    def add(self, state: ChannelState) -> None:
        """The application subscribed a new channel."""
        self.channels[state.channel] = state

    def remove(self, channel: str) -> None:
        """The application unsubscribed ``channel`` (an automatic one stays dropped on
        later connections)."""
        self.channels.pop(channel, None)
        if channel in self._auto:
            self._unwanted.add(channel)

    def clear(self) -> None:
        """The client stopped: every subscription ended."""
        self.channels = {}

    def is_current(self, state: ChannelState) -> bool:
        """``state`` is still its channel's subscription."""
        return self.channels.get(state.channel) is state

    # -- connection lifecycle --------------------------------------------------------

    def connection_opened(self) -> None:
        """A WebSocket is open; ``connected`` has not arrived yet."""
        self.welcomed = False
        self._last_unauthorized = ""

    def receive_timeout(self) -> float:
        """How long to wait for the next frame: the connect timeout until ``connected``,
        then the heartbeat interval plus the liveness timeout."""
        if self.welcomed:
            return (self.heartbeat_interval or 0.0) + self._liveness_timeout
        return self._connect_timeout

    def connection_lost(self) -> None:
        """The WebSocket is gone; replies to subscribes sent on it will never come."""
        self.connected = False
        self._sub_ids.clear()

    def outcome(self, code: int | None, reason: str) -> Outcome:
        """How the open connection ended (a 4401 close carries the last ``unauthorized``
        error message as its reason, when there was one)."""
        if code == 4401 and self._last_unauthorized:
            reason = self._last_unauthorized
        return Outcome(code, reason, self.welcomed)

    def connection_ended(self, outcome: Outcome) -> Reconnect | Stop:
        """Decide what follows a connection attempt, from its close code: reconnect after a
        backoff delay (asking the provider for a new token after 4401) or stop."""
        self.backoff.disconnected(self._clock())
        decision = decide(outcome.code, has_token_provider=self.tokens.has_provider)
        if decision.action is Action.STOP:
            error_type = AuthenticationFailed if decision.auth else ConnectionClosed
            why = f"{decision.reason}: {outcome.reason}" if outcome.reason else decision.reason
            return Stop(error_type(outcome.code, why))
        if decision.action is Action.NEW_TOKEN:
            self._auth_failures = 1 if outcome.welcomed else self._auth_failures + 1
            if self._auth_failures > self._max_auth_failures:
                return Stop(
                    AuthenticationFailed(
                        outcome.code,
                        (
                            f"the server rejected {self._auth_failures} tokens from the token "
                            f"provider in a row: {outcome.reason}"
                        ),
                    )
                )
            self.tokens.rejected()
        elif outcome.welcomed:
            self._auth_failures = 0
        return Reconnect(self.backoff.next_delay(slow=decision.action is Action.RECONNECT_SLOWLY))

    # -- outbound --------------------------------------------------------------------

    def next_id(self) -> str:
        """A fresh command id."""
        return str(next(self._ids))

    def command(self, kind: str, data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """A command with a fresh id: ``(id, message)``."""
        command_id = self.next_id()
        return command_id, {"type": kind, "id": command_id, "data": data}

    def subscribe_message(self, state: ChannelState, gen: int) -> dict[str, Any] | None:
        """The ``subscribe`` for ``state`` (with ``recover`` once there is a recovery point,
        or the first one for an automatic channel), recorded as the one in flight; None
        when connection ``gen`` is no longer the live one."""
        if gen != self.gen or not self.connected:
            return None
        data: dict[str, Any] = {"channel": state.channel}
        point = state.tracker.recover_point()
        if point is not None:
            data["recover"] = {"offset": point[0], "epoch": point[1]}
        elif state.channel in self._auto:
            data["recover"] = dict(FIRST_RECOVER)
        command_id = self.next_id()
        self._sub_ids[command_id] = state
        state.sent_on = gen
        state.pending_id = command_id
        return {"type": "subscribe", "id": command_id, "data": data}

    def needs_resubscribe(self, state: ChannelState, gen: int) -> bool:
        """After a reconnect: ``state`` is current and not yet subscribed on ``gen``."""
        return self.is_current(state) and state.sent_on != gen

    def pacing_delay(self, sent: int) -> float | None:
        """Pause before the next command of a resubscription burst after ``sent`` commands
        (stay under the server's command rate limit); None: send at once."""
        return 1 / self._rate if sent >= self._burst else None

    # -- token refresh ---------------------------------------------------------------

    def refresh_delay(self) -> float | None:
        """Seconds until the token should be refreshed; None: stop refreshing."""
        return self.tokens.refresh_delay()

    def refresh_retry_delay(self, expires_at: float | None) -> float:
        """Pause after the provider failed during a refresh (``expires_at``: the expiry when
        the attempt started)."""
        return self.tokens.retry_delay(expires_at or self._wall())

    def refreshed(self, token: str, reply: dict[str, Any]) -> bool:
        """The server accepted ``token``; False when refreshing again would not help (it
        does not expire later than the one it replaced)."""
        return self.tokens.refreshed(token, reply.get("expires_at"))

    # -- inbound ---------------------------------------------------------------------

    def receive(self, raw: str) -> list[Effect]:
        """Apply one text frame from the server; raise ``ProtocolViolation`` when the stream
        breaks an ordering guarantee (drop the connection and recover on a new one)."""
        try:
            message = loads(raw)
        except Exception:
            logger.warning("ignoring a frame that is not JSON")
            return []
        if not isinstance(message, dict):
            return []
        # The server's replies decode into the very dataclasses its session makes.
        try:
            reply = decode_reply(message)
        except MalformedMessage:
            raw_id = message.get("id")
            return self._on_subscribed(raw_id if isinstance(raw_id, str) else None, None)
        if isinstance(reply, Welcome):
            return self._on_connected(reply)
        if isinstance(reply, Subscribed):
            return self._on_subscribed(reply.id, reply)
        if isinstance(reply, Unsubscribed):
            return self._on_unsubscribed(reply)
        if isinstance(reply, Pong | Refreshed):
            return [Reply(reply.id, reply.data())] if reply.id else []
        if isinstance(reply, ErrorReply):
            return self._on_error(reply)
        kind = message.get("type")
        if "channel" in message and "offset" in message:
            return self._on_event(message)
        if kind in ("join", "leave"):
            data = message.get("data")
            user_id = data.get("user_id") if isinstance(data, dict) else None
            return self._on_presence(kind, message.get("channel"), user_id)
        return []

    def _on_presence(self, kind: str, channel: Any, user_id: Any) -> list[Effect]:
        if not isinstance(channel, str) or not isinstance(user_id, str):
            return []
        state = self.channels.get(channel)
        if state is None:
            return []
        return [PresenceSeen(channel, Presence(channel, kind, user_id))]

    def server_error(self, code: str, message: str) -> None:
        """An ``error`` no command waits for (a 4401 close will carry an ``unauthorized``
        one's message as its reason)."""
        if code == "unauthorized":
            self._last_unauthorized = message
        logger.warning("server error %s: %s", code, message)

    def _on_connected(self, welcome: Welcome) -> list[Effect]:
        self.gen += 1
        self.welcomed = self.connected = True
        self.connection_id = welcome.connection_id
        self.user_id = welcome.user_id
        self.heartbeat_interval = welcome.heartbeat_interval
        self.tokens.accepted(welcome.expires_at)
        self._auto = set(welcome.channels)
        positions = welcome.positions
        self.backoff.connected(self._clock())
        effects: list[Effect] = []
        for channel in sorted(self._auto - self._unwanted):
            state = self.channels.get(channel)
            if state is None:
                state = self.channels[channel] = ChannelState(channel)
                effects.append(Added(state))
            tracker = state.tracker
            if state.automatic and tracker.epoch is None:
                tracker.baseline_lost = True  # live before, but never got a baseline
            state.automatic = True
            position = positions.get(channel)
            if position is not None and not tracker.baseline_lost:
                # The point this connection's subscription went live at: recover from
                # it, even on a later connection if this one is lost before the reply.
                tracker.start_at(*position)
        # Before any event is read: hold what arrives until each channel's reply.
        for state in self.channels.values():
            state.tracker.begin()
        unwanted = sorted(self._auto & self._unwanted)
        effects.append(
            Resubscribe(
                self.gen,
                tuple({"type": "unsubscribe", "data": {"channel": c}} for c in unwanted),
                tuple(self.channels.values()),
            )
        )
        if self.tokens.has_provider:
            effects.append(StartRefresh())
        effects.append(Connected())
        return effects

    def _on_subscribed(self, reply_id: str | None, reply: Subscribed | None) -> list[Effect]:
        """``reply`` None: a ``subscribed`` too malformed to decode."""
        state = self._sub_ids.pop(reply_id, None) if reply_id else None
        if state is None or not self.is_current(state) or state.pending_id != reply_id:
            return []
        if reply is None:
            raise ProtocolViolation(f"{state.channel}: malformed 'subscribed' reply")
        offset, epoch, recovered, since = reply.offset, reply.epoch, reply.recovered, reply.since
        tracker = state.tracker
        if (
            state.automatic
            and recovered is False
            and since is None
            and tracker.epoch is not None
            and (epoch != tracker.epoch or offset > tracker.offset)
            and state.fallback_on != self.gen
        ):
            # The server subscribed this channel at connect and may already have sent live
            # events past the recovery point (or, in a new epoch, past its first offsets),
            # so it could not replay without reordering. Unsubscribe and subscribe again
            # with recover: a fresh subscription replays from history (a new epoch from
            # offset 1). Events keep being held meanwhile; a Gap only if that fails too.
            state.fallback_on = self.gen
            return [RecoverFresh(state, self.gen)]
        state.retries = 0
        # A recovery is news only on a subscription confirmed before: a first reply is the
        # baseline, even when it answers the recover of a position `connected` announced.
        recovery = (
            Recovered(state.channel, Recovery(state.channel, tracker.offset, offset, epoch))
            if recovered is True and state.confirmed
            else None
        )
        items = tracker.subscribed(offset, epoch, recovered, since)
        state.confirmed = True
        return [
            *([recovery] if recovery is not None else []),
            *self._deliver(state, items),
            Confirm(state.channel),
        ]

    def _on_unsubscribed(self, reply: Unsubscribed) -> list[Effect]:
        if reply.id is not None:
            return [Reply(reply.id, reply.data())]
        state = self.channels.get(reply.channel)
        if state is None:
            return []
        if reply.resubscribe is True:
            logger.info(
                "server ended %s (%s); resubscribing with recovery", state.channel, reply.reason
            )
            state.tracker.begin()
            return [SubscribeNow(state, self.gen)]
        del self.channels[state.channel]
        return [
            End(
                state.channel,
                SubscriptionError(
                    state.channel,
                    reply.reason if reply.reason is not None else "revoked",
                    "the server ended the subscription",
                ),
            )
        ]

    def _on_error(self, reply: ErrorReply) -> list[Effect]:
        code, message, reply_id = reply.code, reply.message, reply.id
        if reply_id is None:
            self.server_error(code, message)
            return []
        state = self._sub_ids.pop(reply_id, None)
        if state is None:
            return [Failed(reply_id, code, message)]
        if state.pending_id != reply_id:  # a newer subscribe is in flight
            return []
        return self._subscribe_failed(state, code, message)

    def _subscribe_failed(self, state: ChannelState, code: str, message: str) -> list[Effect]:
        if not self.is_current(state):
            return []
        if code in FATAL_SUBSCRIBE_ERRORS or not (state.confirmed or state.automatic):
            del self.channels[state.channel]
            return [End(state.channel, SubscriptionError(state.channel, code, message))]
        # A resubscription failed for a reason that may pass (broker or authorizer
        # unavailable, rate limit): try again on this connection after a delay.
        state.retries += 1
        backoff = self.backoff
        delay = backoff.random() * min(backoff.cap, backoff.initial * 2 ** min(state.retries, 16))
        logger.warning(
            "resubscribing %s failed (%s: %s); retrying in %.2f s",
            state.channel,
            code,
            message,
            delay,
        )
        return [RetrySubscribe(state, self.gen, delay)]

    def _on_event(self, message: dict[str, Any]) -> list[Effect]:
        channel = message.get("channel")
        state = self.channels.get(channel) if isinstance(channel, str) else None
        if state is None:
            return []
        try:
            event = Event.from_message(message)
        except ValueError:
            logger.warning("ignoring a malformed event on %s", state.channel)
            return []
        return self._deliver(state, state.tracker.event(event))

    @staticmethod
    def _deliver(state: ChannelState, items: list[Item]) -> list[Effect]:
        return [Deliver(state.channel, items)] if items else []
