"""Subscribe, resubscribe with recovery, unsubscribe, continuity loss and revocation, for
the connections of one node: the gateway side of the session's subscription effects.

The hub owns the membership (who holds what, confirmed or under setup, how many); this
module decides when a subscription is set up, confirmed and ended, and asks the session
for the replies, which it hands to ``apply`` (the gateway's effect runner) in order.
"""

from __future__ import annotations

from collections.abc import Callable

from tidings.brokers.base import Broker, HistoryPage
from tidings.channels import ChannelPolicy
from tidings.errors import SubscriptionFailed, TidingsError, Unauthorized
from tidings.event_types import frame_counter
from tidings.hub import Hub, Subscriber
from tidings.metrics import Metrics
from tidings.nodesubs import NodeSubscriptions
from tidings.ports import Peer
from tidings.presence_events import PresenceEvents
from tidings.protocol import Recover
from tidings.recovery import Replay, history_since, recover_live, recover_new
from tidings.session import Effect, StartSubscribe

__all__ = ["Subscriptions", "live_point"]

Apply = Callable[[Peer, list[Effect]], None]


def live_point(sub: Subscriber[Peer]) -> int:
    """The offset up to which a subscription has sent, or stands at, its events."""
    return max(sub.after, sub.start)


class Subscriptions:
    """See the module docstring. ``counts_changed`` is called after the number of
    confirmed subscriptions changed (metrics shared between workers)."""

    def __init__(
        self,
        hub: Hub[Peer],
        broker: Broker,
        policy: ChannelPolicy,
        node_subscriptions: NodeSubscriptions,
        presence_events: PresenceEvents,
        metrics: Metrics,
        *,
        history_size: int,
        apply: Apply,
        counts_changed: Callable[[], None],
    ) -> None:
        self._hub = hub
        self._broker = broker
        self._policy = policy
        self._node_subscriptions = node_subscriptions
        self._presence = presence_events
        self._count_frames = frame_counter(metrics)
        # Streams may hold a little more than history.size (approximate trimming).
        self._recovery_limit = max(1, history_size) * 2
        self._apply = apply
        self._counts_changed = counts_changed

    async def subscribe(self, peer: Peer, effect: StartSubscribe) -> None:
        """Carry out one subscribe command (idempotent for a channel already held)."""
        command = effect.command
        channel = command.channel
        session = peer.session
        hub = self._hub
        if effect.at_limit and not hub.is_confirmed(peer, channel):
            self._apply(peer, session.too_many(command))
            return
        await self._policy.authorize(session.identity, channel)
        if not hub.is_connected(peer):
            return
        existing = hub.subscriber(peer, channel)
        if existing is not None:
            await self._resubscribe(peer, existing, effect)
            return
        sub, _ = hub.subscribe(peer, channel, hold=True)
        try:
            await self._node_subscriptions.ensure(channel)
            if command.recover is not None:
                page = await self._recovery_page(channel, command.recover)
                position, replay = page.position, recover_new(command.recover, page)
            else:
                position, replay = await self._broker.position(channel), Replay(False)
        except BaseException:
            self.drop(peer, channel)
            raise
        if hub.subscriber(peer, channel) is not sub:
            if hub.is_connected(peer):
                # Continuity was lost while we set up (the client was told to resubscribe).
                raise SubscriptionFailed(
                    "subscription interrupted; subscribe again", channel=channel
                )
            return  # the connection closed while we waited
        self._apply(
            peer,
            session.subscribe_done(
                command,
                position.offset,
                position.epoch,
                replay if command.recover is not None else None,
                new=True,
            ),
        )
        hub.confirm(sub)
        self._presence.opened(channel, session.identity.user_id)
        self._counts_changed()
        self.release_held(peer, sub, position.offset)
        if replay.since is not None:
            # The replay sent what follows `since`: a later recover must not send it again.
            sub.start = min(sub.start, replay.since)

    async def _resubscribe(self, peer: Peer, sub: Subscriber[Peer], effect: StartSubscribe) -> None:
        """Idempotent subscribe; with ``recover`` it replays what the connection missed
        before its subscription went live (offsets up to ``sub.start``).

        That replay is only possible while no live event beyond ``sub.start`` has been
        sent: offsets must reach the connection in increasing order. Otherwise the answer
        is ``recovered: false`` (this is how the personal channel, subscribed at connect,
        is recovered: clients send the recover right after ``connected``)."""
        command = effect.command
        channel = command.channel
        recover = command.recover
        if recover is None:
            position = await self._broker.position(channel)
            self._apply(
                peer,
                peer.session.subscribe_done(
                    command, position.offset, position.epoch, None, new=False
                ),
            )
            return
        # The release below moves `start` up to the live point, but the offsets between
        # the two were sent: `start` is put back (or lowered to where a replay began), so
        # that a later recover cannot send them a second time.
        start = sub.start
        self._hub.hold(sub)
        try:
            page = await self._recovery_page(channel, recover)
        except BaseException:
            self.release_held(peer, sub, live_point(sub))
            sub.start = start
            raise
        if self._hub.subscriber(peer, channel) is not sub:
            if self._hub.is_connected(peer):
                # Continuity was lost during the read (the client was told to resubscribe).
                raise SubscriptionFailed(
                    "subscription interrupted; subscribe again", channel=channel
                )
            return  # the connection closed while we waited
        replay = recover_live(recover, page, start, sub.after)
        self._apply(
            peer,
            peer.session.subscribe_done(
                command, live_point(sub), page.position.epoch, replay, new=False
            ),
        )
        self.release_held(peer, sub, live_point(sub))
        sub.start = start if replay.since is None else min(start, replay.since)

    async def _recovery_page(self, channel: str, recover: Recover) -> HistoryPage:
        """The history that decides ``recover``: after the client's offset, or, when the
        channel turns out to be in another epoch, after 0 (``recovery.history_since``)."""
        limit = self._recovery_limit
        page = await self._broker.history(channel, recover.offset, limit)
        since = history_since(recover, page.position.epoch)
        if since != recover.offset:
            # The epoch changed (a rare path): read again rather than make every recover
            # learn the epoch first.
            page = await self._broker.history(channel, since, limit)
        return page

    def release_held(self, peer: Peer, sub: Subscriber[Peer], after: int) -> None:
        """Send what the hub held for ``sub`` beyond ``after``, then go live."""
        frames = self._hub.release(sub, after)
        if frames:
            peer.send(b"".join(frames))
            self._count_frames(frames, 1)

    def unsubscribe(self, peer: Peer, channel: str, command_id: str | None) -> None:
        """The client's unsubscribe, answered whether or not it held the channel."""
        held = self._release(peer, channel)
        self._apply(peer, peer.session.unsubscribe_done(channel, command_id, subscribed=held))

    def continuity_lost(self, channel: str) -> None:
        """Every local subscription of ``channel`` ends; their clients resubscribe."""
        for peer in self._hub.subscribers(channel):
            held = self._release(peer, channel)
            self._apply(peer, peer.session.continuity_lost(channel, subscribed=held))

    async def check_grants(self, peer: Peer) -> None:
        """After a refresh, end subscriptions the new token no longer allows (``revoked``).

        An authorizer that is unavailable keeps the subscription: an outage of the
        application's backend must not unsubscribe everybody.
        """
        session = peer.session
        for channel in sorted(self._hub.channels_of(peer)):
            if channel == session.personal:
                continue
            try:
                await self._policy.authorize(session.identity, channel)
            except Unauthorized:
                held = self._release(peer, channel)
                self._apply(peer, session.revoke(channel, subscribed=held))
            except TidingsError:
                continue

    def drop(self, peer: Peer, channel: str) -> None:
        """End ``channel`` for ``peer`` without a reply (a subscribe that failed)."""
        if self._release(peer, channel):
            peer.session.unsubscribed(channel)

    def _release(self, peer: Peer, channel: str) -> bool:
        """The node's side of an ended subscription (the hub, presence, counts, the
        broker subscription), before the session's replies; whether it was confirmed."""
        confirmed, emptied = self._hub.drop(peer, channel)
        if confirmed:
            self._counts_changed()
            self._presence.closed(channel, peer.user_id)
        if emptied:
            self._node_subscriptions.release_soon(channel)
        return confirmed
