"""The node's ``BrokerHandler``: what the broker delivers to this node, handed on.

Events become one WebSocket text frame per node for the hub to fan out (in a ``deliver``
span when the publish was traced), presence messages go to local subscribers at once,
presence transitions to the webhook sender, continuity losses to ``subscriptions``, a
disconnect by user closes that user's connections; and the local channel and presence
counts a multi-node broker aggregates are read from the hub.
"""

from __future__ import annotations

import logging

from tidings.brokers.presence_table import PresenceChange
from tidings.hub import Hub
from tidings.ports import Peer
from tidings.protocol import CloseCode
from tidings.protocol.wire import text_frame
from tidings.subscriptions import Subscriptions
from tidings.telemetry import Telemetry
from tidings.webhooks import WebhookSender

__all__ = ["Delivery"]

# The gateway's logger, as before this class moved out of gateway.py: operators filter on it.
logger = logging.getLogger("tidings.gateway")


class Delivery:
    """See the module docstring; ``webhooks`` is None when ``[webhooks]`` is off."""

    def __init__(
        self,
        hub: Hub[Peer],
        subscriptions: Subscriptions,
        telemetry: Telemetry,
        webhooks: WebhookSender | None,
    ) -> None:
        self._hub = hub
        self._subscriptions = subscriptions
        self._telemetry = telemetry
        self._webhooks = webhooks

    def on_event(
        self, channel: str, offset: int, epoch: str, payload: bytes, trace: str | None = None
    ) -> None:
        if trace is not None:  # a traced publish: its delivery gets a span
            self._telemetry.deliver(
                channel, offset, trace, lambda: self._fan_out(channel, offset, payload)
            )
            return
        # Counted when written (hub's on_written), not here: a subscriber under setup
        # holds the frame, and one that already had the offset skips it. The hub times
        # the fan-out too (tidings_fanout_seconds), up to the write at the end of the tick.
        self._hub.deliver(channel, offset, text_frame(payload))

    def _fan_out(self, channel: str, offset: int, payload: bytes) -> int:
        """``on_event``'s work, for a traced event: the local subscriber count."""
        return self._hub.deliver(channel, offset, text_frame(payload))

    def on_continuity_lost(self, channel: str) -> None:
        self._subscriptions.continuity_lost(channel)

    def on_disconnect_user(self, user_id: str, reason: str) -> None:
        for peer in self._hub.connections_of(user_id):
            peer.close(CloseCode.FORBIDDEN, reason or "disconnected by the application")

    def on_presence(self, channel: str, payload: bytes) -> None:
        self._hub.deliver_now(channel, text_frame(payload))

    def on_presence_change(self, change: PresenceChange) -> None:
        if self._webhooks is None:
            return
        try:
            self._webhooks.submit(change)
        except Exception:
            # The broker's delivery must go on (BrokerHandler: must not raise).
            logger.exception("queueing a presence webhook failed")

    def local_channels(self) -> dict[str, int]:
        return dict(self._hub.channel_counts())

    def local_presence(self, channel: str) -> dict[str, int]:
        return dict(self._hub.presence(channel))
