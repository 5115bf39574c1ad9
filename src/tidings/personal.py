"""The personal channel of each connection: subscribed at connect, its live events held
(``auth.personal_channel_hold``) until the client's first command, so that a subscribe
with recover sent right after ``connected`` replays what was missed before any live event
goes out."""

from __future__ import annotations

from collections.abc import Callable

from tidings.brokers.base import Broker
from tidings.deadlines import Deadlines
from tidings.errors import PersonalChannelUnavailable, TidingsError
from tidings.hub import Hub, Subscriber
from tidings.nodesubs import NodeSubscriptions
from tidings.ports import Peer
from tidings.protocol import personal_channel
from tidings.session import Effect, StartSubscribe
from tidings.subscriptions import live_point

__all__ = ["Opened", "PersonalChannels"]

#: What ``open`` found: the automatic channels, their live points, and the personal
#: subscription (None when personal channels are off) with the offset it went live at.
Opened = tuple[list[str], dict[str, tuple[int, str]], Subscriber[Peer] | None, int]


class PersonalChannels:
    """See the module docstring. ``release_held(peer, sub, after)`` sends what the hub
    held for ``sub`` and switches it live."""

    def __init__(
        self,
        hub: Hub[Peer],
        broker: Broker,
        node_subscriptions: NodeSubscriptions,
        warn: Callable[[str, str], None],
        *,
        enabled: bool,
        hold: float,
        release_held: Callable[[Peer, Subscriber[Peer], int], None],
    ) -> None:
        self._hub = hub
        self._broker = broker
        self._node_subscriptions = node_subscriptions
        self._warn = warn
        self._enabled = enabled
        self._hold = hold > 0
        self._release_held = release_held
        # conn_id -> peer whose personal channel is held.
        self._holds: Deadlines[str, Peer] = Deadlines(hold, self._send_held)

    async def open(self, peer: Peer, forget: Callable[[Peer], None]) -> Opened:
        """Subscribe ``peer``'s personal channel (registered in the hub already).

        Raises ``PersonalChannelUnavailable`` when the broker cannot; then, and on any
        other failure or cancellation, ``forget(peer)`` ran first, so nothing stays
        registered (the caller never reaches its disconnect).
        """
        channels: list[str] = []
        positions: dict[str, tuple[int, str]] = {}
        session = peer.session
        personal = personal_channel(session.identity.user_id) if self._enabled else None
        if personal is None:
            return channels, positions, None, 0
        sub, _ = self._hub.subscribe(peer, personal, hold=True)
        try:
            await self._node_subscriptions.ensure(personal)
            after, epoch = await self._broker.position(personal)
        except TidingsError as exc:
            # Expected during a broker outage: one line, no traceback, rate-limited.
            self._warn(
                "personal channel unavailable at connect; refusing the connection with 1013",
                exc.message,
            )
            forget(peer)
            raise PersonalChannelUnavailable(
                "personal channel unavailable; try again later"
            ) from None
        except BaseException:
            forget(peer)
            raise
        self._hub.confirm(sub)
        session.subscribed(personal, personal=True)
        channels.append(personal)
        # Every event after `after` reaches this connection: announce it as the
        # baseline, so that a client losing this connection before its first reply
        # still recovers from here (no gap from 0, nothing missed).
        positions[personal] = (after, epoch)
        return channels, positions, sub, after

    def go_live(self, peer: Peer, sub: Subscriber[Peer], after: int) -> None:
        """After ``connected``: hold the live events for the client's first command, or
        send them now when there is no hold."""
        sub.start = after
        if self._hold:
            self._holds.add(peer.conn_id, peer)
        else:
            self._release_held(peer, sub, after)

    def on_command(self, peer: Peer, effects: list[Effect]) -> None:
        """The client's first command ends the hold; a recover of the personal channel
        itself takes the hold over and releases it after its replay."""
        if peer.conn_id not in self._holds:
            return
        first = effects[0] if effects else None
        takes_over = (
            isinstance(first, StartSubscribe)
            and first.command.channel == peer.session.personal
            and first.command.recover is not None
        )
        if takes_over:
            self._holds.pop(peer.conn_id)
        elif self._holds.pop(peer.conn_id) is not None:
            self._send_held(peer)

    def forget(self, peer: Peer) -> None:
        """The connection closed: no hold to end."""
        self._holds.pop(peer.conn_id)

    def close(self) -> None:
        self._holds.close()

    def _send_held(self, peer: Peer) -> None:
        """The hold is over: send what it held, then go live."""
        personal = peer.session.personal
        sub = self._hub.subscriber(peer, personal) if personal is not None else None
        if sub is not None and sub.pending is not None:
            self._release_held(peer, sub, live_point(sub))
